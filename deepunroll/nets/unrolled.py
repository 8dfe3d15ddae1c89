"""UnrolledNet: the loop of (step, accelerator) calls that turns y into a reconstruction."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deepunroll.nets.data_term import DataTerm
from deepunroll.operators.base import ForwardOperator


class UnrolledNet(nn.Module):
    """x_K from K iterations of: (state, d_k) = step.direction(...); v_k = accel(d_k); step.update(...).

    y: (B, *operator.out_shape), x0: (B, *operator.in_shape) -> x_K: (B, *operator.in_shape).
    ``grad_through_operator=False`` treats operator outputs as data (no graph through the physics).
    ``initial_guess(operator, y) -> x0`` is used by :meth:`reconstruct` when no x0 is given.
    """

    def __init__(
        self,
        operator: ForwardOperator,
        step: nn.Module,
        accelerator: nn.Module,
        n_iter: int,
        grad_through_operator: bool = False,
        initial_guess: Callable[[ForwardOperator, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if int(n_iter) != n_iter or n_iter <= 0:
            raise ValueError(f"net.n_iter={n_iter!r}; expected a positive integer")
        self.operator, self.step, self.accelerator = operator, step, accelerator
        self.n_iter, self.grad_through_operator = int(n_iter), bool(grad_through_operator)
        self.initial_guess = initial_guess

    def forward(self, y: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        self.operator.check_input(y, "y", self.operator.out_shape)
        self.operator.check_input(x0, "x0")
        data = DataTerm(self.operator, y, self.grad_through_operator)
        state, accel_state = self.step.init_state(x0, y), None
        for k in range(self.n_iter):
            state, direction = self.step.direction(k, state, data)
            if accel_state is None:
                accel_state = self.accelerator.init_state(direction)
            velocity, accel_state = self.accelerator(direction, accel_state)
            state = self.step.update(k, state, velocity)
        return self.step.output(state)

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
