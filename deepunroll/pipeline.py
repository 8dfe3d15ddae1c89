"""Assemble operator + data + network from a config; train, load and reconstruct.

Used by scripts/train.py, scripts/evaluate.py and scripts/make_data.py, and by users:

    model = deepunroll.load_model("runs/toy_lpgd_rma/.../checkpoints/best.pt")
    x_hat = model.reconstruct(y)          # y: (B, *operator.out_shape)
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import deepunroll.configs

from deepunroll.data.datasets import InverseProblemDataset
from deepunroll.data.make import ensure_dataset, load_split
from deepunroll.nets.backprop import upgrade_backprop
from deepunroll.nets.build import build_model
from deepunroll.nets.domain import upgrade_domain
from deepunroll.nets.unrolled import UnrolledNet, count_parameters
from deepunroll.operators.base import ForwardOperator
from deepunroll.config_checks import validate
from deepunroll.validation import check, one_of
from deepunroll.record import write_run_record
from deepunroll.train import checkpoint, distributed
from deepunroll.train.checkpoint import seed_everything
from deepunroll.train.trainer import DTYPES, Trainer, TrainSettings, resolve_device

CONFIGS = Path(deepunroll.configs.__file__).parent  # configs/, installed as deepunroll.configs


def compose_config(overrides=(), config_name: str = "config") -> DictConfig:
    """A config composed from configs/ as the scripts see it (without the hydra node), for use in Python."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def network_dtype(cfg: DictConfig) -> torch.dtype:
    check("train.dtype", cfg.train.dtype, one_of(*DTYPES))
    return DTYPES[cfg.train.dtype]


# checkpoints written before the x0 group existed: the initial guess their data generator computed
LEGACY_X0 = {"deepunroll.data.phantoms.EITPhantoms": "gauss_newton", "deepunroll.data.patches.ImagePatches":
             "constant_inverse"}


def initial_guess(cfg: DictConfig):
    """The ``x0`` object, x0(operator, y) -> (B, *in_shape); configs without an ``x0`` node get their data's."""
    if "x0" in cfg:
        return instantiate(cfg.x0)
    name = LEGACY_X0.get(OmegaConf.select(cfg, "data.generator._target_"), "zeros")
    node = OmegaConf.load(CONFIGS / "x0" / f"{name}.yaml")
    return instantiate(OmegaConf.merge({"data": cfg.get("data", {})}, {"x0": node}).x0)


# net keys of configs written before the backprop and domain groups existed
LEGACY_NET_KEYS = ("backprop", "fixed_point", "domain", "grid_size")


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """A config written before the ``backprop`` and ``domain`` groups existed (``net.backprop``,
    ``net.fixed_point.*``, ``net.domain``, ``net.grid_size``), in today's terms; today's configs pass unchanged."""
    legacy = [key for key in LEGACY_NET_KEYS if key in cfg.get("net", {})]
    if not legacy and "backprop" in cfg and "domain" in cfg:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(cfg):
        if "backprop" not in cfg:
            cfg.backprop = upgrade_backprop(cfg.net)
        if "domain" not in cfg:
            cfg.domain = upgrade_domain(cfg.net)
        for key in legacy:
            del cfg.net[key]
    return cfg


def build_problem(cfg: DictConfig, device: torch.device | str = "cpu"):
    """(operator, sample generator, model) from ``cfg.operator``, ``cfg.data``, ``cfg.x0``, ``cfg.net``, ``cfg.accel``,
    ``cfg.backprop`` and ``cfg.domain`` (older configs: :func:`upgrade_config`)."""
    cfg = upgrade_config(cfg)
    operator: ForwardOperator = instantiate(cfg.operator)
    generator = instantiate(cfg.data.generator)
    x0 = initial_guess(cfg)
    domain = instantiate(cfg.domain)
    model = build_model(cfg.net, cfg.accel, domain.operator(operator), initial_guess=x0,
                        backprop=instantiate(cfg.backprop))
    dtype = network_dtype(cfg)
    model.step.to(dtype)
    model.accelerator.to(dtype)  # the operator keeps its own (float64) precision
    return operator, generator, domain.wrap(model, initial_guess=x0).to(device)


def load_datasets(cfg: DictConfig, operator: ForwardOperator, splits=("train", "val")) -> dict[str, InverseProblemDataset]:
    """Generate the dataset if missing, check it against the config, and load the requested splits."""
    path = ensure_dataset(cfg.data, operator, initial_guess(cfg))
    dtype = network_dtype(cfg)
    return {s: InverseProblemDataset(load_split(cfg.data, operator, path, s), dtype) for s in splits}


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train one experiment into ``run_dir``; returns {"history", "best": path, "last": path, "n_params"}.

    The config is validated first; with ``train.resume=true`` the run continues from
    ``run_dir/checkpoints/last.pt``, and without it an existing checkpoint there is an error.
    Under ``torchrun --nproc_per_node=N`` every process trains a DDP replica on 1/N of each batch;
    rank 0 generates the dataset, logs and writes checkpoints, into rank 0's ``run_dir``.
    """
    validate(cfg)
    seed_everything(int(cfg.seed))
    device = distributed.init_from_env(resolve_device(cfg.train.device))
    run_dir = Path(distributed.broadcast(str(run_dir)))
    operator, _, model = build_problem(cfg, device)
    settings = TrainSettings.from_config(OmegaConf.to_container(cfg.train))
    trainer = Trainer(model, settings, run_dir, int(cfg.seed))
    trainer.check_run_dir()
    if not distributed.is_main():
        distributed.barrier()  # wait until rank 0 has the dataset on disk
    datasets = load_datasets(cfg, operator)
    record = write_run_record(cfg, run_dir) if distributed.is_main() else {}
    if distributed.is_main():
        distributed.barrier()
    n_params = count_parameters(model)
    if distributed.is_main():
        print(f"{cfg.name}: {n_params:,} trainable parameters on {device} x {distributed.world_size()} process(es); "
              f"{len(datasets['train'])} training / {len(datasets['val'])} validation samples")
    history = trainer.fit(datasets["train"], datasets["val"], record)
    return {"history": history, "best": trainer.best_path, "last": trainer.last_path, "n_params": n_params}


def load_checkpoint_config(path: str | Path) -> DictConfig:
    """The resolved config a checkpoint was trained with."""
    return OmegaConf.create(checkpoint.load(Path(path))["config"]["config"])


def load_model(path: str | Path, device: str | torch.device = "cpu", overrides: dict | None = None) -> UnrolledNet:
    """Rebuild the network a checkpoint was trained with and load its weights (eval mode).

    ``model.reconstruct(y)`` then reconstructs from measurements y (B, *model.operator.out_shape),
    starting from the problem's own initial guess (toy: zeros; EIT: Gauss-Newton). ``overrides``
    ({"operator.data_root": PATH}, ...) replace config keys that name this machine's files; they must not
    change the network.
    """
    return load_trained(path, device, overrides)[1]


def load_trained(path: str | Path, device: str | torch.device = "cpu", overrides: dict | None = None,
                 operator: str | None = None) -> tuple[DictConfig, UnrolledNet]:
    """(config with ``overrides`` applied, network in eval mode) of a checkpoint, read once (:func:`load_model`).

    ``operator``: the ``_target_`` the checkpoint's operator must have; another one is a ValueError naming
    the checkpoint, raised before anything is built.
    """
    state = checkpoint.load(Path(path), device)
    cfg = OmegaConf.create(state["config"]["config"])
    trained_on = OmegaConf.select(cfg, "operator._target_")
    if operator is not None and trained_on != operator:
        raise ValueError(f"model checkpoint {path}: trained on operator {trained_on}, expected {operator}")
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value)
    _, _, model = build_problem(cfg, device)
    model.load_state_dict(state["model"])
    return cfg, model.eval()
