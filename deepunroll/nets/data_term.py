"""How learned steps reach the forward operator, with or without gradients through it."""

from __future__ import annotations

import copy

import torch

from deepunroll.nets.direction import DataFit
from deepunroll.operators.base import ForwardOperator


class DataTerm:
    """Operator calls for one batch of measurements y (B, *out_shape), presented by ``data_fit``.

    With ``through_operator=False`` (the authors' choice, the default) the iterate x
    is detached in every call: F(x), J(x) and the directions are data and training
    never differentiates the physics. ``vjp(x, v)`` stays differentiable in v (J(x)
    is a constant matrix there), so LPD's dual variable, which reaches the primal
    update only through J^T h, still learns. With ``True`` every call is
    differentiated (second order for ``misfit_grad``).

    ``data_fit`` (:class:`deepunroll.nets.direction.DataFit`, default ``raw``) decides what the
    blocks see: with ``raw`` every call is the operator's own, in the network's dtype, as
    published; other kinds run the physics in float64 and return order-one quantities.
    """

    def __init__(self, operator: ForwardOperator, y: torch.Tensor, through_operator: bool = False,
                 data_fit: DataFit | None = None) -> None:
        self.operator, self.y, self.through_operator = operator, y, through_operator
        self.data_fit = data_fit if data_fit is not None else DataFit(operator, "raw")
        self.raw = self.data_fit.kind == "raw"
        # y as LPD's dual blocks see it (B, *out_shape), network dtype: computed once per batch
        self.target = y if self.raw else self.data_fit.measurements(y.to(torch.float64)).to(y.dtype)

    def with_operator_graph(self, through_operator: bool) -> "DataTerm":
        """This data term (same y and presentation) with ``through_operator`` set: self if it already is, else a
        shallow copy. Fixed-point modes use it for the map whose Jacobian they differentiate (``jacobian=full``)."""
        if self.through_operator == through_operator:
            return self
        other = copy.copy(self)
        other.through_operator = through_operator
        return other

    def _physics(self, fn, *args: torch.Tensor) -> torch.Tensor:
        """fn(*args) in full precision, detached unless ``through_operator``; float64 unless ``raw``."""
        with torch.autocast(args[0].device.type, enabled=False):  # the physics never runs in reduced precision
            if not self.raw:
                args = tuple(a.to(torch.float64) for a in args)
            if self.through_operator:
                return fn(*args)
            with torch.no_grad():
                return fn(*(a.detach() for a in args))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) as the blocks see it: (B, *in_shape) -> (B, *out_shape), network dtype."""
        if self.raw:
            return self._physics(self.operator.forward, x)
        return self._physics(lambda x64: self.data_fit.measurements(self.operator(x64)), x).to(x.dtype)

    def vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """J(x)^T v (``raw``) or its presented form: (B, *in_shape); differentiable in v even when x is detached."""
        if self.data_fit.disabled:
            return torch.zeros_like(x) + 0 * v.sum()  # keeps the graph to v (LPD's dual blocks stay in it)
        with torch.autocast(x.device.type, enabled=False):
            x_in = x if self.through_operator else x.detach()
            if self.raw:
                return self.operator.vjp(x_in, v)
            return self.data_fit.adjoint_direction(self.operator, x_in.to(torch.float64), v.to(torch.float64)).to(x.dtype)

    def misfit_direction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d, aux): the data-fit direction (B, *in_shape) and per-sample extra features (B,) or None."""
        if self.data_fit.disabled:
            return torch.zeros_like(x), None if self.data_fit.aux_channels == 0 else x.new_zeros(x.shape[0])
        if self.raw:
            return self._physics(self.operator.misfit_grad, x, self.y), None
        d, aux = self._physics(lambda x64, y64: self.data_fit.misfit_direction(self.operator, x64, y64), x, self.y)
        return d.to(x.dtype), None if aux is None else aux.to(x.dtype)

    def misfit_grad(self, x: torch.Tensor) -> torch.Tensor:
        """The data-fit direction alone (raw: J(x)^T (F(x) - y)), (B, *in_shape)."""
        return self.misfit_direction(x)[0]
