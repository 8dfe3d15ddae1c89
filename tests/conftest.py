"""Shared fixtures: Hydra config composition with test-local data and run folders."""

from pathlib import Path

import pytest
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
