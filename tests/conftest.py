"""Shared fixtures: Hydra config composition with test-local data and run folders."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepunroll.pipeline import CONFIGS, compose_config  # noqa: F401  (shared by the test modules)

REPO = Path(__file__).resolve().parents[1]
# the scripts the tests start inherit one intra-op thread too (two pytest-xdist workers share the 2 CI cores)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_toy(tmp_path):
    """Overrides for a small toy experiment writing its data under tmp_path."""
    return [
        f"data.root={tmp_path / 'data'}",
        "data.splits.train=96", "data.splits.val=32", "data.splits.test=32",
        "train.epochs=2", "train.batch_size=16", "train.device=cpu", "net.n_iter=3",
    ]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The suite's problems are small: one intra-op thread avoids oversubscribing 2 shared CI cores
    (measured: dense EIT solves ran ~10x slower with 2 threads on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_trainer(tiny_toy, tmp_path, epochs: int = 3, **settings):
    """(Trainer of the toy LPGD on the tiny_toy data in tmp_path/run, {split: dataset})."""
    from deepunroll.pipeline import build_problem, load_datasets
    from deepunroll.train.trainer import Trainer, TrainSettings

    cfg = compose_config(["+experiment=toy_lpgd"] + tiny_toy)
    operator, _, model = build_problem(cfg)
    datasets = load_datasets(cfg, operator)
    trainer = Trainer(model, TrainSettings(epochs=epochs, batch_size=16, **settings), tmp_path / "run", seed=0)
    return trainer, datasets


def untimed(history: list[dict]) -> list[dict]:
    """A training history less each epoch's wall time (``seconds``): the numbers a rerun must reproduce."""
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


def rel(a, b):
    """Relative error ||a - b|| / ||b|| of array-likes."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_tiny(tmp_path_factory, study):
    """Run a study module (deepunroll.studies.*) at profile ``tiny`` into a fresh folder: (folder, what run returns)."""
    out = tmp_path_factory.mktemp(study.__name__.rsplit(".", 1)[-1])
    return out, study.run("tiny", out)
