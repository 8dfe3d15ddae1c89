"""Fixed-point solvers for u = f(u) on one flat vector: plain iteration and Anderson acceleration.

:class:`FlatState` turns a nested state (tensors in tuples, None allowed) into that vector and back.
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

SOLVERS = ("fixed_point", "anderson")


class FlatState:
    """Flattens a fixed-point state (tensors in nested tuples, None allowed) to one vector and back."""

    def __init__(self, z) -> None:
        leaves, self.spec = tree_flatten(z)
        self.is_tensor = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        self.shapes = [leaf.shape for leaf in leaves if isinstance(leaf, torch.Tensor)]
        self.sizes = [leaf.numel() for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def flatten(self, z) -> torch.Tensor:
        leaves, _ = tree_flatten(z)
        return torch.cat([leaf.reshape(-1) for leaf in leaves if isinstance(leaf, torch.Tensor)])

    def unflatten(self, u: torch.Tensor):
        parts = iter(p.view(s) for p, s in zip(torch.split(u, self.sizes), self.shapes))
        return tree_unflatten([next(parts) if t else None for t in self.is_tensor], self.spec)


def relative_residual(fu: torch.Tensor, u: torch.Tensor) -> float:
    """||fu - u|| / ||fu||, the norms in float64 (a float32 norm overflows long before its entries do)."""
    return float((fu - u).double().norm() / (fu.double().norm() + 1e-30))


def fixed_point_iteration(f, u0: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, int, float]:
    """u <- f(u) until ||f(u) - u|| <= tol ||f(u)|| or max_iter; returns (u, iterations, residual).

    With tol > 0 it also stops when the residual is not finite (the iterates diverged); with tol = 0 no
    residual is computed and it runs max_iter iterations (residual inf).
    """
    u, residual = u0, float("inf")
    for i in range(max_iter):
        fu = f(u)
        residual = relative_residual(fu, u) if tol > 0 else residual
        u = fu
        if residual <= tol or (tol > 0 and not math.isfinite(residual)):
            return u, i + 1, residual
    return u, max_iter, residual


def anderson(f, u0: torch.Tensor, max_iter: int, tol: float, memory: int = 5, lam: float = 1e-10
             ) -> tuple[torch.Tensor, int, float]:
    """Anderson acceleration of u = f(u) (type II, mixing the last ``memory`` iterates); returns (u, iterations, residual).

    Each step solves min_alpha ||sum_i alpha_i (f(u_i) - u_i)||, sum alpha = 1, and sets u = sum_i alpha_i f(u_i).
    """
    xs, fs = [u0], [f(u0)]
    residual = relative_residual(fs[0], u0)
    if residual <= tol or max_iter <= 1:
        return fs[0], 1, residual
    for i in range(1, max_iter):
        n = min(len(xs), memory)
        G = torch.stack([fs[j] - xs[j] for j in range(-n, 0)]).double()  # (n, N) residuals
        H = G @ G.T
        scale = H.diagonal().max()
        if not scale > 0:  # every stored residual is exactly zero: converged
            return fs[-1], i, 0.0
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        alpha, info = torch.linalg.solve_ex(H + lam * scale * eye, torch.ones(n, dtype=H.dtype, device=H.device))
        alpha = alpha / alpha.sum()
        if int(info) != 0 or not bool(torch.isfinite(alpha).all()):  # degenerate history: plain step
            alpha = eye[-1]
        u = alpha.to(fs[-1].dtype) @ torch.stack(fs[-n:])
        fu = f(u)
        residual = relative_residual(fu, u)
        xs, fs = (xs + [u])[-memory:], (fs + [fu])[-memory:]
        if residual <= tol:
            return fu, i + 1, residual
    return fs[-1], max_iter, residual


def solve_fixed_point(f, u0: torch.Tensor, max_iter: int, tol: float, solver: str = "fixed_point", memory: int = 5
                      ) -> tuple[torch.Tensor, int, float]:
    """u = f(u) by ``solver`` (fixed_point | anderson, :data:`SOLVERS`); returns (u, iterations, residual)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {', '.join(SOLVERS)}")
    if solver == "anderson":
        return anderson(f, u0, max_iter, tol, memory)
    return fixed_point_iteration(f, u0, max_iter, tol)
