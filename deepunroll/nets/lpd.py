"""Learned primal-dual step (Adler & Oktem 2018) for a nonlinear operator."""

from __future__ import annotations

import functools

import torch
from torch import nn

from deepunroll.nets.blocks import make_block, per_iteration
from deepunroll.nets.data_term import DataTerm


class LPDStep(nn.Module):
    """One LPD iteration on state (x (B, P, *x_shape), h (B, D, *y_shape)).

    dual:   h <- h + Gamma_k([h, F(x[1]), y])          (3 convolutions, D+2 -> D)
    primal: x <- x + Lambda_k([x, v])                   (4 convolutions, P+1 -> P)
    where v is the (accelerated) direction d = J(x[0])^T h[0]. Output x[0]. F(x), y and J^T h are presented
    as ``net.direction`` says (:mod:`deepunroll.nets.direction`; raw: as written here).
    ``zero_init``: the last convolution of every block starts at zero (the untrained net returns x0).
    ``block``: the primal blocks' architecture (:func:`deepunroll.nets.blocks.make_block`); dual blocks are CNNs.
    ``element_mesh``: the operator's (nodes, elements) or None, filled by the builder (``block=mesh`` reads it).
    """

    def __init__(
        self,
        n_iter: int,
        x_shape: tuple[int, ...],
        y_shape: tuple[int, ...],
        primal_channels: int = 5,
        dual_channels: int = 5,
        hidden: int = 32,
        share_weights: bool = False,
        zero_init: bool = False,
        block: str = "cnn",
        element_mesh=None,
    ) -> None:
        super().__init__()
        if primal_channels < 2:
            raise ValueError(f"net.step.primal_channels={primal_channels}; expected >= 2 (F is applied to x[1])")
        self.primal_channels, self.dual_channels = primal_channels, dual_channels
        self.y_shape = tuple(y_shape)
        dual = functools.partial(make_block, "cnn", dual_channels + 2, dual_channels, hidden, 3, len(y_shape), zero_init)
        primal = functools.partial(make_block, block, primal_channels + 1, primal_channels, hidden, 4, len(x_shape),
                                   zero_init, element_mesh)
        self.dual_blocks = per_iteration(dual, n_iter, share_weights)
        self.primal_blocks = per_iteration(primal, n_iter, share_weights)

    def init_state(self, x0: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x0.unsqueeze(1).repeat_interleave(self.primal_channels, dim=1)
        h = y.new_zeros((y.shape[0], self.dual_channels, *self.y_shape))
        return x, h

    def direction(self, k: int, state, data: DataTerm):
        """Dual update, then d = J(x[0])^T h[0]; returns ((x, h), d)."""
        x, h = state
        gamma = self.dual_blocks[k % len(self.dual_blocks)]
        h = h + gamma(torch.cat([h, data.forward(x[:, 1]).unsqueeze(1), data.target.unsqueeze(1)], dim=1))
        return (x, h), data.vjp(x[:, 0], h[:, 0])

    def update(self, k: int, state, v: torch.Tensor):
        x, h = state
        primal = self.primal_blocks[k % len(self.primal_blocks)]
        return x + primal(torch.cat([x, v.unsqueeze(1)], dim=1)), h

    def output(self, state) -> torch.Tensor:
        return state[0][:, 0]
