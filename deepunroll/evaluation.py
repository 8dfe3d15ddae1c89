"""Score checkpoints and the initial guess x0 on one data split: a table, a CSV and a figure."""

from __future__ import annotations

from pathlib import Path

import torch

from deepunroll import metrics as metric_fns
from deepunroll.pipeline import load_datasets, load_trained
from deepunroll.tables import write_csv
from deepunroll.viz import plot_image_reconstructions, plot_mesh_reconstructions, plot_signal_reconstructions

MEASUREMENT = "measurement y"


def score(x_hat: torch.Tensor, x: torch.Tensor, metrics: dict) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std)} over samples."""
    out = {}
    for name, fn in metrics.items():
        values = fn(x_hat.double(), x.double())
        out[name] = (values.mean().item(), values.std().item() if values.numel() > 1 else 0.0)
    return out


def reconstruct_split(checkpoint_path: str | Path, split: str = "test", device: str = "cpu", batch_size: int = 256):
    """(config, dataset, x_hat (n, *in_shape) on the CPU, operator) for the checkpoint's network on ``split``."""
    cfg, model = load_trained(checkpoint_path, device)
    dataset = load_datasets(cfg, model.operator, splits=(split,))[split]
    with torch.no_grad():
        x_hat = torch.cat([
            model(dataset.y[i : i + batch_size].to(device), dataset.x0[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(dataset), batch_size)
        ])
    return cfg, dataset, x_hat, model.operator


def evaluate(checkpoints: list[str | Path], split: str = "test", device: str = "cpu", batch_size: int = 256):
    """Score x0 (e.g. Gauss-Newton) and every checkpoint on the same ``split``.

    Returns (rows, columns, operator): rows {method, split, n, <metric>_mean, <metric>_std} with the metrics
    of ``data.metrics``; columns {title: estimates} in display order, ground truth first (for figures).
    Checkpoints trained on different data are an error.
    """
    if not checkpoints:
        raise ValueError("evaluate: no checkpoint given")
    columns, rows, first = {}, [], None
    for path in checkpoints:
        cfg, dataset, x_hat, operator = reconstruct_split(path, split, device, batch_size)
        if first is None:
            first = (cfg, dataset)
            metrics = metric_fns.select(cfg.data.metrics, operator)
            columns["ground truth"] = dataset.x
            if dataset.y.dim() == 3:
                columns[MEASUREMENT] = dataset.y
            columns[cfg.data.get("x0_label", "x0")] = dataset.x0
        elif not torch.equal(dataset.x, first[1].x):
            raise ValueError(f"{path} was trained on other data than {checkpoints[0]}; compare checkpoints of one dataset")
        name = cfg.name if cfg.name not in columns else f"{cfg.name} ({Path(path).parent.parent.name})"
        columns[name] = x_hat
    truth = columns["ground truth"]
    for method, estimate in columns.items():
        if method in ("ground truth", MEASUREMENT):
            continue
        row = {"method": method, "split": split, "n": len(truth)}
        for metric, (mean, std) in score(estimate, truth, metrics).items():
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        rows.append(row)
    return rows, columns, operator


def evaluate_checkpoint(checkpoint_path: str | Path, split: str = "test", device: str = "cpu",
                        batch_size: int = 256) -> list[dict]:
    """Rows for x0 and one checkpoint's network on ``split``."""
    return evaluate([checkpoint_path], split, device, batch_size)[0]


def plot_reconstructions(columns: dict, operator, path: Path, n_samples: int = 4) -> Path:
    """The figure that suits x's shape: images, mesh element values (tripcolor) or 1D signals."""
    truth = columns["ground truth"]
    if truth.dim() == 3:
        return plot_image_reconstructions(columns, path, n_samples, own_scale=(MEASUREMENT,))
    if hasattr(operator, "elements") and hasattr(operator, "nodes"):
        return plot_mesh_reconstructions(columns, operator.nodes, operator.elements, path, n_samples)
    return plot_signal_reconstructions(columns, path, n_samples)


def evaluate_to_files(checkpoints: list[str | Path], split: str = "test", device: str = "cpu",
                      batch_size: int = 256, out_dir: str | Path | None = None,
                      n_figure_samples: int = 4) -> tuple[list[dict], list[Path]]:
    """Evaluate and write ``<stem>_<split>_metrics.csv`` and ``<stem>_<split>_reconstructions.png``.

    stem: the checkpoint's name for one checkpoint, ``comparison`` for several; files go to ``out_dir``
    (default: the first checkpoint's folder). Returns (rows, written paths).
    """
    rows, columns, operator = evaluate(checkpoints, split, device, batch_size)
    first = Path(checkpoints[0])
    out_dir = Path(out_dir) if out_dir else first.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = first.stem if len(checkpoints) == 1 else "comparison"
    csv_path = out_dir / f"{stem}_{split}_metrics.csv"
    write_csv(rows, csv_path)
    figure = plot_reconstructions(columns, operator, out_dir / f"{stem}_{split}_reconstructions.png", n_figure_samples)
    return rows, [csv_path, figure]


def format_table(rows: list[dict]) -> str:
    """Plain-text table: method | n | metric mean +- std."""
    metrics = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    width = max(24, *(len(r["method"]) + 1 for r in rows))
    header = f"{'method':<{width}} {'n':>5} " + " ".join(f"{m:>22}" for m in metrics)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = " ".join(f"{row[m + '_mean']:>11.4e} +- {row[m + '_std']:<7.1e}" for m in metrics)
        lines.append(f"{row['method']:<{width}} {row['n']:>5} {cells}")
    return "\n".join(lines)
