"""Reconstruction metrics, per sample (REFERENCE.md, Metrics: "ours").

All take x_hat, x of shape (B, *shape) and return (B,) tensors.
"""

from __future__ import annotations

import torch


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean((x_hat - x)^2) per sample."""
    return (x_hat - x).flatten(1).square().mean(1)


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x_hat - x||_2 / ||x||_2 per sample."""
    return (x_hat - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


def data_range(x: torch.Tensor) -> torch.Tensor:
    """max(x) - min(x) of each ground-truth sample."""
    flat = x.flatten(1)
    return flat.max(1).values - flat.min(1).values


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """10 log10(R^2 / MSE) with R = that sample's ground-truth range (scikit-image's definition)."""
    return 10 * torch.log10(data_range(x).square() / mse(x_hat, x))


def dynamic_range(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(max x_hat - min x_hat) / (max x - min x) * 100 %."""
    return 100 * data_range(x_hat) / data_range(x)


METRICS = {"mse": mse, "rel_err": relative_error, "psnr": psnr, "dr": dynamic_range}


def select(names) -> dict:
    """{name: fn} for the names in ``data.metrics``; unknown names are an error listing the known ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"data.metrics: unknown {unknown}; expected names from {sorted(METRICS)}")
    return {n: METRICS[n] for n in names}
