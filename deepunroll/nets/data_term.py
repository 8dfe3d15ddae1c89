"""How learned steps reach the forward operator, with or without gradients through it."""

from __future__ import annotations

import torch

from deepunroll.operators.base import ForwardOperator


class DataTerm:
    """Operator calls for one batch of measurements y (B, *out_shape).

    With ``through_operator=False`` (the authors' choice, the default) the iterate x
    is detached in every call: F(x), J(x) and misfit_grad(x) are data and training
    never differentiates the physics. ``vjp(x, v)`` stays differentiable in v (J(x)
    is a constant matrix there), so LPD's dual variable, which reaches the primal
    update only through J^T h, still learns. With ``True`` every call is
    differentiated (second order for ``misfit_grad``).
    """

    def __init__(self, operator: ForwardOperator, y: torch.Tensor, through_operator: bool = False) -> None:
        self.operator, self.y, self.through_operator = operator, y, through_operator

    def _call(self, fn, *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(args[0].device.type, enabled=False):  # the physics never runs in reduced precision
            if self.through_operator:
                return fn(*args)
            with torch.no_grad():
                return fn(*(a.detach() for a in args))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): (B, *in_shape) -> (B, *out_shape)."""
        return self._call(self.operator.forward, x)

    def vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """J(x)^T v: (B, *in_shape); differentiable in v even when x is detached."""
        with torch.autocast(x.device.type, enabled=False):
            return self.operator.vjp(x if self.through_operator else x.detach(), v)

    def misfit_grad(self, x: torch.Tensor) -> torch.Tensor:
        """J(x)^T (F(x) - y): (B, *in_shape)."""
        return self._call(self.operator.misfit_grad, x, self.y)
