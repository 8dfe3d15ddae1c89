"""Learned proximal gradient descent step: x_{k+1} = x_k + Lambda_k([x_k, v_k])."""

from __future__ import annotations

import functools

import torch
from torch import nn

from deepunroll.nets.blocks import make_block, per_iteration
from deepunroll.nets.data_term import DataTerm


class LPGDStep(nn.Module):
    """One LPGD iteration; v_k is the (accelerated) data-fit direction d_k (``net.direction``; raw:
    J^T (F(x_k) - y)).

    State: x (B, *x_shape). Lambda_k: Conv(2+aux->hidden) PReLU ... Conv(hidden->1) with ``n_conv``
    convolutions over the spatial dims of x (1D for signals / element vectors, 2D for images); its
    inputs are x, v and ``aux_channels`` per-sample features of the direction (constant channels).
    ``zero_init``: the last convolution of every block starts at zero (the untrained net returns x0).
    ``step_size``: if not None, a learned scalar alpha_k per block (initialised to it) adds the explicit
    data step -alpha_k v_k: x_{k+1} = x_k - alpha_k v_k + Lambda_k(...).
    ``block``: the architecture of Lambda_k (:func:`deepunroll.nets.blocks.make_block`: cnn, mesh, dncnn, drunet);
    ``element_mesh`` (the operator's (nodes, elements) or None) is filled by the builder for ``block=mesh``.
    ``feed_direction``: Lambda_k also reads d_k itself, next to the accelerated v_k (not published). RMA writes v_k
    through a ``accel.hidden``-wide linear layer, so without it the blocks see d_k only through that bottleneck
    (128 numbers for the 686 elements of the h0=0.1 EIT mesh).
    """

    def __init__(
        self, n_iter: int, x_shape: tuple[int, ...], hidden: int = 32, n_conv: int = 4, share_weights: bool = False,
        zero_init: bool = False, aux_channels: int = 0, step_size: float | None = None, block: str = "cnn",
        feed_direction: bool = False, element_mesh=None,
    ) -> None:
        super().__init__()
        self.feed_direction = bool(feed_direction)
        in_channels = 2 + aux_channels + int(self.feed_direction)
        block = functools.partial(make_block, block, in_channels, 1, hidden, n_conv, len(x_shape), zero_init,
                                  element_mesh)
        self.blocks = per_iteration(block, n_iter, share_weights)
        self.step_sizes = None if step_size is None else nn.Parameter(torch.full((len(self.blocks),), float(step_size)))

    def init_state(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x0

    def direction(self, k: int, x: torch.Tensor, data: DataTerm):
        """Returns ((x_k, aux, d_k or None), d_k); aux (B,) or None are the direction's extra features; d_k rides
        along in the state only with ``feed_direction``."""
        d, aux = data.misfit_direction(x)
        return (x, aux, d if self.feed_direction else None), d

    def update(self, k: int, state, v: torch.Tensor) -> torch.Tensor:
        x, aux, d = state
        block = self.blocks[k % len(self.blocks)]
        channels = [x, v] + ([] if d is None else [d])
        if aux is not None:
            channels.append(aux.view(-1, *[1] * (x.dim() - 1)).expand_as(x))
        x_next = x + block(torch.stack(channels, dim=1))[:, 0]
        if self.step_sizes is not None:
            x_next = x_next - self.step_sizes[k % len(self.blocks)].to(x.dtype) * v
        return x_next

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return x
