"""deepunroll operators as deepinv physics (``pip install -e ".[deepinv]"``).

:class:`OperatorPhysics` wraps any :class:`~deepunroll.operators.base.ForwardOperator` (EIT, the complete
electrode model, the Volterra blurs, the toy) as a ``deepinv.physics.Physics``: ``A`` is the operator's
forward map and ``A_vjp`` its exact adjoint (``operator.vjp``: for EIT the adjoint-field formula, not
autograd through the FEM solve), so deepinv's data fidelities (``L2().grad`` calls ``A_vjp``) and its
optimisation and unfolded algorithms run on our problems. deepinv works on images (B, C, H, W): operators
with a 2D ``in_shape`` (H, W) get a channel axis of size 1 on both sides (``channel_axis``); others keep
their shapes (EIT: (B, n_elems) in, (B, n_meas) out). Nonlinear operators have no ``A_adjoint``: give
deepinv's algorithms an ``init`` (e.g. ``physics.reference_point(y)`` or a Gauss-Newton image).
"""

from __future__ import annotations

import torch

try:
    from deepinv.physics import Physics
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("deepunroll.interop.deepinv needs deepinv: pip install -e \".[deepinv]\"") from error

from deepunroll.operators.base import ForwardOperator


class OperatorPhysics(Physics):
    """deepinv physics y = noise(F(x)) of a deepunroll operator F.

    operator: the forward operator; noise_model: a deepinv noise model (default: none);
    channel_axis: add a size-1 channel axis on x and y (default: when ``in_shape`` is 2D).
    """

    def __init__(self, operator: ForwardOperator, noise_model=None, channel_axis: bool | None = None,
                 **kwargs) -> None:
        if not isinstance(operator, ForwardOperator):
            raise TypeError(f"OperatorPhysics needs a deepunroll ForwardOperator, got {type(operator).__name__}")
        super().__init__(noise_model=noise_model, **kwargs)
        self.operator = operator
        self.channel_axis = len(operator.in_shape) == 2 if channel_axis is None else bool(channel_axis)

    def _ours(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if self.channel_axis else t

    def _theirs(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None] if self.channel_axis else t

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """F(x): (B, [1,] *in_shape) -> (B, [1,] *out_shape)."""
        return self._theirs(self.operator(self._ours(x)))

    def A_vjp(self, x: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """J(x)^T v by the operator's exact adjoint: x (B, [1,] *in_shape), v (B, [1,] *out_shape)."""
        return self._theirs(self.operator.vjp(self._ours(x), self._ours(v)))

    def reference_point(self, y: torch.Tensor) -> torch.Tensor:
        """The operator's typical input (EIT: unit conductivity) for every sample of y, as an ``init``."""
        x_ref = self.operator.reference_point().to(dtype=y.dtype, device=y.device)
        return self._theirs(x_ref.expand(y.shape[0], *self.operator.in_shape).clone())
