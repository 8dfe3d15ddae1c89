"""Gradient accelerators: map the raw data-fit direction d_k to the direction v_k fed to a step.

Interface: ``init_state(d) -> state`` (zero state for a batch shaped like d) and
``forward(d, state) -> (v, state)``; one module is shared by all iterations. A class's ``RULES``
({argument: rule}, :mod:`deepunroll.validation`) are its ``accel.*`` checks: the constructor applies them,
and :func:`deepunroll.validation.check_target` applies them to a config before anything is built.
Sign convention (as in Zhou et al., Inverse Problems 2024): d_k = J(x_k)^T (F(x_k) - y).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepunroll.validation import POSITIVE, POSITIVE_INT, UNIT_INTERVAL, check_all, is_number


class NoAcceleration(nn.Module):
    """v_k = d_k."""

    def init_state(self, d: torch.Tensor) -> None:
        return None

    def forward(self, d: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return d, None


class Momentum(nn.Module):
    """Momentum baseline (MA): v_k = beta v_{k-1} + eta d_k, v_{-1} = 0."""

    RULES = {"beta": UNIT_INTERVAL, "eta": POSITIVE}

    def __init__(self, beta: float = 0.8, eta: float = 1e-3) -> None:
        super().__init__()
        check_all("accel", self.RULES, {"beta": beta, "eta": eta})
        self.beta, self.eta = float(beta), float(eta)

    def init_state(self, d: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(d)

    def forward(self, d: torch.Tensor, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        velocity = self.beta * velocity + self.eta * d
        return velocity, velocity


class RMA(nn.Module):
    """Recurrent momentum acceleration: a recurrent cell reads d_k, a linear layer writes v_k.

    h_k = Cell(d_k, h_{k-1}) (state carried across iterations, zero-initialised);
    v_k = Linear(concat of the final hidden states of all ``layers``) reshaped like d_k.
    d: (B, *x_shape) is flattened to (B, prod(x_shape)) before the cell.
    LSTM forget-gate biases start at ``forget_bias`` (input-side bias, hidden-side bias 0; default 1). The
    published code set 1 in both PyTorch bias vectors, an effective 2 (``forget_bias=2``, experiment
    ``toy_lpgd_rma_authors``); it also re-fed the whole gradient history to the LSTM from a random state at
    every iteration, which we do not: our state is carried and zero-initialised (README, RMA as published).
    """

    CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
    RULES = {"cell": (lambda v: v in RMA.CELLS, "one of lstm, gru (the convolutional LSTM for images: accel=convlstm)"),
             "hidden": POSITIVE_INT, "layers": POSITIVE_INT, "forget_bias": (is_number, "a number")}

    def __init__(self, x_shape: tuple[int, ...], cell: str = "lstm", hidden: int = 128, layers: int = 1,
                 forget_bias: float = 1.0) -> None:
        super().__init__()
        check_all("accel", self.RULES, {"cell": cell, "hidden": hidden, "layers": layers, "forget_bias": forget_bias})
        n_features = math.prod(x_shape)
        self.cell_type, self.hidden, self.layers = cell, int(hidden), int(layers)
        self.rnn = self.CELLS[cell](n_features, self.hidden, num_layers=self.layers, batch_first=True)
        self.readout = nn.Linear(self.layers * self.hidden, n_features)
        if cell == "lstm":
            with torch.no_grad():
                for name, bias in self.rnn.named_parameters():
                    if name.startswith("bias_"):
                        bias[self.hidden : 2 * self.hidden] = float(forget_bias) if name.startswith("bias_ih") else 0.0

    def init_state(self, d: torch.Tensor):
        h0 = d.new_zeros(self.layers, d.shape[0], self.hidden)
        return (h0, torch.zeros_like(h0)) if self.cell_type == "lstm" else h0

    def forward(self, d: torch.Tensor, state):
        if self.cell_type == "lstm":
            state = self._lstm_step(d.flatten(1), state)
            hidden = state[0]
        else:
            _, state = self.rnn(d.flatten(1).unsqueeze(1), state)
            hidden = state
        v = self.readout(hidden.transpose(0, 1).flatten(1))
        return v.reshape(d.shape), state

    def _lstm_step(self, inputs: torch.Tensor, state):
        """One time step of ``self.rnn`` (its own weights, PyTorch's gate order i, f, g, o) as two matrix
        products per layer: the same function as calling the LSTM on a length-1 sequence, about 2.5x faster
        for the 20 single steps of an unrolled network on CPU (mkldnn's sequence kernel pays its setup per call).
        inputs (B, features); state (h, c), each (layers, B, hidden)."""
        h_prev, c_prev = state
        hs, cs = [], []
        for layer in range(self.layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self.rnn, f"{name}_l{layer}")
                                      for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            gates = nn.functional.linear(inputs, w_ih, b_ih) + nn.functional.linear(h_prev[layer], w_hh, b_hh)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c_prev[layer] + torch.sigmoid(i) * torch.tanh(g)
            inputs = torch.sigmoid(o) * torch.tanh(c)
            hs.append(inputs)
            cs.append(c)
        return torch.stack(hs), torch.stack(cs)
