"""Fixed-point models of the restarted-JFB paper (Davy, Briceno-Arias, Pustelnik 2025), as weight-tied steps.

Both follow the step contract of :class:`deepunroll.nets.lpgd.LPGDStep` (state x (B, *x_shape),
direction d_k = J(x_k)^T (F(x_k) - y), possibly replaced by an accelerator's v_k) and apply the same
map at every iteration, so they train under every ``net.backprop`` mode. The step size is bounded,
gamma = max_step * sigmoid(.), which keeps the gradient step x - gamma v from overshooting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepunroll.nets.blocks import conv_block
from deepunroll.nets.data_term import DataTerm
from deepunroll.validation import POSITIVE, POSITIVE_INT, check_all


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _softplus_inverse(v: float) -> float:
    return v + math.log(-math.expm1(-v))


class _BoundedStep(nn.Module):
    """The learned step size gamma = max_step * sigmoid(theta) in (0, max_step)."""

    RULES = {"step_size": POSITIVE, "max_step": POSITIVE, "reg_level": POSITIVE}

    def __init__(self, step_size: float, max_step: float) -> None:
        super().__init__()
        check_all("net.step", self.RULES, {"step_size": step_size, "max_step": max_step})
        if not step_size < max_step:
            raise ValueError(f"net.step.step_size={step_size}; expected 0 < step_size < max_step={max_step}")
        self.max_step = float(max_step)
        self.step_logit = nn.Parameter(torch.tensor(_logit(step_size / max_step)))

    @property
    def step_size(self) -> torch.Tensor:
        return self.max_step * torch.sigmoid(self.step_logit)

    def init_state(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x0

    def direction(self, k: int, x: torch.Tensor, data: DataTerm) -> tuple[torch.Tensor, torch.Tensor]:
        return x, data.misfit_grad(x)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PnPStep(_BoundedStep):
    """Plug-and-Play forward-backward: x_{k+1} = D_sigma(x_k - gamma v_k), D_sigma(z) = z - R([z, sigma]).

    R: a small CNN (``n_conv`` convolutions, ``hidden`` channels) reading z and a constant channel
    holding the regularisation level sigma = softplus(.) > 0; gamma in (0, max_step) and sigma are learned.
    """

    weight_tied = True

    def __init__(self, x_shape: tuple[int, ...], hidden: int = 16, n_conv: int = 3, step_size: float = 0.5,
                 max_step: float = 2.0, reg_level: float = 0.1) -> None:
        super().__init__(step_size, max_step)
        check_all("net.step", self.RULES, {"reg_level": reg_level})
        self.sigma_raw = nn.Parameter(torch.tensor(_softplus_inverse(reg_level)))
        self.denoiser = conv_block(2, 1, hidden, n_conv, len(x_shape))

    @property
    def reg_level(self) -> torch.Tensor:
        return F.softplus(self.sigma_raw)

    def denoise(self, z: torch.Tensor) -> torch.Tensor:
        sigma = self.reg_level.to(z.dtype).expand_as(z)
        return z - self.denoiser(torch.stack([z, sigma], dim=1))[:, 0]

    def update(self, k: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.denoise(x - self.step_size.to(x.dtype) * v)

    def learned_scalars(self) -> dict[str, float]:
        return {"step_size": float(self.step_size.detach()), "reg_level": float(self.reg_level.detach())}


class WeightedNormStep(_BoundedStep):
    """Gradient step on f(x) + lambda/2 sum_c w_c ||L_c x||^2 (a learned weighted-norm regulariser):

    x_{k+1} = x_k - gamma (v_k + lambda L^T diag(w) L x_k),  L: ``n_filters`` learned kernels of size 3
    (initialised as finite differences), w = softplus(.) > 0 per filter, lambda = softplus(.) > 0.
    For a convex data term its fixed points are the minimisers of that objective.
    """

    weight_tied = True
    RULES = _BoundedStep.RULES | {"n_filters": POSITIVE_INT}

    def __init__(self, x_shape: tuple[int, ...], n_filters: int = 4, step_size: float = 0.5, max_step: float = 2.0,
                 reg_level: float = 0.1) -> None:
        super().__init__(step_size, max_step)
        check_all("net.step", self.RULES, {"reg_level": reg_level, "n_filters": n_filters})
        self.dim = len(x_shape)
        if self.dim not in (1, 2):
            raise ValueError(f"WeightedNormStep: x_shape={x_shape}; expected 1D signals / element vectors or 2D images")
        kernels = 0.1 * torch.randn(n_filters, 1, *[3] * self.dim, generator=torch.Generator().manual_seed(0))
        difference = torch.tensor([-1.0, 1.0, 0.0])  # a finite difference (along the last axis) to start from
        kernels[0, 0] = difference if self.dim == 1 else F.pad(difference[None], (0, 0, 1, 1))
        self.filters = nn.Parameter(kernels)
        self.weight_raw = nn.Parameter(torch.zeros(n_filters))
        self.lambda_raw = nn.Parameter(torch.tensor(_softplus_inverse(reg_level)))

    @property
    def reg_level(self) -> torch.Tensor:
        return F.softplus(self.lambda_raw)

    def regulariser_grad(self, x: torch.Tensor) -> torch.Tensor:
        """lambda L^T diag(w) L x: (B, *x_shape)."""
        conv, conv_t = (F.conv1d, F.conv_transpose1d) if self.dim == 1 else (F.conv2d, F.conv_transpose2d)
        filters = self.filters.to(x.dtype)
        analysis = conv(x.unsqueeze(1), filters, padding=1)
        weights = F.softplus(self.weight_raw).to(x.dtype).reshape(1, -1, *[1] * self.dim)
        return self.reg_level.to(x.dtype) * conv_t(weights * analysis, filters, padding=1)[:, 0]

    def update(self, k: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x - self.step_size.to(x.dtype) * (v + self.regulariser_grad(x))

    def learned_scalars(self) -> dict[str, float]:
        return {"step_size": float(self.step_size.detach()), "reg_level": float(self.reg_level.detach())}
