"""Generate, locate and load the dataset a config asks for."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig
from tqdm.auto import tqdm

from deepunroll.data.generators import add_relative_noise, add_scaled_noise
from deepunroll.data.h5 import SPLITS, check_metadata, read_split, write_dataset
from deepunroll.operators.base import ForwardOperator
from deepunroll.validation import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, ConfigError, check, check_all, is_int,
                                   one_of)

# data.noise_model: "relative" (default): Gaussian noise of relative size data.noise per sample;
# "operator": Gaussian noise of std data.noise * operator.noise_std() per entry (the operator's noise model)
NOISE_MODELS = ("relative", "operator")
# the data.* keys this module reads (the generator is its own _target_ object)
RULES = {"noise": NON_NEGATIVE, "seed": NON_NEGATIVE_INT, "noise_model": one_of(*NOISE_MODELS)}


def check_data(data_cfg) -> None:
    """Raise ConfigError naming the first bad ``data.*`` setting: noise, seed, noise_model, the split sizes and
    ``n_train`` (a positive integer or null, at most ``splits.train``)."""
    check_all("data", RULES, {key: data_cfg[key] for key in RULES if key in data_cfg})
    splits = data_cfg.get("splits") or {}
    check_all("data.splits", dict.fromkeys(SPLITS, POSITIVE_INT), {s: splits[s] for s in SPLITS if s in splits})
    levels = data_cfg.get("levels")
    if levels is not None and not (isinstance(levels, (list, ListConfig)) and len(levels) > 0
                                   and all(is_int(level) for level in levels)):
        raise ConfigError(f"data.levels={levels!r}: expected null or a non-empty list of integer levels")
    n_train = data_cfg.get("n_train")
    if n_train is not None:
        if not (is_int(n_train) and n_train > 0):
            raise ConfigError(f"data.n_train={n_train!r}: expected a positive integer or null (all)")
        pool = splits.get("train")
        if is_int(pool) and n_train > pool:
            raise ConfigError(f"data.n_train={n_train}: exceeds the training pool data.splits.train={pool}")


def data_metadata(data_cfg: DictConfig, generator, x0) -> dict:
    """What defines a dataset besides the operator: problem, seed, noise (and its model unless relative, so the
    fingerprints of datasets written before ``noise_model`` existed do not change), split sizes, generator,
    initial guess."""
    meta = {
        "problem": str(data_cfg.name),
        "seed": int(data_cfg.seed),
        "noise": float(data_cfg.noise),
        "splits": {s: int(data_cfg.splits[s]) for s in SPLITS},
        "generator": generator.metadata(),
        "x0": x0.metadata(),
    }
    noise_model = data_cfg.get("noise_model", "relative")
    if noise_model != "relative":
        meta["noise_model"] = str(noise_model)
    if data_cfg.get("levels") is not None:
        meta["levels"] = [int(level) for level in data_cfg.levels]
    return meta


def add_noise(data_cfg: DictConfig, operator: ForwardOperator, y: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Clean measurements y (B, *out_shape) plus the noise ``data.noise`` and ``data.noise_model`` ask for."""
    level, noise_model = float(data_cfg.noise), data_cfg.get("noise_model", "relative")
    check("data.noise_model", noise_model, RULES["noise_model"])
    if noise_model == "relative":
        return add_relative_noise(y, level, rng)
    if not hasattr(operator, "noise_std"):
        raise ConfigError(f"data.noise_model=operator: {type(operator).__name__} has no noise model (noise_std)")
    return add_scaled_noise(y, level, operator.noise_std(), rng)


def drop_levels(data_cfg: DictConfig, operator: ForwardOperator, y: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """y (B, *out_shape) with each sample's rows outside a level drawn uniformly from ``data.levels`` set to 0
    (the operator's ``level_masks``: KTC2023's removed electrodes); y itself when data.levels is null."""
    levels = data_cfg.get("levels")
    if levels is None:
        return y
    if not hasattr(operator, "level_masks"):
        raise ConfigError(f"data.levels: {type(operator).__name__} has no electrode levels (operator=ktc_cem has)")
    masks = operator.level_masks([int(level) for level in levels]).to(y.dtype)
    pick = torch.randint(len(levels), (y.shape[0],), generator=rng)
    return y * masks[pick].reshape(y.shape)


def _fingerprint(operator_meta: dict, data_meta: dict) -> str:
    digest = hashlib.sha1()
    for key in sorted(operator_meta):
        value = operator_meta[key]
        digest.update(key.encode())
        if isinstance(value, np.ndarray):
            value = value.astype(np.float64) if value.dtype.kind == "f" else value
            digest.update(value.tobytes())
        else:
            digest.update(json.dumps(value).encode())
    digest.update(json.dumps(data_meta, sort_keys=True).encode())
    return digest.hexdigest()[:10]


def dataset_path(data_cfg: DictConfig, operator: ForwardOperator, generator, x0) -> Path:
    """``data.path`` if set, else ``{data.root}/{data.name}_{fingerprint}.h5``."""
    if data_cfg.get("path"):
        return Path(data_cfg.path)
    fingerprint = _fingerprint(operator.metadata(), data_metadata(data_cfg, generator, x0))
    return Path(data_cfg.root) / f"{data_cfg.name}_{fingerprint}.h5"


def generate_dataset(data_cfg: DictConfig, operator: ForwardOperator, generator, x0, path: Path,
                     chunk: int = 256) -> None:
    """Draw x, measure y = F(x) (+ noise), compute x0(operator, y), for every split, and write the HDF5 file."""
    rng = torch.Generator().manual_seed(int(data_cfg.seed))
    splits = {}
    for split in SPLITS:
        n = int(data_cfg.splits[split])
        x = generator.sample(operator, n, rng, split=split).to(torch.float64)
        y_parts, x0_parts = [], []
        for start in tqdm(range(0, n, chunk), desc=f"{data_cfg.name}/{split}", unit="chunk", leave=False, disable=None):
            with torch.no_grad():
                y = add_noise(data_cfg, operator, operator(x[start : start + chunk]), rng)
                y = drop_levels(data_cfg, operator, y, rng)
                y_parts.append(y)
                x0_parts.append(x0(operator, y))
        splits[split] = {"x": x, "y": torch.cat(y_parts), "x0": torch.cat(x0_parts)}
    write_dataset(path, splits, operator.metadata(), data_metadata(data_cfg, generator, x0))


def ensure_dataset(data_cfg: DictConfig, operator: ForwardOperator, x0, generate: bool = True) -> Path:
    """Path of the dataset for ``data.*``, ``operator`` and the initial guess ``x0`` (an object of the ``x0``
    group): generated when missing (if ``generate``), else validated."""
    check_data(data_cfg)
    generator = instantiate(data_cfg.generator)
    path = dataset_path(data_cfg, operator, generator, x0)
    if not path.exists():
        if not generate:
            raise FileNotFoundError(
                f"dataset {path} does not exist; create it with `python scripts/make_data.py` and the same "
                f"operator/data overrides"
            )
        print(f"generating dataset {path} ...")
        generate_dataset(data_cfg, operator, generator, x0, path)
    check_metadata(path, operator.metadata(), data_metadata(data_cfg, generator, x0))
    return path


def load_split(data_cfg: DictConfig, operator: ForwardOperator, path: Path, split: str) -> dict[str, torch.Tensor]:
    """One split; training uses the first ``data.n_train`` samples of the pool (all when null)."""
    n = data_cfg.get("n_train") if split == "train" else None
    return read_split(path, split, n, operator.in_shape, operator.out_shape)
