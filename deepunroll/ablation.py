"""Does a trained network use the measurements? Test error with the data term removed or with y swapped.

A network that unrolls the physics must get worse when (a) the data-fit directions it reads are
replaced by zeros (``misfit_grad`` and ``vjp`` return 0: what is left is a post-processing CNN of x0
with the trained weights) and worse still when (b) every sample is given another sample's
measurements y (same x0). A post-processing network is unchanged by both.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from deepunroll import metrics
from deepunroll.data.datasets import InverseProblemDataset


def _data_fit(model: nn.Module):
    inner = getattr(model, "net", model)  # GridDomainNet wraps an UnrolledNet
    return inner.data_fit


@contextmanager
def data_term_removed(model: nn.Module):
    """Within the block, every data-fit direction the network reads is zero."""
    fit = _data_fit(model)
    before, fit.disabled = fit.disabled, True
    try:
        yield model
    finally:
        fit.disabled = before


@torch.no_grad()
def split_mse(model: nn.Module, dataset: InverseProblemDataset, y: torch.Tensor | None = None, batch_size: int = 64) -> float:
    """Mean squared error of model(y, x0) against x over the dataset (y defaults to the dataset's)."""
    model.eval()
    y = dataset.y if y is None else y
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(dataset), batch_size):
        x_hat = model(y[i : i + batch_size].to(device), dataset.x0[i : i + batch_size].to(device)).cpu()
        total += float(metrics.mse(x_hat.double(), dataset.x[i : i + batch_size].double()).sum())
    return total / len(dataset)


def physics_ablation(model: nn.Module, dataset: InverseProblemDataset, batch_size: int = 64) -> dict[str, float]:
    """{"full", "no_data_term", "other_y"}: test MSE as trained, with zero data-fit directions, and with
    each sample's y replaced by the next sample's (x0 kept); plus their ratios to "full"."""
    full = split_mse(model, dataset, batch_size=batch_size)
    with data_term_removed(model):
        removed = split_mse(model, dataset, batch_size=batch_size)
    swapped = split_mse(model, dataset, y=dataset.y.roll(1, dims=0), batch_size=batch_size)
    return {"full": full, "no_data_term": removed, "other_y": swapped,
            "no_data_term_ratio": removed / full, "other_y_ratio": swapped / full}
