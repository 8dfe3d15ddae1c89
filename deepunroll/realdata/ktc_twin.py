"""A digital twin of the measured KTC2023 training targets, the middle step of the sim-to-real check.

The twin keeps the measured targets and swaps the tank for the training simulator. Each target's true segmentation
(``training/trueK.mat``, 256 x 256) is put on the operator's mesh. Its three conductivities (water, resistive,
conductive; S/m) are fitted to the measured level-1 difference data. The CEM of the training data then simulates
the target, with the simulator's noise and each level's electrode mask.

A model scored on the simulated test split, on the twin and on the measured files splits its sim-to-real gap in two:
- simulated split to twin: the targets (the simulated distribution against these four targets);
- twin to measured: the physics (the CEM against the tank, for the same targets).
"""

from __future__ import annotations

import numpy as np
import torch

from deepunroll.optim.lbfgs import minimise
from deepunroll.realdata.ktc_sim import KTCDifferenceCEM

_DTYPE = torch.float64
SPANS = (0.2, 6.0, 6.0)  # fitted water within bg * e^(+-0.2), resistive and conductive within bg * e^(+-6)


def truth_classes(truths: np.ndarray, centroids, radius: float) -> torch.Tensor:
    """(B, E) int64 classes of the pixels that hold the element centroids (E, 2) (m), for truths (B, n, n) in
    {0, 1, 2} on the KTC2023 grid over [-radius, radius]^2 (rows top to bottom; :func:`pixel_grid.ktc_pixel_centres`)."""
    truths = np.asarray(truths)
    if truths.ndim != 3 or truths.shape[1] != truths.shape[2]:
        raise ValueError(f"truths must be (B, n, n) images, got shape {truths.shape}")
    n = truths.shape[1]
    points = torch.as_tensor(centroids, dtype=_DTYPE).cpu().numpy()
    start, spacing = -radius + radius / n, 2 * radius / (n - 1)
    col = np.clip(np.rint((points[:, 0] - start) / spacing).astype(np.int64), 0, n - 1)
    row = np.clip(n - 1 - np.rint((points[:, 1] - start) / spacing).astype(np.int64), 0, n - 1)
    return torch.as_tensor(truths[:, row, col].astype(np.int64))


def _values(raw: torch.Tensor, background: float) -> torch.Tensor:
    """(B, 3) conductivities from unbounded parameters (B, 3): water near the background, inclusions within
    e^(+-6) of it (a bounded search keeps every L-BFGS trial a valid CEM input)."""
    span = torch.tensor(SPANS, dtype=raw.dtype, device=raw.device)
    return background * torch.exp(span * torch.tanh(raw / span))


def fit_conductivities(operator: KTCDifferenceCEM, classes: torch.Tensor, y: torch.Tensor,
                       start=(1.0, 0.05, 5.0), iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target (water, resistive, conductive) conductivities (B, 3) S/m and relative misfits ||F - y|| / ||y|| (B,)
    of the piecewise-constant sigma = values[classes] that fits difference data y (B, 2356) V on their observed
    rows. Weighted least squares (the operator's noise std) by L-BFGS with the operator's adjoint gradients, one
    run per target (a shared line search would couple the targets' steps); ``start``: the first guess as multiples
    of the background. A class a target lacks keeps its start."""
    classes = torch.as_tensor(classes, device=operator.keep.device).long()
    y = torch.as_tensor(y, dtype=_DTYPE, device=operator.keep.device)
    if classes.ndim != 2 or classes.shape != (y.shape[0], operator.n_in):
        raise ValueError(f"classes must be (B={y.shape[0]}, E={operator.n_in}), got shape {tuple(classes.shape)}")
    fits = [_fit_one(operator, c[None], target[None], start, iterations) for c, target in zip(classes, y)]
    return torch.cat([values for values, _ in fits]), torch.cat([misfit for _, misfit in fits])


def _fit_one(operator: KTCDifferenceCEM, classes: torch.Tensor, y: torch.Tensor, start, iterations: int):
    """:func:`fit_conductivities` of one target (classes (1, E), y (1, 2356))."""
    observed = operator.observed(y).to(_DTYPE)
    weight = observed / torch.where(operator.noise_std() > 0, operator.noise_std(), 1.0)
    spans = torch.tensor(SPANS, dtype=_DTYPE, device=y.device)
    first = torch.log(torch.tensor(start, dtype=_DTYPE, device=y.device)) / spans
    raw = (spans * torch.atanh(first.clamp(-0.99, 0.99)))[None].clone().requires_grad_()

    def misfit() -> torch.Tensor:
        sigma = torch.gather(_values(raw, operator.background), 1, classes)
        return ((operator(sigma) - y) * weight).square().sum()

    minimise([raw], misfit, iterations, tolerance_grad=1e-10)
    with torch.no_grad():
        values = _values(raw, operator.background)
        residual = operator(torch.gather(values, 1, classes)) - y
        relative = (residual * observed).norm(dim=1) / (y * observed).norm(dim=1)
    return values.detach(), relative


class TankTwin:
    """The twin of measured targets on ``operator`` (a :class:`KTCDifferenceCEM` at level 1: the training
    simulator's mesh and calibration). truths (B, 256, 256) in {0, 1, 2}; measured (B, 2356) their level-1
    difference data U - U_ref (V). ``noise``: times the operator's noise std, drawn with ``seed`` per level.

    Attributes: ``sigma`` (B, E) S/m the fitted targets, ``conductivities`` (B, 3) S/m, ``misfit`` (B,) the
    relative residual of the fit on the measured data.
    """

    def __init__(self, operator: KTCDifferenceCEM, truths: np.ndarray, measured, noise: float = 1.0,
                 seed: int = 0) -> None:
        if operator.level != 1:
            raise ValueError(f"TankTwin needs the operator at level 1 (every electrode), got level {operator.level}")
        self.operator, self.noise, self.seed = operator, float(noise), int(seed)
        classes = truth_classes(truths, operator.centroids, operator.radius).to(operator.keep.device)
        self.conductivities, self.misfit = fit_conductivities(operator, classes, measured)
        self.sigma = torch.gather(self.conductivities, 1, classes)
        with torch.no_grad():
            self._clean = operator(self.sigma)

    def data(self, level: int) -> torch.Tensor:
        """(B, 2356) float64 simulated difference data of the targets at ``level``: noisy, the removed rows 0."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + int(level))
        noise = torch.randn(self._clean.shape, generator=generator, dtype=_DTYPE).to(self._clean.device)
        mask = self.operator.level_masks([level])
        return (self._clean + self.noise * self.operator.noise_std() * noise) * mask
