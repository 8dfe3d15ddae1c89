"""Shared fixtures: Hydra config composition with test-local data and run folders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REPO = CONFIGS.parent


def compose_config(overrides=(), config_name="config"):
    """Compose a config from configs/ exactly as the scripts see it (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


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


def rel(a, b):
    """Relative error ||a - b|| / ||b|| of array-likes."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
