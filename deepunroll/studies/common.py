"""Sweep machinery shared by the studies: profiles, run one config unless done, collect rows, paired statistics,
tables.

A study's profiles are YAML under the packaged configs: ``reproduce/<study>.yaml`` (shared keys and a
``profiles`` mapping) or one ``reproduce/<study>_<profile>.yaml`` per profile (the RMA study's sweeps).

A run lives in its own folder; it is *done* when ``result.json`` is there, so a sweep resumes by
skipping done runs (and continues an interrupted training from ``checkpoints/last.pt``). A run being
trained by another process holds ``claim.pid``, so the same command started twice splits the work.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from deepunroll.pipeline import CONFIGS
from deepunroll.validation import ConfigError

PROFILES_DIR = CONFIGS / "reproduce"


def profile_names(study: str) -> list[str]:
    """The profiles of ``study`` found in the packaged configs ([] when it keeps them in code)."""
    single = PROFILES_DIR / f"{study}.yaml"
    if single.exists():
        return sorted(OmegaConf.load(single).profiles)
    return sorted(p.stem.removeprefix(f"{study}_") for p in PROFILES_DIR.glob(f"{study}_*.yaml"))


def load_profile(study: str, profile: str) -> dict:
    """A profile as plain data: the study file's shared keys with the profile's own on top."""
    known = profile_names(study)
    if profile not in known:
        raise ConfigError(f"profile={profile!r}: expected one of {', '.join(known)} for study={study}")
    single = PROFILES_DIR / f"{study}.yaml"
    if single.exists():
        spec = OmegaConf.to_container(OmegaConf.load(single), resolve=True)
        return {k: v for k, v in spec.items() if k != "profiles"} | spec["profiles"][profile]
    return OmegaConf.to_container(OmegaConf.load(PROFILES_DIR / f"{study}_{profile}.yaml"), resolve=True)


RESULT = "result.json"


def measured_data_root(study: str, data_root: Path | None, folder: str) -> Path:
    """The data folder of a measured-data study, after a one-line error for a missing ``data_root`` (``folder``
    says what it must hold and where the data are published)."""
    if data_root is None:
        raise ConfigError(f"study={study} needs data_root=PATH: {folder}")
    return Path(data_root)


def slug(text: str) -> str:
    """A folder-safe name: 'LPGD-RMA (2D grid)' -> 'lpgd-rma_2d_grid'."""
    keep = "".join(c.lower() if c.isalnum() or c in "-.=" else "_" for c in str(text))
    return "_".join(part for part in keep.split("_") if part)


def _claim(run_dir: Path) -> bool:
    """Take run_dir for this process; False if a live process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "claim.pid"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(lock.read_text() or 0)
            os.kill(pid, 0)
            if pid != os.getpid():
                return False
        except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
            pass  # a stale claim of a process that is gone: take it over
        lock.write_text(str(os.getpid()))
        return True
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def run_claimed(run_dir: Path, work: Callable[[], dict], report_only: bool = False) -> dict | None:
    """The one resumable unit of every study: ``work()`` run once into ``run_dir``, its result in result.json.

    Returns the stored result when the run is done; None when another live process holds the run (or
    ``report_only`` and it is not done). ``work`` may write files into run_dir and returns plain data.
    """
    done = run_dir / RESULT
    if done.exists():
        return json.loads(done.read_text())
    if report_only or not _claim(run_dir):
        return None
    try:
        result = work()
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(done)
        return result
    finally:
        (run_dir / "claim.pid").unlink(missing_ok=True)


def run_one(overrides: list[str], run_dir: Path, info: dict, report_only: bool = False) -> dict | None:
    """Train + evaluate one config into run_dir (:func:`run_claimed`); the stored result if already done.

    Returns None when another live process is training this run (or ``report_only`` and it is not done).
    ``info`` (sweep, network, axis values) is stored with the result.
    """
    from deepunroll.evaluation import evaluate
    from deepunroll.pipeline import compose_config, train
    from deepunroll.record import git_commit, config_dict

    def work() -> dict:
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        cfg = compose_config(overrides + [f"train.resume={str(resume).lower()}"])
        trained = train(cfg, run_dir)
        rows = evaluate([trained["best"]], device="cpu")[0]
        return dict(info, overrides=overrides, baseline=rows[0], scores=rows[1], n_params=trained["n_params"],
                    epochs=len(trained["history"]), train_seconds=train_seconds(trained["history"]), resumed=resume,
                    git_commit=git_commit(), config=config_dict(cfg))

    return run_claimed(run_dir, work, report_only)


def train_seconds(history: list[dict]) -> float:
    """Training wall time of a run: the sum of its epochs' times, complete across resumes; NaN when some epochs
    have no time (a run resumed from a checkpoint written before per-epoch times were recorded)."""
    if all("seconds" in epoch for epoch in history):
        return sum(epoch["seconds"] for epoch in history)
    return math.nan


def load_best(run_dir: Path):
    """(config, model, test split) of a finished run: its best checkpoint and the test data it was trained for."""
    from deepunroll.pipeline import load_datasets, load_trained

    cfg, model = load_trained(run_dir / "checkpoints" / "best.pt")
    return cfg, model, load_datasets(cfg, model.operator, splits=("test",))["test"]


def run_ablation(run_dir: Path) -> dict:
    """physics_ablation of a finished run's best checkpoint on its test split, computed once (ablation.json)."""
    path = run_dir / "ablation.json"
    if path.exists():
        return json.loads(path.read_text())
    from deepunroll.ablation import physics_ablation

    _, model, test = load_best(run_dir)
    out = physics_ablation(model, test)
    path.write_text(json.dumps(out, indent=1))
    return out


def val_curve(run_dir: Path) -> list[float]:
    """Validation loss per epoch of a run (from checkpoints/last.pt)."""
    from deepunroll.train import checkpoint

    return [h["val_loss"] for h in checkpoint.load(run_dir / "checkpoints" / "last.pt")["history"]]


def metric_names(row: dict) -> list[str]:
    return [k[: -len("_mean")] for k in row if k.endswith("_mean")]


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def format_mean_std(values: list[float], digits: int) -> str:
    """'mean ± std' (sample std) of the finite values, the mean alone for one value, 'n/a' for none."""
    values = [float(v) for v in values if math.isfinite(float(v))]
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired(gains: list[float]) -> dict:
    """Paired comparison of per-seed gains (positive: the first method is better).

    {n, mean, std, favour: how many gains are > 0, t: mean / (std / sqrt(n)) (nan for n < 2 or std 0)}.
    """
    mean, std = mean_std(gains)
    n = len(gains)
    t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else float("nan")
    return {"n": n, "mean": mean, "std": std, "favour": sum(g > 0 for g in gains), "t": t}


def format_value(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return f"{value:.3e}"


def markdown_table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def seed_table(rows: list[dict], setting_keys: list[str], metrics: list[str]) -> str:
    """Markdown: one line per (setting, method) with each metric's test-set mean, as mean +- std over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in setting_keys) + (row["network"],), []).append(row)
    body = []
    for key, members in groups.items():
        cells = []
        for metric in metrics:
            values = [float(r[f"{metric}_mean"]) for r in members if r.get(f"{metric}_mean", "") != ""]
            mean, std = mean_std(values) if values else (float("nan"), float("nan"))
            cells.append(f"{format_value(mean)} +- {format_value(std)}")
        body.append(list(key) + [len(members)] + cells)
    return markdown_table(setting_keys + ["network", "seeds"] + metrics, body)
