"""Difference imaging: the conductivity change between a reference and a target measurement.

The MAP estimate under a Gaussian noise model and a Gaussian smoothness prior (the KTC2023 organisers'
reference method, written in their KTC_SCORING description as
``(J^T W J + P)^-1 J^T W dU``), computed in data space,

    dsigma = R (A^T W A + I)^-1 A^T W dU,   A = J R,  W = Gamma_n^-1,  R R^T = Gamma_pr,

the same vector (Woodbury) with R a low-rank factor of the smooth prior covariance (pivoted Cholesky), so
each solve is r x r (r ~ 200) and the nearly singular Gamma_pr is never inverted. The model
of the difference data is ``F(sigma0 + dsigma) - F(sigma0)``, linearised at the homogeneous ``sigma0``
(one step); ``gauss_newton_steps > 0`` relinearises at each iterate,

    dsigma_(k+1) = R (A_k^T W A_k + I)^-1 A_k^T W (dU - F(sigma0 + dsigma_k) + F(sigma0) + J_k dsigma_k).

Entries of dU that are NaN (electrodes a level removed) or excluded by ``keep`` are left out of the fit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deepunroll.operators.base import ForwardOperator
from deepunroll.operators.eit.calibration import fit_background
from deepunroll.operators.eit.cem import CompleteElectrodeModel

_DTYPE = torch.float64


def smoothness_factor(points: np.ndarray, std: float = 0.05, length: float = 0.115, rtol: float = 1e-9) -> np.ndarray:
    """R (P, r) with R R^T = Gamma_pr up to rtol * std^2 in every entry, Gamma_pr(i, j) = std^2 exp(-|x_i - x_j|^2
    / (2 b^2)), b = length / sqrt(2 ln 100) (correlation 1 % at ``length``, units of ``points``): the reference
    method's smoothness prior (its nugget of 1e-9 only regularises an inverse that this form does not need).
    Pivoted Cholesky: r grows until the largest residual variance is below rtol * std^2."""
    if not (std > 0 and length > 0 and 0 < rtol < 1):
        raise ValueError(f"smoothness prior: need std > 0, length > 0, 0 < rtol < 1; got std={std}, "
                         f"length={length}, rtol={rtol}")
    points = np.asarray(points, dtype=np.float64)
    b2 = length**2 / (2 * math.log(100))
    residual = np.full(points.shape[0], std**2)
    columns: list[np.ndarray] = []
    while residual.max() > rtol * std**2 and len(columns) < points.shape[0]:
        p = int(np.argmax(residual))
        column = std**2 * np.exp(-np.square(points - points[p]).sum(1) / (2 * b2))
        if columns:
            done = np.stack(columns, axis=1)
            column = column - done @ done[p]
        column = column / math.sqrt(residual[p])
        residual = residual - column**2
        columns.append(column)
    return np.stack(columns, axis=1)


def noise_variance(reference: np.ndarray, relative: float = 0.05e-2, of_max: float = 0.01e-2) -> np.ndarray:
    """Diagonal of Gamma_n (n,): (relative |U_ref_i|)^2 + (of_max max_j |U_ref_j|)^2 (the reference method's
    0.05 % of each voltage plus 0.01 % of the largest)."""
    reference = np.asarray(reference, dtype=np.float64)
    return (relative * np.abs(reference)) ** 2 + (of_max * np.nanmax(np.abs(reference))) ** 2


class DifferenceImaging:
    """Reconstruct dsigma (B, E) from target (B, n_out) and reference (n_out,) measurements.

    operator: a forward map of per-element conductivities (e.g. the CEM) with ``jacobian``; sigma0: the
    homogeneous background (e.g. from ``calibration.fit_background``); prior_factor (E, r) with R R^T the prior
    covariance (:func:`smoothness_factor`); noise_var (n_out,); floor: conductivities are kept
    >= floor * sigma0 during Gauss-Newton.
    """

    def __init__(self, operator: ForwardOperator, sigma0: float, prior_factor: np.ndarray, noise_var: np.ndarray,
                 gauss_newton_steps: int = 0, floor: float = 0.05) -> None:
        n_elems = operator.in_shape[0]
        if prior_factor.ndim != 2 or prior_factor.shape[0] != n_elems or noise_var.shape != (operator.n_out,):
            raise ValueError(f"difference imaging: prior_factor must be ({n_elems}, r) and noise_var "
                             f"({operator.n_out},); got {prior_factor.shape} and {noise_var.shape}")
        if int(gauss_newton_steps) < 0:
            raise ValueError(f"difference imaging: gauss_newton_steps must be >= 0, got {gauss_newton_steps}")
        device = operator.reference_point().device
        self.operator, self.steps, self.floor = operator, int(gauss_newton_steps), float(floor)
        self.factor = torch.as_tensor(prior_factor, dtype=_DTYPE, device=device)
        self.noise = torch.as_tensor(noise_var, dtype=_DTYPE, device=device)
        self.sigma0 = torch.full((1, n_elems), float(sigma0), dtype=_DTYPE, device=device)
        self.jacobian0 = operator.jacobian(self.sigma0).to(_DTYPE)  # (1, n_out, E)
        self.voltages0 = operator(self.sigma0).to(_DTYPE)

    def _map_step(self, jac: torch.Tensor, rhs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """R (A^T W A + I)^-1 A^T W rhs, A = J R, over the kept rows, batched: jac (B or 1, n_out, E), rhs and
        masks (B, n_out); a dropped row has weight 0."""
        a = jac @ self.factor                                              # (B or 1, n_out, r)
        weighted = a * (masks / self.noise)[..., None]                     # W A (B, n_out, r)
        normal = a.transpose(1, 2) @ weighted + torch.eye(a.shape[2], dtype=_DTYPE, device=a.device)
        factor, info = torch.linalg.cholesky_ex(normal)
        if bool(info.any()):
            raise ValueError("difference imaging: the normal matrix is not positive definite (NaN data?)")
        alpha = torch.cholesky_solve((weighted.transpose(1, 2) @ rhs[..., None]), factor)
        return (self.factor @ alpha)[..., 0]

    def __call__(self, target, reference, keep=None) -> torch.Tensor:
        """dsigma (B, E) for targets (B, n_out) or (n_out,); keep: optional (n_out,) bool of rows to use (NaN rows
        of the targets or the reference are dropped as well)."""
        device = self.factor.device
        target = torch.as_tensor(target, dtype=_DTYPE, device=device)
        target = target[None] if target.ndim == 1 else target
        reference = torch.as_tensor(reference, dtype=_DTYPE, device=device).reshape(-1)
        if target.shape[1] != self.operator.n_out or reference.numel() != self.operator.n_out:
            raise ValueError(f"difference imaging: measurements must have {self.operator.n_out} entries, got "
                             f"{tuple(target.shape)} and {reference.numel()}")
        delta = target - reference
        masks = torch.isfinite(delta)
        if keep is not None:
            masks &= torch.as_tensor(keep, dtype=torch.bool, device=device).reshape(-1)
        if int(masks.sum(1).min()) == 0:
            raise ValueError("difference imaging: a target has no usable measurement (all NaN or masked)")
        delta = torch.nan_to_num(delta)
        dsigma = self._map_step(self.jacobian0, delta, masks)
        floor = self.floor * float(self.sigma0[0, 0])
        for _ in range(self.steps):
            sigma = torch.clamp(self.sigma0 + dsigma, min=floor)
            jac = self.operator.jacobian(sigma).to(_DTYPE)                      # (B, n_out, E)
            model = self.operator(sigma).to(_DTYPE) - self.voltages0
            rhs = delta - model + torch.einsum("bme,be->bm", jac, sigma - self.sigma0)
            dsigma = self._map_step(jac, rhs, masks)
        return dsigma


def tank_difference_imaging(mesh: tuple, ref: dict, sigma0: float | str, contact_impedance: float, prior_std: float,
                            prior_length: float, gauss_newton_steps: int = 0, device=None,
                            ) -> tuple[DifferenceImaging, dict | None]:
    """(solver, calibration) for a measured tank: the CEM on ``mesh`` = (nodes (N, 2), elements (E, 3), faces)
    with the reference measurement's patterns ``ref`` = {"inj", "mpat", "uel"}, the reference noise model on
    ``ref["uel"]`` and the smoothness prior on the element centroids. sigma0 (S/m) and contact_impedance are
    used as given, or with ``sigma0="fit"`` both are fitted to ``ref["uel"]`` first (calibration: the
    :func:`fit_background` result, else None)."""
    nodes, elements, faces = mesh

    def operator(z):
        return CompleteElectrodeModel(nodes, elements, faces, ref["inj"], ref["mpat"], z, device=device)

    op, calibration = operator(contact_impedance), None
    if sigma0 == "fit":
        calibration = fit_background(op, torch.as_tensor(ref["uel"]))
        sigma0 = calibration["sigma"]
        op = operator(calibration["z"][0])
    factor = smoothness_factor(np.asarray(nodes)[np.asarray(elements)].mean(axis=1), prior_std, prior_length)
    return DifferenceImaging(op, float(sigma0), factor, noise_variance(ref["uel"]), gauss_newton_steps), calibration
