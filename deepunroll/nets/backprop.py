"""How gradients flow through the unrolled loop: full, checkpoint, jfb, restarted_jfb, deq.

Every strategy is called as ``strategy(net, z0, data, index) -> z`` where ``z`` is the fixed-point
state (step state, accelerator state) and ``net.iteration(k, z, data)`` is one iteration. The
fixed-point modes use the weight-tied map T(z) = net.iteration(0, z, data) (same at every k):

- ``full``           backpropagate through all ``n_iter`` iterations (memory O(K)).
- ``checkpoint``     ``torch.utils.checkpoint`` per iteration: same gradients, iterates recomputed.
- ``jfb``            up to ``n_iter`` iterations without a graph (stop when the relative residual
                     ||T(z) - z|| / ||T(z)|| <= ``tol``), then ``m`` differentiated applications.
- ``restarted_jfb``  the restarted JFB of Davy, Briceno-Arias, Pustelnik 2025 (arXiv 2506.13239): in
                     training every forward pass of a sample restarts from that sample's previous output
                     (by dataset index; its first pass starts from z0), runs ``restarts`` blocks of
                     ``n_iter`` iterations without a graph, then ``m`` differentiated applications; the
                     outputs are kept per sample (:class:`WarmStarts`, saved in the trainer's checkpoints).
                     In eval mode every pass starts from z0.
- ``deq``            solve z* = T(z*) without a graph (``solver``: fixed_point | anderson, ``tol``, at most
                     ``n_iter`` iterations), apply T once with a graph, and replace the incoming gradient
                     g by the solution of the adjoint equation u = J_T(z*)^T u + g (same solver,
                     ``backward_tol``, ``backward_max_iter``): the implicit (DEQ) gradient.

``jacobian`` (full | detached) chooses the map whose Jacobian J_T the fixed-point modes differentiate in z
(deq's adjoint equation, the 2nd to m-th differentiated applications of jfb / restarted_jfb): ``full`` is
the map the forward pass iterates, with the data-fit term differentiated through the operator even when
``net.grad_through_operator=false``; ``detached`` holds F(x), J(x) and the data-fit direction constant.
The parameter gradient dT/dtheta at a fixed z is the same under both (the operator has no parameters).
"""

from __future__ import annotations

import inspect

import torch
from torch.utils import checkpoint as torch_checkpoint
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from deepunroll.optim.fixed_point import SOLVERS, FlatState, fixed_point_iteration, solve_fixed_point
from deepunroll.validation import OPEN_UNIT_INTERVAL, POSITIVE_INT, UNIT_INTERVAL, check, check_all, one_of

JACOBIANS = ("full", "detached")
# the settings of the fixed-point modes (configs/backprop/<mode>.yaml); each mode takes the ones it reads
RULES = {"tol": UNIT_INTERVAL, "m": POSITIVE_INT, "restarts": POSITIVE_INT, "jacobian": one_of(*JACOBIANS),
         "solver": one_of(*SOLVERS), "anderson_memory": POSITIVE_INT, "backward_tol": OPEN_UNIT_INTERVAL,
         "backward_max_iter": POSITIVE_INT}


def _detach(z):
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, z)


class Backprop:
    """A way of differentiating the unrolled loop: ``strategy(net, z0, data, index) -> z`` (module doc).

    One config file per mode, ``configs/backprop/<mode>.yaml`` (``_target_`` = the class, its arguments = the
    mode's settings), chosen by ``backprop=<mode>`` and set by ``backprop.<setting>=...``.
    ``fixed_point``: True when the mode iterates one weight-tied map (the net must be weight-tied).
    ``stats``: the solver's iterations and relative residual of the last call, logged by the trainer.
    Settings are checked on construction (ConfigError naming ``backprop.<setting>``).
    """

    mode = ""
    fixed_point = False
    RULES = RULES

    def __init__(self, **settings) -> None:
        check_all("backprop", self.RULES, settings)
        self.__dict__.update(settings)
        self.setting_names = tuple(settings)
        self.stats: dict[str, float] = {}

    def config(self) -> dict:
        """The ``backprop`` config node that builds this strategy (its current settings)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}",
                **{name: getattr(self, name) for name in self.setting_names}}


class Full(Backprop):
    """Backpropagate through every iteration (the default)."""

    mode = "full"

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, net, z, data, index=None):
        for k in range(net.n_iter):
            z = net.iteration(k, z, data)
        return z


class Checkpointed(Backprop):
    """``torch.utils.checkpoint`` around every iteration: gradients of ``full``, iterates recomputed in backward."""

    mode = "checkpoint"
    kept_bytes = 0  # bytes of the iterates kept as checkpoint inputs by the last call (invisible to saved_tensors_hooks)

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, net, z, data, index=None):
        if not torch.is_grad_enabled():
            return Full.__call__(self, net, z, data)
        leaves = [t for t in tree_flatten(z)[0] if isinstance(t, torch.Tensor)]
        self.kept_bytes = net.n_iter * sum(t.numel() * t.element_size() for t in leaves)
        for k in range(net.n_iter):
            z = torch_checkpoint.checkpoint(net.iteration, k, z, data, use_reentrant=False)
        return z


def _map_data(data, jacobian: str):
    """The data term of the map J_T describes: operator differentiated (``full``) or held constant (``detached``)."""
    return data.with_operator_graph(jacobian == "full")


class JFB(Backprop):
    """Jacobian-free backpropagation: iterate to ``tol`` (at most n_iter) without a graph, differentiate m steps."""

    mode = "jfb"
    fixed_point = True

    def __init__(self, tol: float = 1e-4, m: int = 1, jacobian: str = "full") -> None:
        """``tol``: forward relative residual (0: always n_iter iterations); ``m``: differentiated applications of
        T; ``jacobian``: J_T of the 2nd..m-th of them, full | detached (module doc)."""
        super().__init__(tol=tol, m=m, jacobian=jacobian)

    def _no_graph(self, net, z, data, n_iter: int, tol: float):
        flat = FlatState(z)
        with torch.no_grad():
            u, iterations, residual = fixed_point_iteration(
                lambda u: flat.flatten(net.iteration(0, flat.unflatten(u), data)), flat.flatten(z), n_iter, tol)
        self.stats = {"forward_iterations": iterations, "forward_residual": residual}
        return flat.unflatten(u)

    def _differentiated(self, net, z, data):
        """m applications of T from z (detached); from the 2nd on J_T is that of ``jacobian``."""
        z, data = _detach(z), _map_data(data, self.jacobian)
        for _ in range(self.m):
            z = net.iteration(0, z, data)
        return z

    def __call__(self, net, z, data, index=None):
        z = self._no_graph(net, z, data, net.n_iter, self.tol)
        return self._differentiated(net, z, data)


class WarmStarts:
    """The last output state of every training sample, by dataset index, for restarted JFB.

    One preallocated tensor per state leaf, (capacity, *leaf shape without its batch dimension), on the
    device of the states it receives, and a boolean ``seen`` mask (capacity,); reads and writes are
    single gather / scatter operations. The capacity grows (at least doubling) to the largest index seen.
    Leaves are given batch-first: (B, ...) rows for the dataset indices ``index`` (B,).
    """

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor | None] | None = None
        self.seen: torch.Tensor | None = None  # (capacity,) bool

    def __len__(self) -> int:
        return 0 if self.seen is None else int(self.seen.sum())

    def _reserve(self, rows: list[torch.Tensor | None], capacity: int) -> None:
        if self.leaves is None:
            self.leaves = [None if r is None else r.new_zeros((0, *r.shape[1:])) for r in rows]
            self.seen = torch.zeros(0, dtype=torch.bool, device=next(r for r in rows if r is not None).device)
        if capacity <= self.seen.shape[0]:
            return
        capacity = max(capacity, 2 * self.seen.shape[0])
        grow = capacity - self.seen.shape[0]
        self.leaves = [None if t is None else torch.cat([t, t.new_zeros((grow, *t.shape[1:]))]) for t in self.leaves]
        self.seen = torch.cat([self.seen, self.seen.new_zeros(grow)])

    def _to(self, device: torch.device) -> None:
        if self.seen is not None and self.seen.device != device:
            self.leaves = [None if t is None else t.to(device) for t in self.leaves]
            self.seen = self.seen.to(device)

    def read(self, index: torch.Tensor, rows: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``rows`` with the stored state in place of every row whose index has been written before."""
        if self.seen is None:
            return rows
        device = next(r for r in rows if r is not None).device
        self._to(device)
        index, capacity = index.to(device), self.seen.shape[0]
        at = index.clamp(max=capacity - 1)
        seen = self.seen[at] & (index < capacity)  # (B,)
        return [None if r is None else torch.where(seen.view(-1, *[1] * (r.dim() - 1)), t[at].to(r.dtype), r)
                for r, t in zip(rows, self.leaves)]

    def write(self, index: torch.Tensor, rows: list[torch.Tensor | None]) -> None:
        """Store ``rows`` (detached) as the states of ``index``."""
        self._reserve(rows, int(index.max()) + 1)
        self._to(next(r for r in rows if r is not None).device)
        index = index.to(self.seen.device)
        for t, r in zip(self.leaves, rows):
            if t is not None:
                t[index] = r.detach().to(t.dtype)
        self.seen[index] = True

    def state_dict(self) -> dict:
        """Plain data for a checkpoint: {"index": (n,) int64, "leaves": [(n, ...) tensor or None per leaf]}."""
        if self.seen is None:
            return {"index": torch.zeros(0, dtype=torch.int64), "leaves": []}
        index = self.seen.nonzero().flatten()
        return {"index": index, "leaves": [None if t is None else t[index] for t in self.leaves]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the contents with a :meth:`state_dict` (an empty one clears them)."""
        self.leaves, self.seen = None, None
        index, leaves = state["index"], state["leaves"]
        if index.numel():
            self.write(index, leaves)


class RestartedJFB(JFB):
    """Restarted JFB: each training pass of a sample starts from its previous output (:class:`WarmStarts`)."""

    mode = "restarted_jfb"

    def __init__(self, m: int = 1, restarts: int = 3, jacobian: str = "full") -> None:
        """``restarts``: R no-graph blocks of n_iter iterations per pass; ``m``, ``jacobian``: as :class:`JFB`."""
        Backprop.__init__(self, m=m, restarts=restarts, jacobian=jacobian)
        self.cache = WarmStarts()
        self._batch_dims: list[int | None] | None = None

    def batch_dims(self, net, z, data) -> list[int | None]:
        """The batch dimension of every state leaf (RMA's recurrent state is (layers, B, hidden))."""
        if self._batch_dims is None:
            x1, y1 = net.step.output(z[0])[:1].detach(), data.y[:1]
            one, _ = tree_flatten(net.initial_state(x1, y1))
            two, _ = tree_flatten(net.initial_state(x1.repeat_interleave(2, 0), y1.repeat_interleave(2, 0)))
            self._batch_dims = [None if a is None else next(d for d in range(a.dim()) if a.shape[d] != b.shape[d])
                                for a, b in zip(one, two)]
        return self._batch_dims

    def _rows(self, net, z, data) -> tuple[list[torch.Tensor | None], object]:
        """The state's leaves batch-first, and the tree spec to rebuild it."""
        leaves, spec = tree_flatten(z)
        dims = self.batch_dims(net, z, data)
        return [None if t is None else t.movedim(d, 0) for t, d in zip(leaves, dims)], spec

    def _unrows(self, rows, spec):
        return tree_unflatten([None if r is None else r.movedim(0, d) for r, d in zip(rows, self._batch_dims)], spec)

    def __call__(self, net, z, data, index=None):
        if net.training:
            if index is None:
                raise ValueError("backprop=restarted_jfb restarts every training sample from its previous output "
                                 "and needs its dataset index: call net(y, x0, index=...) (the trainer passes "
                                 "batch['index']) or use backprop=jfb")
            rows, spec = self._rows(net, z, data)
            z = self._unrows(self.cache.read(index, rows), spec)
        with torch.no_grad():
            for _ in range(self.restarts):  # each block starts from the previous block's output
                for _ in range(net.n_iter):
                    z = net.iteration(0, z, data)
        z = self._differentiated(net, z, data)
        if net.training:
            self.cache.write(index, self._rows(net, _detach(z), data)[0])
        return z


class DEQ(Backprop):
    """Implicit differentiation at the fixed point: adjoint equation u = J^T u + g solved by fixed point or Anderson."""

    mode = "deq"
    fixed_point = True

    def __init__(self, tol: float = 1e-4, jacobian: str = "full", solver: str = "anderson", anderson_memory: int = 5,
                 backward_tol: float = 1e-8, backward_max_iter: int = 100) -> None:
        """Forward solve to ``tol`` (at most n_iter iterations) by ``solver`` (fixed_point | anderson, mixing
        ``anderson_memory`` iterates); adjoint solve to ``backward_tol`` in at most ``backward_max_iter``."""
        super().__init__(tol=tol, jacobian=jacobian, solver=solver, anderson_memory=anderson_memory,
                         backward_tol=backward_tol, backward_max_iter=backward_max_iter)

    def __call__(self, net, z, data, index=None):
        s = self
        flat = FlatState(z)
        with torch.no_grad():
            u_star, iterations, residual = solve_fixed_point(
                lambda u: flat.flatten(net.iteration(0, flat.unflatten(u), data)), flat.flatten(z), net.n_iter,
                s.tol, s.solver, s.anderson_memory)
        self.stats = {"forward_iterations": iterations, "forward_residual": residual}
        u = u_star.detach().requires_grad_(torch.is_grad_enabled())
        Tu = flat.flatten(net.iteration(0, flat.unflatten(u), _map_data(data, s.jacobian)))  # J_T of ``jacobian``
        if Tu.requires_grad:
            busy = [False]

            def implicit(grad: torch.Tensor):
                if busy[0]:
                    return None
                busy[0] = True
                try:
                    adjoint = lambda g: torch.autograd.grad(Tu, u, g, retain_graph=True)[0] + grad  # noqa: E731
                    g, iterations, residual = solve_fixed_point(
                        adjoint, grad, s.backward_max_iter, s.backward_tol, s.solver, s.anderson_memory)
                    self.stats |= {"backward_iterations": iterations, "backward_residual": residual}
                finally:
                    busy[0] = False
                return g

            Tu.register_hook(implicit)
        return flat.unflatten(Tu)


# backprop=<mode> -> strategy class; adding a mode is one class above, one entry here and configs/backprop/<mode>.yaml
BACKPROP: dict[str, type[Backprop]] = {cls.mode: cls for cls in (Full, Checkpointed, JFB, RestartedJFB, DEQ)}


def make_backprop(mode: str = "full", **settings) -> Backprop:
    """The strategy ``mode`` with its settings (ConfigError naming ``backprop`` or a bad setting)."""
    check("backprop", mode, one_of(*BACKPROP))
    return BACKPROP[mode](**settings)


def taken_settings(mode: str, settings: dict) -> dict:
    """The entries of ``settings`` that mode ``mode`` takes (each mode reads its own subset of :data:`RULES`)."""
    check("backprop", mode, one_of(*BACKPROP))
    takes = inspect.signature(BACKPROP[mode]).parameters
    return {k: v for k, v in settings.items() if k in takes}


def backprop_overrides(mode: str, **settings) -> list[str]:
    """Overrides choosing ``backprop=<mode>`` with those of ``settings`` it takes: one settings list for a sweep
    over modes (``backprop_overrides("deq", tol=0, restarts=1)`` sets tol only)."""
    return [f"backprop={mode}", *(f"backprop.{k}={v}" for k, v in taken_settings(mode, settings).items())]


def upgrade_backprop(net_cfg) -> dict:
    """The ``backprop`` node of a config written before the backprop group existed, from its ``net.backprop``
    (mode name; absent: full) and ``net.fixed_point.*`` (the settings of every mode; each mode keeps its own)."""
    mode = net_cfg.get("backprop", "full")
    return make_backprop(mode, **taken_settings(mode, dict(net_cfg.get("fixed_point") or {}))).config()


def warm_starts(model: torch.nn.Module) -> WarmStarts | None:
    """The restarted-JFB warm starts of ``model`` (an UnrolledNet, or a wrapper such as GridDomainNet), or None."""
    for module in model.modules():
        strategy = getattr(module, "backprop", None)
        if isinstance(strategy, RestartedJFB):
            return strategy.cache
    return None


def solver_stats(model: torch.nn.Module) -> dict[str, float]:
    """The fixed-point solver statistics of ``model``'s last forward / backward pass ({} for full, checkpoint)."""
    for module in model.modules():
        strategy = getattr(module, "backprop", None)
        if isinstance(strategy, Backprop):
            return dict(strategy.stats)
    return {}
