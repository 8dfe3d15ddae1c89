"""Validate a composed config before any work: one line naming the key, the value and what is allowed.

Hydra already rejects overrides of keys that do not exist (``train.epoch=3``: "Key 'epoch' is not in
struct") and unknown group options (``accel=foo``); this module catches wrong types, out-of-range
values and keys appended with ``+`` that nothing reads.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from deepunroll.data.make import NOISE_MODELS
from deepunroll.nets.backprop import make_backprop
from deepunroll.nets.domain import make_domain
from deepunroll.train.trainer import TrainSettings
from deepunroll.validation import (BOOL, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, ConfigError, check_target,
                                   is_int, is_number, one_of)

# key -> (predicate, what is allowed); keys absent from a problem's config are skipped
RULES = {
    "seed": NON_NEGATIVE_INT,
    "evaluate": BOOL,
    "net.n_iter": POSITIVE_INT,
    "net.grad_through_operator": BOOL,
    "net.spectral_norm": (lambda v: v is None or (is_number(v) and v > 0), "null (off) or a number > 0"),
    "data.splits.train": POSITIVE_INT,
    "data.splits.val": POSITIVE_INT,
    "data.splits.test": POSITIVE_INT,
    "data.noise": NON_NEGATIVE,
    "data.seed": NON_NEGATIVE_INT,
    "data.noise_model": one_of(*NOISE_MODELS),
}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first bad value; called by every script before touching data."""
    for key, (ok, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__":
            continue
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: expected {allowed}")
    if "train" in cfg:  # the loop's settings check themselves
        TrainSettings.from_config(OmegaConf.to_container(cfg.train))
    for node in ("operator", "data.generator", "x0", "net.step", "accel"):  # objects check their own settings
        check_target(node, OmegaConf.select(cfg, node))
    if "net" in cfg:
        make_domain(cfg.net)  # net.domain and its settings
    mode = OmegaConf.select(cfg, "net.backprop")
    if mode is not None:  # the backprop strategy checks its mode and net.fixed_point.* itself
        fixed_point = OmegaConf.select(cfg, "net.fixed_point")
        make_backprop(mode, OmegaConf.to_container(fixed_point) if fixed_point is not None else None)
    n_train = OmegaConf.select(cfg, "data.n_train")
    if n_train is not None:
        pool = OmegaConf.select(cfg, "data.splits.train")
        if not (is_int(n_train) and n_train > 0):
            raise ConfigError(f"data.n_train={n_train!r}: expected a positive integer or null (all)")
        if is_int(pool) and n_train > pool:
            raise ConfigError(f"data.n_train={n_train}: exceeds the training pool data.splits.train={pool}")
