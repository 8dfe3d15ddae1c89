"""Build an UnrolledNet from the `net` and `accel` config groups."""

from __future__ import annotations

import inspect

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from deepunroll.nets.backprop import Backprop
from deepunroll.nets.direction import DataFit
from deepunroll.nets.unrolled import UnrolledNet
from deepunroll.operators.base import ForwardOperator
from deepunroll.validation import BOOL, BUILDER_FILLED, POSITIVE_INT, check_all, is_number

# the net.* keys build_model reads itself (the step is its own _target_ object; DataFit checks net.direction*)
RULES = {"n_iter": POSITIVE_INT, "grad_through_operator": BOOL,
         "spectral_norm": (lambda v: v is None or (is_number(v) and v > 0), "null (off) or a number > 0")}


def check_net(net_cfg) -> None:
    """Raise ConfigError naming the first bad ``net.n_iter``, ``net.grad_through_operator`` or ``net.spectral_norm``."""
    check_all("net", RULES, {key: net_cfg[key] for key in RULES if key in net_cfg})


def _shape_kwargs(node: DictConfig, operator: ForwardOperator, n_iter: int, aux_channels: int = 0) -> dict:
    """Fill the constructor arguments that come from the operator and net, not from the user."""
    available = dict(zip(BUILDER_FILLED, (tuple(operator.in_shape), tuple(operator.out_shape), n_iter, aux_channels,
                                          operator.element_mesh())))
    if not aux_channels:  # steps that take them (LPGD) see the direction's magnitude; others read the direction alone
        del available["aux_channels"]
    params = inspect.signature(get_object(node._target_)).parameters
    return {name: value for name, value in available.items() if name in params}


LEGACY_RMA = "deepunroll.nets.accel.recurrent_momentum"  # the factory that chose between RMA and the ConvLSTM


def upgrade_accel(accel_cfg: DictConfig) -> DictConfig:
    """An ``accel`` node of a checkpoint written before ``accel=convlstm`` existed, in today's terms."""
    if accel_cfg.get("_target_") != LEGACY_RMA:
        return accel_cfg
    node = OmegaConf.to_container(accel_cfg)
    cell, hidden, layers = node.get("cell", "lstm"), node.get("hidden", 128), node.get("layers", 1)
    if cell == "convlstm":
        return OmegaConf.create({"_target_": "deepunroll.nets.convlstm.ConvLSTMAccelerator", "channels_hidden": hidden,
                                 "kernel_size": node.get("kernel_size", 3), "layers": layers})
    return OmegaConf.create({"_target_": "deepunroll.nets.accel.RMA", "cell": cell, "hidden": hidden, "layers": layers,
                             "forget_bias": node.get("forget_bias", 1.0)})


def build_model(net_cfg: DictConfig, accel_cfg: DictConfig, operator: ForwardOperator, initial_guess=None,
                backprop: Backprop | str = "full") -> UnrolledNet:
    """UnrolledNet(operator, step, accelerator, n_iter) as configured by ``net.*`` and ``accel.*``, differentiated
    by ``backprop`` (a strategy built from the ``backprop`` group, or a mode name).

    Optional keys: ``net.spectral_norm`` (bound on every convolution kernel's norm; null: off),
    ``net.direction`` (raw | scaled | gauss_newton | none; absent: raw, as in checkpoints written before it
    existed), ``net.direction_damping`` (gauss_newton's lambda / mean diag(J J^T)) and
    ``net.direction_normalize`` (per-sample rms normalisation, magnitude as an extra channel).
    """
    check_net(net_cfg)
    n_iter = net_cfg.n_iter
    data_fit = DataFit(operator, net_cfg.get("direction", "raw"), net_cfg.get("direction_damping", 0.01),
                       net_cfg.get("direction_normalize", False))
    step = instantiate(net_cfg.step, **_shape_kwargs(net_cfg.step, operator, n_iter, data_fit.aux_channels))
    if net_cfg.get("spectral_norm") is not None:
        from deepunroll.nets.lipschitz import spectral_normalise

        spectral_normalise(step, float(net_cfg.spectral_norm))
    accel_cfg = upgrade_accel(accel_cfg)
    accelerator = instantiate(accel_cfg, **_shape_kwargs(accel_cfg, operator, n_iter))
    return UnrolledNet(
        operator,
        step,
        accelerator,
        n_iter,
        grad_through_operator=net_cfg.grad_through_operator,
        initial_guess=initial_guess,
        backprop=backprop,
        data_fit=data_fit,
    )
