"""Matplotlib figures of reconstructions, written straight to files (Agg canvas, no pyplot state)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepunroll.metrics import psnr


def plot_image_reconstructions(
    columns: dict[str, torch.Tensor],
    path: str | Path,
    n_samples: int = 4,
    own_scale: Collection[str] = (),
    panel_inches: float = 1.9,
) -> Path:
    """Grid of grayscale images: one row per sample, one column per entry of ``columns``; saved as PNG.

    columns: {title: images (n, H, W)}, in display order; the first entry is the ground truth.
    Every panel of a row shares the grey scale [min, max] of that row's ground truth, except the
    columns named in ``own_scale`` (e.g. a measurement in other units), which use their own range.
    Other panels with the ground truth's shape are titled with their PSNR against it (deepunroll.metrics.psnr);
    the ground truth with its range.
    Returns ``path``.
    """
    if not columns:
        raise ValueError("plot_image_reconstructions: columns is empty; expected {title: images (n, H, W)}")
    images = {name: stack.detach().cpu().double() for name, stack in columns.items()}
    for name, stack in images.items():
        if stack.dim() != 3:
            raise ValueError(f"plot_image_reconstructions: column {name!r} has shape {tuple(stack.shape)}; expected (n, H, W)")
    truth_name, truth = next(iter(images.items()))
    n_rows = min([n_samples] + [len(stack) for stack in images.values()])
    if n_rows < 1:
        raise ValueError("plot_image_reconstructions: no samples to plot")

    figure = Figure(figsize=(panel_inches * len(images), panel_inches * n_rows + 0.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, len(images), squeeze=False)
    for row in range(n_rows):
        low, high = truth[row].min().item(), truth[row].max().item()
        for col, (name, stack) in enumerate(images.items()):
            ax, image = axes[row, col], stack[row]
            vmin, vmax = (image.min().item(), image.max().item()) if name in own_scale else (low, high)
            ax.imshow(image.numpy(), cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = name + (" (own scale)" if name in own_scale else "") if row == 0 else ""
            if name != truth_name and name not in own_scale and image.shape == truth[row].shape:
                value = psnr(image[None], truth[row][None]).item()
                label = f"{label}\n{value:.1f} dB" if label else f"{value:.1f} dB"
            elif name == truth_name:
                label = f"{label}\n[{low:.2f}, {high:.2f}]" if label else f"[{low:.2f}, {high:.2f}]"
            ax.set_title(label, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _figure(n_rows: int, n_cols: int, width: float, height: float):
    figure = Figure(figsize=(width * n_cols, height * n_rows + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(n_rows, n_cols, squeeze=False)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def plot_mesh_reconstructions(columns: dict[str, torch.Tensor], nodes: torch.Tensor, elements: torch.Tensor,
                              path: str | Path, n_samples: int = 4) -> Path:
    """Element values on a triangle mesh (matplotlib tripcolor): rows = samples, columns = ``columns``.

    columns: {title: (n, n_elems)}, the first is the ground truth; one colour scale shared by every
    panel (the range of the ground truths shown), with a labelled colour bar. nodes (N, 2), elements (E, 3).
    """
    values = {name: stack.detach().cpu().double() for name, stack in columns.items()}
    truth = next(iter(values.values()))
    n_rows = min([n_samples] + [len(v) for v in values.values()])
    low, high = truth[:n_rows].min().item(), truth[:n_rows].max().item()
    xy, triangles = nodes.detach().cpu().numpy(), elements.detach().cpu().numpy()
    figure, axes = _figure(n_rows, len(values), 2.1, 2.0)
    for row in range(n_rows):
        for col, (name, stack) in enumerate(values.items()):
            ax = axes[row, col]
            mappable = ax.tripcolor(xy[:, 0], xy[:, 1], triangles, facecolors=stack[row].numpy(),
                                    cmap="viridis", vmin=low, vmax=high, edgecolors="none")
            ax.set_aspect("equal")
            ax.set_axis_off()
            title = name if row == 0 else ""
            if col > 0:
                title = f"{title}\n{psnr(stack[row][None], truth[row][None]).item():.1f} dB".strip()
            ax.set_title(title, fontsize=9)
    figure.colorbar(mappable, ax=axes, shrink=0.6, label="conductivity (S/m)")
    return _save(figure, path)


def plot_signal_reconstructions(columns: dict[str, torch.Tensor], path: str | Path, n_samples: int = 4) -> Path:
    """1D signals: one panel per sample with every column as a line; columns {title: (n, length)}."""
    values = {name: stack.detach().cpu().double() for name, stack in columns.items()}
    truth = next(iter(values.values()))
    n_rows = min([n_samples] + [len(v) for v in values.values()])
    figure, axes = _figure(n_rows, 1, 6.0, 1.8)
    for row in range(n_rows):
        ax = axes[row, 0]
        for col, (name, stack) in enumerate(values.items()):
            label = name if col == 0 else f"{name} ({psnr(stack[row][None], truth[row][None]).item():.1f} dB)"
            ax.plot(stack[row].numpy(), lw=2.2 if col == 0 else 1.2, color="k" if col == 0 else None, label=label)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel(f"sample {row}", fontsize=8)
    axes[-1, 0].set_xlabel("index")
    return _save(figure, path)
