"""How gradients flow through the unrolled loop: full, checkpoint, jfb, restarted_jfb, deq.

Every strategy is called as ``strategy(net, z0, data, index) -> z`` where ``z`` is the fixed-point
state (step state, accelerator state) and ``net.iteration(k, z, data)`` is one iteration. The
fixed-point modes use the weight-tied map T(z) = net.iteration(0, z, data) (same at every k):

- ``full``           backpropagate through all ``n_iter`` iterations (memory O(K)).
- ``checkpoint``     ``torch.utils.checkpoint`` per iteration: same gradients, iterates recomputed.
- ``jfb``            up to ``n_iter`` iterations without a graph (stop when the relative residual
                     ||T(z) - z|| / ||T(z)|| <= ``tol``), then ``m`` differentiated applications.
- ``restarted_jfb``  ``restarts`` blocks of ``n_iter`` iterations without a graph, each starting from
                     the previous block's output, then ``m`` differentiated applications; with
                     ``warm_start`` each training sample starts from its last fixed point (by dataset index).
- ``deq``            solve z* = T(z*) without a graph (``solver``: fixed_point | anderson, ``tol``, at most
                     ``n_iter`` iterations), apply T once with a graph, and replace the incoming gradient
                     g by the solution of the adjoint equation u = J_T(z*)^T u + g (same solver,
                     ``backward_tol``, ``backward_max_iter``): the implicit (DEQ) gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils import checkpoint as torch_checkpoint
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

MODES = ("full", "checkpoint", "jfb", "restarted_jfb", "deq")
FIXED_POINT_MODES = ("jfb", "restarted_jfb", "deq")
SOLVERS = ("fixed_point", "anderson")


@dataclass
class FixedPointSettings:
    """The ``net.fixed_point.*`` keys (used by jfb, restarted_jfb and deq)."""

    tol: float = 1e-4               # forward relative residual (jfb, deq); 0: always run n_iter iterations
    m: int = 1                      # differentiated applications of T (jfb, restarted_jfb)
    restarts: int = 3               # R no-graph blocks of n_iter iterations (restarted_jfb)
    warm_start: bool = False        # restarted_jfb: start each training sample from its last fixed point
    solver: str = "anderson"        # deq forward and adjoint solves: fixed_point | anderson
    anderson_memory: int = 5        # past iterates mixed by Anderson acceleration
    backward_tol: float = 1e-8      # deq: relative residual of the adjoint solve
    backward_max_iter: int = 100    # deq: adjoint solver iterations at most


def _detach(z):
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, z)


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


def _relative_residual(fu: torch.Tensor, u: torch.Tensor) -> float:
    return float((fu - u).norm() / (fu.norm() + 1e-30))


def fixed_point_iteration(f, u0: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, int, float]:
    """u <- f(u) until ||f(u) - u|| <= tol ||f(u)|| or max_iter; returns (u, iterations, residual)."""
    u, residual = u0, float("inf")
    for i in range(max_iter):
        fu = f(u)
        residual = _relative_residual(fu, u) if tol > 0 else residual
        u = fu
        if residual <= tol:
            return u, i + 1, residual
    return u, max_iter, residual


def anderson(f, u0: torch.Tensor, max_iter: int, tol: float, memory: int = 5, lam: float = 1e-10
             ) -> tuple[torch.Tensor, int, float]:
    """Anderson acceleration of u = f(u) (type II, mixing the last ``memory`` iterates); returns (u, iterations, residual).

    Each step solves min_alpha ||sum_i alpha_i (f(u_i) - u_i)||, sum alpha = 1, and sets u = sum_i alpha_i f(u_i).
    """
    xs, fs = [u0], [f(u0)]
    residual = _relative_residual(fs[0], u0)
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
        residual = _relative_residual(fu, u)
        xs, fs = (xs + [u])[-memory:], (fs + [fu])[-memory:]
        if residual <= tol:
            return fu, i + 1, residual
    return fs[-1], max_iter, residual


def solve(f, u0, max_iter: int, tol: float, solver: str, memory: int = 5):
    if solver == "anderson":
        return anderson(f, u0, max_iter, tol, memory)
    return fixed_point_iteration(f, u0, max_iter, tol)


class Full:
    """Backpropagate through every iteration (the default)."""

    mode = "full"

    def __call__(self, net, z, data, index=None):
        for k in range(net.n_iter):
            z = net.iteration(k, z, data)
        return z


class Checkpointed:
    """``torch.utils.checkpoint`` around every iteration: gradients of ``full``, iterates recomputed in backward."""

    mode = "checkpoint"
    kept_bytes = 0  # bytes of the iterates kept as checkpoint inputs by the last call (invisible to saved_tensors_hooks)

    def __call__(self, net, z, data, index=None):
        if not torch.is_grad_enabled():
            return Full()(net, z, data)
        leaves = [t for t in tree_flatten(z)[0] if isinstance(t, torch.Tensor)]
        self.kept_bytes = net.n_iter * sum(t.numel() * t.element_size() for t in leaves)
        for k in range(net.n_iter):
            z = torch_checkpoint.checkpoint(net.iteration, k, z, data, use_reentrant=False)
        return z


class JFB:
    """Jacobian-free backpropagation: iterate to ``tol`` (at most n_iter) without a graph, differentiate m steps."""

    mode = "jfb"

    def __init__(self, settings: FixedPointSettings) -> None:
        self.settings = settings
        self.last_iterations, self.last_residual = 0, float("nan")

    def _no_graph(self, net, z, data, n_iter: int, tol: float):
        flat = FlatState(z)
        with torch.no_grad():
            u, self.last_iterations, self.last_residual = fixed_point_iteration(
                lambda u: flat.flatten(net.iteration(0, flat.unflatten(u), data)), flat.flatten(z), n_iter, tol)
        return flat.unflatten(u)

    def _differentiated(self, net, z, data):
        z = _detach(z)
        for _ in range(self.settings.m):
            z = net.iteration(0, z, data)
        return z

    def __call__(self, net, z, data, index=None):
        z = self._no_graph(net, z, data, net.n_iter, self.settings.tol)
        return self._differentiated(net, z, data)


class RestartedJFB(JFB):
    """R no-graph restarts of an n_iter-step block, then m differentiated steps; optional per-sample warm start."""

    mode = "restarted_jfb"

    def __init__(self, settings: FixedPointSettings) -> None:
        super().__init__(settings)
        self.cache: dict[int, list[torch.Tensor]] = {}  # dataset index -> leaves of its last fixed point
        self._batch_dims: list[int] | None = None

    def batch_dims(self, net, z, data) -> list[int]:
        """The batch dimension of every state leaf (RMA's recurrent state is (layers, B, hidden))."""
        if self._batch_dims is None:
            x1, y1 = net.step.output(z[0])[:1].detach(), data.y[:1]
            one, _ = tree_flatten(net.initial_state(x1, y1))
            two, _ = tree_flatten(net.initial_state(x1.repeat_interleave(2, 0), y1.repeat_interleave(2, 0)))
            self._batch_dims = [None if a is None else next(d for d in range(a.dim()) if a.shape[d] != b.shape[d])
                                for a, b in zip(one, two)]
        return self._batch_dims

    def _warm(self, net, z, data, index):
        leaves, spec = tree_flatten(z)
        dims = self.batch_dims(net, z, data)
        out = []
        for leaf, dim in zip(leaves, dims):
            if leaf is None:
                out.append(None)
                continue
            rows = list(leaf.unbind(dim))
            for i, idx in enumerate(index.tolist()):
                if idx in self.cache:
                    rows[i] = self.cache[idx][len(out)].to(leaf)
            out.append(torch.stack(rows, dim))
        return tree_unflatten(out, spec)

    def _store(self, net, z, data, index):
        leaves, _ = tree_flatten(_detach(z))
        dims = self.batch_dims(net, z, data)
        for i, idx in enumerate(index.tolist()):
            self.cache[idx] = [None if leaf is None else leaf.select(dim, i).clone() for leaf, dim in zip(leaves, dims)]

    def __call__(self, net, z, data, index=None):
        warm = self.settings.warm_start and net.training and index is not None
        if warm:
            z = self._warm(net, z, data, index)
        with torch.no_grad():
            for _ in range(self.settings.restarts):  # each block starts from the previous block's output
                for _ in range(net.n_iter):
                    z = net.iteration(0, z, data)
        z = self._differentiated(net, z, data)
        if warm:
            self._store(net, z, data, index)
        return z


class DEQ:
    """Implicit differentiation at the fixed point: adjoint equation u = J^T u + g solved by fixed point or Anderson."""

    mode = "deq"

    def __init__(self, settings: FixedPointSettings) -> None:
        self.settings = settings
        self.last_iterations, self.last_residual = 0, float("nan")
        self.last_backward_iterations, self.last_backward_residual = 0, float("nan")

    def __call__(self, net, z, data, index=None):
        s = self.settings
        flat = FlatState(z)
        T = lambda u: flat.flatten(net.iteration(0, flat.unflatten(u), data))  # noqa: E731
        with torch.no_grad():
            u_star, self.last_iterations, self.last_residual = solve(
                T, flat.flatten(z), net.n_iter, s.tol, s.solver, s.anderson_memory)
        u = u_star.detach().requires_grad_(torch.is_grad_enabled())
        Tu = T(u)
        if Tu.requires_grad:
            busy = [False]

            def implicit(grad: torch.Tensor):
                if busy[0]:
                    return None
                busy[0] = True
                try:
                    adjoint = lambda g: torch.autograd.grad(Tu, u, g, retain_graph=True)[0] + grad  # noqa: E731
                    g, self.last_backward_iterations, self.last_backward_residual = solve(
                        adjoint, grad, s.backward_max_iter, s.backward_tol, s.solver, s.anderson_memory)
                finally:
                    busy[0] = False
                return g

            Tu.register_hook(implicit)
        return flat.unflatten(Tu)


def make_backprop(mode: str = "full", fixed_point: dict | FixedPointSettings | None = None):
    """The strategy for ``net.backprop=mode`` with ``net.fixed_point.*`` settings."""
    if mode not in MODES:
        raise ValueError(f"net.backprop={mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(fixed_point, FixedPointSettings):
        settings = fixed_point
    else:
        known = {f.name for f in fields(FixedPointSettings)}
        given = dict(fixed_point or {})
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"net.fixed_point.{unknown[0]}: unknown key; known keys are {sorted(known)}")
        settings = FixedPointSettings(**given)
    if settings.solver not in SOLVERS:
        raise ValueError(f"net.fixed_point.solver={settings.solver!r}; expected one of {', '.join(SOLVERS)}")
    if mode == "full":
        return Full()
    if mode == "checkpoint":
        return Checkpointed()
    return {"jfb": JFB, "restarted_jfb": RestartedJFB, "deq": DEQ}[mode](settings)
