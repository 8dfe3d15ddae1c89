"""CSV files of result rows (evaluation, sweeps, studies, benchmarks)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(rows: list[dict], path: str | Path, columns: list[str] | None = None) -> Path:
    """Write ``rows`` to ``path`` (parent folders created); columns default to the rows' keys in first-seen order."""
    path = Path(path)
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
