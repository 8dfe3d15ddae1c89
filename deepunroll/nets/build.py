"""Build an UnrolledNet from the `net` and `accel` config groups."""

from __future__ import annotations

import inspect

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from deepunroll.nets.unrolled import UnrolledNet
from deepunroll.operators.base import ForwardOperator


def _shape_kwargs(node: DictConfig, operator: ForwardOperator, n_iter: int) -> dict:
    """Fill the constructor arguments that come from the operator and net, not from the user."""
    available = {"x_shape": tuple(operator.in_shape), "y_shape": tuple(operator.out_shape), "n_iter": n_iter}
    params = inspect.signature(get_object(node._target_)).parameters
    return {name: value for name, value in available.items() if name in params}


def build_model(net_cfg: DictConfig, accel_cfg: DictConfig, operator: ForwardOperator, initial_guess=None) -> UnrolledNet:
    """UnrolledNet(operator, step, accelerator, n_iter) as configured by ``net.*`` and ``accel.*``."""
    n_iter = net_cfg.n_iter
    step = instantiate(net_cfg.step, **_shape_kwargs(net_cfg.step, operator, n_iter))
    accelerator = instantiate(accel_cfg, **_shape_kwargs(accel_cfg, operator, n_iter))
    return UnrolledNet(
        operator,
        step,
        accelerator,
        n_iter,
        grad_through_operator=net_cfg.grad_through_operator,
        initial_guess=initial_guess,
    )
