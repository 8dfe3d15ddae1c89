"""Empty-tank calibration: the homogeneous conductivity and contact impedance that best explain a measurement."""

from __future__ import annotations

import torch

from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.optim.lbfgs import minimise


def fit_background(operator: CompleteElectrodeModel, measured: torch.Tensor, sigma0: float = 1.0, z0: float = 1e-3,
                   per_electrode: bool = False, n_iter: int = 200) -> dict:
    """Least squares over log sigma (one value) and log z (one, or one per electrode) by L-BFGS with the
    operator's adjoint gradients; NaN entries of ``measured`` (n_out,) are left out.

    Returns {"sigma": float, "z": list of floats, "relative_residual": ||V - y|| / ||y|| over the kept entries,
    "iterations": int}.
    """
    measured = torch.as_tensor(measured, dtype=torch.float64, device=operator.nodes.device).reshape(-1)
    if measured.numel() != operator.n_out:
        raise ValueError(f"calibration: the measurement has {measured.numel()} entries, the operator {operator.n_out}")
    keep = torch.isfinite(measured)
    target = measured[keep]
    log_sigma = torch.tensor([float(sigma0)], dtype=torch.float64, device=measured.device).log().requires_grad_()
    log_z = torch.full((operator.n_electrodes if per_electrode else 1,), float(z0), dtype=torch.float64,
                       device=measured.device).log().requires_grad_()
    ones = torch.ones(1, operator.in_shape[0], dtype=torch.float64, device=measured.device)
    scale = float(target.square().sum())

    def misfit() -> torch.Tensor:
        z = log_z.exp().expand(operator.n_electrodes)
        residual = operator.voltages(ones * log_sigma.exp(), z[None])[0][keep] - target
        return 0.5 * residual.square().sum() / scale

    optimizer = minimise([log_sigma, log_z], misfit, n_iter)
    with torch.no_grad():
        loss = misfit()
        return {"sigma": float(log_sigma.exp()), "z": log_z.exp().tolist(),
                "relative_residual": float((2 * loss) ** 0.5),
                "iterations": int(optimizer.state[log_sigma].get("n_iter", 0))}  # L-BFGS keeps its state on the first parameter
