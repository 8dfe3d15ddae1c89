"""Validate a composed config before any work: one line naming the key, the value and what is allowed.

Hydra already rejects overrides of keys that do not exist (``train.epoch=3``: "Key 'epoch' is not in
struct") and unknown group options (``accel=foo``); this module catches wrong types, out-of-range
values and keys appended with ``+`` that nothing reads.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from deepunroll.data.make import check_data
from deepunroll.nets.build import check_net
from deepunroll.train.trainer import TrainSettings
from deepunroll.validation import BOOL, NON_NEGATIVE_INT, ConfigError, check_target

# keys of the scripts themselves; every other key is checked by the object or module that reads it
RULES = {"seed": NON_NEGATIVE_INT, "evaluate": BOOL}


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
    if "net" in cfg:
        check_net(cfg.net)
    if "data" in cfg:
        check_data(cfg.data)
    for node in ("operator", "data.generator", "x0", "net.step", "accel", "backprop", "domain"):  # objects check
        check_target(node, OmegaConf.select(cfg, node))                                            # their own settings
