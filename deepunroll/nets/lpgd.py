"""Learned proximal gradient descent step: x_{k+1} = x_k + Lambda_k([x_k, v_k])."""

from __future__ import annotations

import functools

import torch
from torch import nn

from deepunroll.nets.blocks import conv_block, per_iteration
from deepunroll.nets.data_term import DataTerm


class LPGDStep(nn.Module):
    """One LPGD iteration; v_k is the (accelerated) data-fit direction d_k = J^T (F(x_k) - y).

    State: x (B, *x_shape). Lambda_k: Conv(2->hidden) PReLU ... Conv(hidden->1) with ``n_conv``
    convolutions over the spatial dims of x (1D for signals / element vectors, 2D for images).
    ``zero_init``: the last convolution of every block starts at zero (the untrained net returns x0).
    """

    def __init__(
        self, n_iter: int, x_shape: tuple[int, ...], hidden: int = 32, n_conv: int = 4, share_weights: bool = False,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        block = functools.partial(conv_block, 2, 1, hidden, n_conv, len(x_shape), zero_init)
        self.blocks = per_iteration(block, n_iter, share_weights)

    def init_state(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x0

    def direction(self, k: int, x: torch.Tensor, data: DataTerm) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (state, d_k) with d_k = J(x_k)^T (F(x_k) - y)."""
        return x, data.misfit_grad(x)

    def update(self, k: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        block = self.blocks[k % len(self.blocks)]
        return x + block(torch.stack([x, v], dim=1))[:, 0]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return x
