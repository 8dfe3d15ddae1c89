"""What a run directory records about itself (resolved config, git commit, package versions), and how the
scripts report a user's error (one line, the traceback only with ``HYDRA_FULL_ERROR=1``)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("deepunroll", "torch", "numpy", "scipy", "pyeit", "scikit-image", "h5py", "hydra-core")


def git_commit(cwd: Path | None = None) -> str:
    """HEAD commit of the source tree, or 'unknown'; '-dirty' when tracked files other than the committed
    outputs (results/, figures/, which sweeps rewrite while they run) have uncommitted changes."""
    cwd = cwd or Path(__file__).resolve().parent
    outputs = [":(top,exclude)results", ":(top,exclude)figures"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *outputs],
                               cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def config_dict(cfg: DictConfig) -> dict:
    """Resolved plain-dict copy of a config, without Hydra's own node."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}


def run_record(cfg: DictConfig) -> dict:
    return {"config": config_dict(cfg), "git_commit": git_commit(), "versions": package_versions()}


def write_run_record(cfg: DictConfig, run_dir: Path) -> dict:
    """Write run_record.json (config, commit, versions) into run_dir and return it."""
    record = run_record(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_record.json").write_text(json.dumps(record, indent=2, default=str))
    return record


# ------------------------------------------------------------------ command-line errors
def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix your command or your files", not "bug": each names the key or file in one line."""
    from omegaconf.errors import MissingMandatoryValue

    from deepunroll.validation import ConfigError
    from deepunroll.data.h5 import DatasetError
    from deepunroll.train.checkpoint import CheckpointError
    from deepunroll.train.trainer import ExistingRunError, NonFiniteLossError

    return (ConfigError, CheckpointError, DatasetError, ExistingRunError, NonFiniteLossError, FileNotFoundError,
            MissingMandatoryValue)


def report_errors(main):
    """Decorate a script's Hydra task function: a user error (:func:`user_errors`) is printed as its one-line
    message on stderr and the script exits with status 1; ``HYDRA_FULL_ERROR=1`` shows the full traceback."""
    import functools
    import os
    import sys

    from hydra.errors import InstantiationException

    @functools.wraps(main)
    def wrapped(cfg):
        try:
            return main(cfg)
        except (InstantiationException, *user_errors()) as error:
            if isinstance(error, InstantiationException):  # a constructor's own user error, wrapped by Hydra
                if not isinstance(error.__cause__, user_errors()):
                    raise
                error = error.__cause__
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            lines = str(error).strip().splitlines() or [type(error).__name__]
            print(f"error: {lines[0]}", file=sys.stderr)  # OmegaConf adds full_key/object_type lines
            sys.exit(1)

    return wrapped
