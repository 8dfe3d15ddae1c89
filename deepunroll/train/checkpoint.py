"""Atomic checkpoint files and RNG state capture."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_atomic` (trusted files: it holds RNG states and configs)."""
    return torch.load(path, map_location=device, weights_only=False)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
