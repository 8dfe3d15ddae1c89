"""L-BFGS with a strong-Wolfe line search on a scalar loss: the small fits of calibrations and twins."""

from __future__ import annotations

from typing import Callable

import torch


def minimise(parameters: list[torch.Tensor], loss: Callable[[], torch.Tensor], max_iter: int,
             tolerance_grad: float = 1e-12, tolerance_change: float = 1e-14) -> torch.optim.LBFGS:
    """Minimise ``loss()`` over ``parameters`` (leaf tensors that require grad) in one L-BFGS step of at most
    ``max_iter`` iterations; returns the optimiser (its state on the first parameter holds ``n_iter``)."""
    optimiser = torch.optim.LBFGS(parameters, max_iter=int(max_iter), tolerance_grad=tolerance_grad,
                                  tolerance_change=tolerance_change, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss()
        value.backward()
        return value

    optimiser.step(closure)
    return optimiser
