"""Convolutional LSTM accelerator: RMA for images, d_k (B, H, W) -> v_k (B, H, W).

(h_k, c_k) = ConvLSTM(d_k, (h_{k-1}, c_{k-1})) per layer; v_k = Conv1x1(concat of all layers' h_k).
"""

from __future__ import annotations

import torch
from torch import nn

from deepunroll.validation import POSITIVE_INT, check_all, is_int


class ConvLSTMCell(nn.Module):
    """One ConvLSTM layer: [i, f, g, o] = Conv([input, h]); c' = f c + i g; h' = o tanh(c').

    input (B, C_in, H, W), h and c (B, C_h, H, W); 'same' padding, gates in PyTorch's LSTM order.
    The forget-gate bias starts at 1.
    """

    def __init__(self, channels_in: int, channels_hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.channels_hidden = channels_hidden
        channels = channels_in + channels_hidden
        self.gates = nn.Conv2d(channels, 4 * channels_hidden, kernel_size, padding=kernel_size // 2)
        with torch.no_grad():
            self.gates.bias[channels_hidden : 2 * channels_hidden] = 1.0

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, cell = state
        i, f, g, o = self.gates(torch.cat([x, hidden], 1)).chunk(4, 1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell), cell


class ConvLSTMAccelerator(nn.Module):
    """RMA with a convolutional LSTM: v_k = Conv1x1([h_k^1, ..., h_k^L]), h_k^l from a stacked ConvLSTM.

    d (B, H, W) -> v (B, H, W); state: tuple of (h, c) per layer, each (B, channels_hidden, H, W),
    zero-initialised and carried across iterations; one module shared by all iterations.
    Parameters (``accel.*``): channels_hidden, kernel_size (odd), layers. ``x_shape`` is filled in
    from the operator when built from config and must be 2D (H, W).
    """

    RULES = {"channels_hidden": POSITIVE_INT, "layers": POSITIVE_INT,
             "kernel_size": (lambda v: is_int(v) and v > 0 and v % 2 == 1, "an odd positive integer")}

    def __init__(
        self,
        channels_hidden: int = 16,
        kernel_size: int = 3,
        layers: int = 1,
        x_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_all("accel", self.RULES, {"channels_hidden": channels_hidden, "layers": layers, "kernel_size": kernel_size})
        if x_shape is not None and len(x_shape) != 2:
            raise ValueError(
                f"the convolutional LSTM accelerator needs 2D images (H, W), but the operator's x_shape is "
                f"{tuple(x_shape)}; use the fully connected LSTM (accel=rma) for other shapes"
            )
        self.channels_hidden, self.kernel_size, self.layers = int(channels_hidden), int(kernel_size), int(layers)
        self.cells = nn.ModuleList(
            ConvLSTMCell(1 if layer == 0 else self.channels_hidden, self.channels_hidden, self.kernel_size)
            for layer in range(self.layers)
        )
        self.readout = nn.Conv2d(self.layers * self.channels_hidden, 1, 1)

    def init_state(self, d: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Zero (h, c) per layer, each (B, channels_hidden, H, W), on d's device and dtype."""
        if d.dim() != 3:
            raise ValueError(f"ConvLSTMAccelerator: d must have shape (B, H, W), got {tuple(d.shape)}")
        zeros = d.new_zeros(d.shape[0], self.channels_hidden, *d.shape[1:])
        return tuple((zeros, zeros) for _ in range(self.layers))

    def forward(self, d: torch.Tensor, state) -> tuple[torch.Tensor, tuple]:
        """v_k (B, H, W) and the new state from d_k (B, H, W) and the previous state."""
        if d.dim() != 3:
            raise ValueError(f"ConvLSTMAccelerator: d must have shape (B, H, W), got {tuple(d.shape)}")
        layer_input, new_state = d.unsqueeze(1), []
        for cell, layer_state in zip(self.cells, state):
            hidden, memory = cell(layer_input, layer_state)
            new_state.append((hidden, memory))
            layer_input = hidden
        velocity = self.readout(torch.cat([hidden for hidden, _ in new_state], 1))
        return velocity[:, 0], tuple(new_state)
