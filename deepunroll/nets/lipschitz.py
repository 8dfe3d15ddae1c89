"""Lipschitz constant of a fixed-point map at a point, and spectral normalisation of convolutions."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def jacobian_norm(f, u: torch.Tensor, n_power: int = 10, seed: int = 0) -> float:
    """||J_f(u)||_2 by power iteration on J^T J with Jacobian-vector products (torch.func); u: 1-D.

    The estimate increases towards the true norm with ``n_power``; the start vector comes from a
    private generator seeded by ``seed`` (the global RNG is untouched).
    """
    u = u.detach()
    generator = torch.Generator(device=u.device).manual_seed(seed)
    v = torch.randn(u.shape, generator=generator, dtype=u.dtype, device=u.device)
    v = v / v.norm()
    _, vjp_fn = torch.func.vjp(f, u)
    try:
        torch.func.jvp(f, (u,), (v,))
        jvp = lambda v: torch.func.jvp(f, (u,), (v,))[1]  # noqa: E731
    except (RuntimeError, NotImplementedError):  # an op without forward-mode AD (e.g. LSTM): J v as a vjp of the vjp
        _, vjp_of_vjp = torch.func.vjp(lambda w: vjp_fn(w)[0], torch.zeros_like(u))
        jvp = lambda v: vjp_of_vjp(v)[0]  # noqa: E731
    norm = 0.0
    for _ in range(n_power):
        jv = jvp(v)
        norm = float(jv.detach().norm())
        w = vjp_fn(jv)[0]
        w = w.detach()
        if float(w.norm()) == 0.0:
            return 0.0
        v = w / w.norm()
    return norm


class _SpectralBound(nn.Module):
    """W -> W / max(1, ||W||_2 / bound), with W seen as an (out, in * kernel) matrix (exact SVD norm)."""

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.bound = float(bound)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sigma = torch.linalg.matrix_norm(weight.flatten(1), ord=2)
        return weight / torch.clamp(sigma / self.bound, min=1.0)


def spectral_normalise(module: nn.Module, bound: float = 1.0) -> nn.Module:
    """Bound the matrix norm of every Conv1d/Conv2d kernel in ``module`` by ``bound`` (in place; returns module).

    This is the normalisation of Miyato et al. on the reshaped kernel: it bounds the convolution's
    Lipschitz constant by bound * sqrt(kernel size), not by bound exactly; the logged Lipschitz
    estimate of the whole map says what it achieved.
    """
    if bound <= 0:
        raise ValueError(f"net.spectral_norm bound={bound}; expected > 0")
    for conv in [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]:
        parametrize.register_parametrization(conv, "weight", _SpectralBound(bound))
    return module
