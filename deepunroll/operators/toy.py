"""The published 1D nonlinear deconvolution ("toy") problem (Zhou et al., Inverse Problems 2024, first problem)."""

from __future__ import annotations

import math

import numpy as np
import torch

from deepunroll.operators.base import ForwardOperator
from deepunroll.validation import NON_NEGATIVE_INT, POSITIVE_INT, check_all, is_number


def draw_kernels(window: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded W1 (window, window) and W2 (window,) as published.

    W1: uniform [0, 1), strictly lower triangle zeroed, normalised to sum 1.
    W2: |N(0, 1)| draws normalised to sum 1.
    """
    rng = np.random.default_rng(seed)
    w1 = np.triu(rng.uniform(size=(window, window)))
    w2 = np.abs(rng.standard_normal(window))
    return w1 / w1.sum(), w2 / w2.sum()


class NonlinearConv1d(ForwardOperator):
    """Windowed quadratic model y_i = a x_w^T W1 x_w + W2^T x_w, one window per measurement.

    Window i covers samples [i*stride, i*stride + window): with the published
    signal_length=53, window=9, stride=4 that is 12 windows centred at 4, 8, ..., 48.
    x: (B, signal_length) -> y: (B, n_windows). Unitless.
    """

    RULES = {"signal_length": POSITIVE_INT, "window": POSITIVE_INT, "stride": POSITIVE_INT,
             "a": (lambda v: is_number(v) and math.isfinite(v), "a finite number"), "seed": NON_NEGATIVE_INT}

    def __init__(
        self,
        signal_length: int = 53,
        window: int = 9,
        stride: int = 4,
        a: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float64,
    ) -> None:
        super().__init__()
        check_all("operator", self.RULES, {"signal_length": signal_length, "window": window, "stride": stride,
                                           "a": a, "seed": seed})
        if window > signal_length:
            raise ValueError(f"operator.window={window} exceeds operator.signal_length={signal_length}")
        self.signal_length, self.window, self.stride = int(signal_length), int(window), int(stride)
        self.a, self.seed = float(a), int(seed)
        n_windows = (self.signal_length - self.window) // self.stride + 1
        self.in_shape, self.out_shape = (self.signal_length,), (n_windows,)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        w1, w2 = draw_kernels(self.window, self.seed)
        self.register_buffer("W1", torch.as_tensor(w1, dtype=dtype))
        self.register_buffer("W2", torch.as_tensor(w2, dtype=dtype))
        starts = torch.arange(n_windows) * self.stride
        self.register_buffer("window_index", starts[:, None] + torch.arange(self.window), persistent=False)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        return x.unfold(-1, self.window, self.stride)  # (B, n_windows, window)

    def _window_grads(self, x: torch.Tensor) -> torch.Tensor:
        """Row i of the Jacobian on its window: a (W1 + W1^T) x_w + W2, shape (B, n_windows, window)."""
        w1, w2 = self.W1.to(x.dtype), self.W2.to(x.dtype)
        return self.a * self._windows(x) @ (w1 + w1.T) + w2

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = self._windows(x)
        w1, w2 = self.W1.to(x.dtype), self.W2.to(x.dtype)
        return self.a * torch.einsum("bmi,ij,bmj->bm", xw, w1, xw) + xw @ w2

    def _vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        contributions = (v[..., None] * self._window_grads(x)).flatten(1)
        index = self.window_index.flatten().expand(x.shape[0], -1)
        return torch.zeros_like(x).scatter_add(1, index, contributions)

    def _jacobian(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_windows = x.shape[0], self.out_shape[0]
        jac = x.new_zeros(batch, n_windows, self.signal_length)
        index = self.window_index.expand(batch, -1, -1)
        return jac.scatter(2, index, self._window_grads(x))

    def metadata(self) -> dict:
        meta = super().metadata()
        meta.update(
            signal_length=self.signal_length,
            window=self.window,
            stride=self.stride,
            a=self.a,
            seed=self.seed,
            W1=self.W1.cpu().numpy(),
            W2=self.W2.cpu().numpy(),
        )
        return meta
