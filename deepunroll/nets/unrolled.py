"""UnrolledNet: the loop of (step, accelerator) calls that turns y into a reconstruction."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deepunroll.nets.data_term import DataTerm
from deepunroll.nets.direction import DataFit
from deepunroll.operators.base import ForwardOperator
from deepunroll.nets.backprop import Backprop, make_backprop
from deepunroll.optim.fixed_point import FlatState


class UnrolledNet(nn.Module):
    """x_K from K iterations of: (state, d_k) = step.direction(...); v_k = accel(d_k); step.update(...).

    y: (B, *operator.out_shape), x0: (B, *operator.in_shape) -> x_K: (B, *operator.in_shape).
    ``grad_through_operator=False`` treats operator outputs as data (no graph through the physics).
    ``initial_guess(operator, y) -> x0`` is used by :meth:`reconstruct` when no x0 is given.
    ``backprop``: a strategy of :mod:`deepunroll.nets.backprop` (``make_backprop(mode, **settings)``), or a
    mode name (full, checkpoint, jfb, restarted_jfb, deq) with default settings. The fixed-point modes iterate
    the weight-tied map T(z) = :meth:`iteration` on z = (step state, accelerator state).
    ``data_fit``: how F, J and y are presented to the blocks (``net.direction``,
    :mod:`deepunroll.nets.direction`); default ``raw``, the published input.
    """

    def __init__(
        self,
        operator: ForwardOperator,
        step: nn.Module,
        accelerator: nn.Module,
        n_iter: int,
        grad_through_operator: bool = False,
        initial_guess: Callable[[ForwardOperator, torch.Tensor], torch.Tensor] | None = None,
        backprop: Backprop | str = "full",
        data_fit: DataFit | None = None,
    ) -> None:
        super().__init__()
        if int(n_iter) != n_iter or n_iter <= 0:
            raise ValueError(f"net.n_iter={n_iter!r}; expected a positive integer")
        self.operator, self.step, self.accelerator = operator, step, accelerator
        self.n_iter, self.grad_through_operator = int(n_iter), bool(grad_through_operator)
        self.initial_guess = initial_guess
        self.data_fit = data_fit if data_fit is not None else DataFit(operator, "raw")
        self.backprop = make_backprop(backprop) if isinstance(backprop, str) else backprop
        if self.backprop.fixed_point and not self.weight_tied:
            raise ValueError(
                f"backprop={self.backprop.mode} needs a weight-tied map (one block at every iteration): set "
                "net.step.share_weights=true, or choose a fixed-point model (net=lpgd_tied, lpd_tied, pnp, weighted_norm)"
            )

    @property
    def weight_tied(self) -> bool:
        """True when every iteration applies the same map (a step may say so with a ``weight_tied`` attribute)."""
        tied = getattr(self.step, "weight_tied", None)
        if tied is not None:
            return bool(tied)
        return all(len(m) == 1 for m in self.step.children() if isinstance(m, nn.ModuleList))

    def initial_state(self, x0: torch.Tensor, y: torch.Tensor):
        """z0 = (step state, zero accelerator state); the accelerator state is shaped like d_k, i.e. like x0."""
        return self.step.init_state(x0, y), self.accelerator.init_state(torch.zeros_like(x0))

    def iteration(self, k: int, z, data: DataTerm):
        """One iteration on z = (step state, accelerator state): direction, acceleration, update."""
        state, accel_state = z
        state, direction = self.step.direction(k, state, data)
        velocity, accel_state = self.accelerator(direction, accel_state)
        return self.step.update(k, state, velocity), accel_state

    def forward(self, y: torch.Tensor, x0: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``index`` (B,): dataset indices, used by ``restarted_jfb`` warm starts in training mode."""
        self.operator.check_input(y, "y", self.operator.out_shape)
        self.operator.check_input(x0, "x0")
        data = DataTerm(self.operator, y, self.grad_through_operator, self.data_fit)
        state, _ = self.backprop(self, self.initial_state(x0, y), data, index)
        return self.step.output(state)

    def diagnostics(self, y: torch.Tensor, x0: torch.Tensor, n_power: int = 5) -> dict[str, float]:
        """For a weight-tied map T: Lipschitz estimates ||J_T(z)||_2 (:func:`jacobian_norm`) at the state z reached
        by ``n_iter`` iterations from x0, and the step's learned scalars (``step.learned_scalars()``); {} otherwise.

        ``lipschitz``: the map the forward pass iterates, its data-fit term differentiated through the
        operator (whatever ``grad_through_operator`` says). ``lipschitz_detached`` (only with
        ``grad_through_operator=False``): the map with F(x), J(x) and the data-fit direction held constant,
        the one training differentiates in ``full`` mode and with ``backprop.jacobian=detached``.
        y: (B, *out_shape), x0: (B, *in_shape).
        """
        if not self.weight_tied:
            return {}
        from deepunroll.nets.lipschitz import jacobian_norm

        data = DataTerm(self.operator, y, self.grad_through_operator, self.data_fit)
        with torch.no_grad():
            z = self.initial_state(x0, y)
            for k in range(self.n_iter):
                z = self.iteration(0, z, data)
        flat = FlatState(z)

        def norm(through_operator: bool) -> float:
            d = data.with_operator_graph(through_operator)
            return jacobian_norm(lambda u: flat.flatten(self.iteration(0, flat.unflatten(u), d)), flat.flatten(z),
                                 n_power)

        out = {"lipschitz": norm(True)}
        if not self.grad_through_operator:
            out["lipschitz_detached"] = norm(False)
        scalars = getattr(self.step, "learned_scalars", None)
        return out | (scalars() if scalars else {})

    @torch.no_grad()
    def reconstruct(self, y: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct from measurements y (B, *out_shape) in eval mode; x0 defaults to the problem's initial guess."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            y = y.to(device=param.device, dtype=param.dtype)
            if x0 is None:
                x0 = (
                    self.initial_guess(self.operator, y)
                    if self.initial_guess is not None
                    else y.new_zeros((y.shape[0], *self.operator.in_shape))
                )
            return self(y, x0.to(device=param.device, dtype=param.dtype))
        finally:
            self.train(was_training)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
