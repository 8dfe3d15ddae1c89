"""Score a checkpoint and the initial guess x0 on a data split: a table and a CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from deepunroll import metrics as metric_fns
from deepunroll.pipeline import load_checkpoint_config, load_datasets, load_model


def score(x_hat: torch.Tensor, x: torch.Tensor, metrics: dict) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std)} over samples."""
    out = {}
    for name, fn in metrics.items():
        values = fn(x_hat.double(), x.double())
        out[name] = (values.mean().item(), values.std().item() if values.numel() > 1 else 0.0)
    return out


def evaluate_checkpoint(checkpoint_path: str | Path, split: str = "test", device: str = "cpu",
                        batch_size: int = 256) -> list[dict]:
    """Rows {method, n, <metric>_mean, <metric>_std} for x0 and the network on ``split``."""
    cfg = load_checkpoint_config(checkpoint_path)
    model = load_model(checkpoint_path, device)
    dataset = load_datasets(cfg, model.operator, splits=(split,))[split]
    with torch.no_grad():
        x_hat = torch.cat([
            model(dataset.y[i : i + batch_size].to(device), dataset.x0[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(dataset), batch_size)
        ])
    rows = []
    for method, estimate in (("x0", dataset.x0), (cfg.name, x_hat)):
        row = {"method": method, "split": split, "n": len(dataset)}
        for name, (mean, std) in score(estimate, dataset.x, metric_fns.select(cfg.data.metrics)).items():
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table: method | n | metric mean +- std."""
    metrics = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    header = f"{'method':<24} {'n':>5} " + " ".join(f"{m:>22}" for m in metrics)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = " ".join(f"{row[m + '_mean']:>11.4e} +- {row[m + '_std']:<7.1e}" for m in metrics)
        lines.append(f"{row['method']:<24} {row['n']:>5} {cells}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
