"""Regenerate the published-claims tables and figures: one command, resumable.

    python scripts/reproduce.py                       # study=rma profile=quick (< 30 min on 2 CPU cores)
    python scripts/reproduce.py profile=paper         # published sizes (README: expected time)
    python scripts/reproduce.py study=equilibrium     # another study: deepunroll/studies/<study>.py
    python scripts/reproduce.py study=ktc2023_levels data_root=PATH   # measured data: data_root names the folder

Writes results/*.csv, results/*.md and figures/*.png under out_dir (default: the repository root);
each run trains into runs_dir and is skipped when rerun. Starting the same command twice at once
splits the runs between the two processes; `workers=2` does that for you (study=rma).
"""

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import deepunroll.studies
from deepunroll.studies.common import profile_names
from deepunroll.record import report_errors
from deepunroll.validation import ConfigError

REPO = Path(__file__).resolve().parents[1]


def load_study(cfg: DictConfig):
    """The study module after checking study, profile, workers and threads (ConfigError naming the key)."""
    for key in ("workers", "threads"):
        value = cfg[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"{key}={value!r}: expected a positive integer")
    names = [m.name for m in pkgutil.iter_modules(deepunroll.studies.__path__)]
    studies = [n for n in names if hasattr(importlib.import_module(f"deepunroll.studies.{n}"), "run")]
    if cfg.study not in studies:
        raise ConfigError(f"study={cfg.study!r}: expected one of {', '.join(sorted(studies))}")
    study = importlib.import_module(f"deepunroll.studies.{cfg.study}")
    known = profile_names(cfg.study)  # YAML under configs/reproduce/ (deepunroll.studies.common.load_profile)
    if cfg.profile not in known:
        raise ConfigError(f"profile={cfg.profile!r}: expected one of {', '.join(known)} for study={cfg.study}")
    return study


@hydra.main(config_path="pkg://deepunroll.configs", config_name="reproduce", version_base="1.3")
@report_errors
def main(cfg: DictConfig) -> None:
    study = load_study(cfg)
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.out_dir) if cfg.out_dir else REPO
    kwargs = {}
    if cfg.runs_dir and "runs_dir" in inspect.signature(study.run).parameters:
        kwargs["runs_dir"] = Path(cfg.runs_dir)
    if "data_root" in inspect.signature(study.run).parameters:  # studies of measured data (not in this repository)
        kwargs["data_root"] = Path(cfg.data_root) if cfg.data_root else None
    if cfg.report_only:
        kwargs["report_only"] = True
    GlobalHydra.instance().clear()  # the studies compose one config per run themselves
    # workers=N: N-1 more copies of this command share the runs (each run is claimed by one process)
    argv = [a for a in sys.argv if not a.startswith("workers=")] + ["workers=1"]
    helpers = [subprocess.Popen([sys.executable, *argv]) for _ in range(int(cfg.workers) - 1)]
    study.run(cfg.profile, out_dir, **kwargs)
    if helpers:
        failed = [p.args for p in helpers if p.wait() != 0]
        if failed:
            raise RuntimeError(f"a worker failed: {failed[0]}")
        study.run(cfg.profile, out_dir, **kwargs)  # all runs finished now: complete tables and figures


if __name__ == "__main__":
    main()
