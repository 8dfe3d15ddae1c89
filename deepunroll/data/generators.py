"""Ground-truth generators and the measurement noise model.

A generator is any object with ``sample(operator, n, generator, split) -> x (n, *in_shape)`` and
``metadata() -> dict``; the initial guess x0 is a separate object (the ``x0`` config group,
:mod:`deepunroll.initial_guess`).
"""

from __future__ import annotations

import torch

from deepunroll.operators.base import ForwardOperator


def add_relative_noise(y: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """y + e with e ~ N(0, s^2 I) per sample, s = level * ||y||_2 / sqrt(m), so ||e|| ~ level * ||y||.

    y: (B, *out_shape). ``level=0`` returns y unchanged.
    """
    if level < 0:
        raise ValueError(f"data.noise={level}; expected >= 0")
    if level == 0:
        return y
    flat = y.flatten(1)
    scale = level * flat.norm(dim=1, keepdim=True) / flat.shape[1] ** 0.5
    noise = torch.randn(flat.shape, generator=generator, dtype=y.dtype, device=y.device)
    return (flat + scale * noise).reshape(y.shape)


def add_scaled_noise(y: torch.Tensor, level: float, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """y + level * std * e, e ~ N(0, I): y (B, *out_shape), std (*out_shape) per-entry standard deviations (an
    operator's noise model, e.g. ``KTCDifferenceCEM.noise_std()``). ``level=0`` returns y unchanged."""
    if level < 0:
        raise ValueError(f"data.noise={level}; expected >= 0")
    if level == 0:
        return y
    noise = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    return y + level * std.to(y.dtype) * noise


class RandomWalkSignals:
    """Published toy signals: x_1 ~ N(0,1), x_{j+1} ~ Laplace(x_j, step_scale); all-positive draws kept;
    each signal min-max rescaled to [-1, 1]. Initial guess x0 = 0.
    """

    def __init__(self, step_scale: float = 0.5) -> None:
        if step_scale <= 0:
            raise ValueError(f"data.generator.step_scale={step_scale}; expected > 0")
        self.step_scale = float(step_scale)

    def sample(self, operator: ForwardOperator, n: int, generator: torch.Generator, split: str = "") -> torch.Tensor:
        """(n, signal_length) signals in [-1, 1], float64, by vectorised rejection sampling."""
        length = operator.in_shape[0]
        accepted: list[torch.Tensor] = []
        n_accepted = 0
        while n_accepted < n:
            batch = max(4 * (n - n_accepted), 1024)
            start = torch.randn(batch, 1, generator=generator, dtype=torch.float64)
            u = torch.rand(batch, length - 1, generator=generator, dtype=torch.float64) - 0.5
            steps = -self.step_scale * torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, b) by inverse CDF
            walks = torch.cumsum(torch.cat([start, steps], dim=1), dim=1)
            walks = walks[(walks > 0).all(dim=1)]
            accepted.append(walks)
            n_accepted += walks.shape[0]
        x = torch.cat(accepted)[:n]
        low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return 2 * (x - low) / (high - low) - 1

    def metadata(self) -> dict:
        return {"generator": type(self).__name__, "step_scale": self.step_scale}
