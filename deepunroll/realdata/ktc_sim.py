"""Simulated KTC2023 difference data: the CEM on our tank mesh minus the empty tank, with a level's mask.

:class:`KTCDifferenceCEM` (``operator=ktc_cem``) maps per-element conductivities sigma (B, E) in S/m to
difference voltages (B, 2356), injection-major as ``Uel``,

    F(sigma) = keep * (V(sigma) - V(sigma_bg)),

V the :class:`~deepunroll.operators.eit.cem.CompleteElectrodeModel` on :func:`ktc2023.tank_mesh` (h0) with the
injection / measurement patterns of ``ref.mat`` under ``data_root`` and contact impedance z, sigma_bg the
water background (defaults: the empty-tank calibration on this mesh, docs/ktc_sim.md), keep (2356,) the
rows :func:`ktc2023.level_keep_mask` keeps at ``level`` (removed rows are exactly 0, so residuals there
vanish). Measurements y that are exactly 0 count as missing (:meth:`KTCDifferenceCEM.observed`): that is how
a level's removed rows are stored, in measured difference data and in a mixed-level dataset
(``data.levels``, where each sample has its own level's rows zeroed), so one level-1 operator serves data of
every level: the data-fit directions and x0 use, per sample, the rows it has. sigma is floored at 1e-3 sigma_bg before the CEM (iterates of a network may leave the positive
cone; the derivative is 0 where the floor holds). The offset does not change derivatives: J_F = keep * J_V, and ``vjp`` / ``misfit_grad`` /
``jacobian`` are the CEM's with the mask applied. :meth:`noise_std` is the organisers' reference noise model
on the simulated empty tank, sqrt((0.05 % |V_bg|)^2 + (0.01 % max|V_bg|)^2), 0 on removed rows; with
``data.noise_model: operator`` the dataset adds data.noise times that std (``deepunroll.data.make``).

:class:`KTCDifferenceX0` (``x0=ktc_difference``) is the reference method's one-step linearised difference
reconstruction at sigma_bg, x0 = max(sigma_bg + G y, floor sigma_bg), with G (E, 2356) =
R (A^T W A + I)^-1 A^T W, A = J_F R, W = observed / noise variance, R R^T the smoothness prior
(:func:`difference.smoothness_factor` on the element centroids); G is built once per operator and pattern of
observed rows (one r x r solve; the Jacobian once per operator), and each sample costs one product.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepunroll.operators.base import ForwardOperator, product_per_pattern
from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.realdata import ktc2023
from deepunroll.realdata.difference import noise_variance, smoothness_factor
from deepunroll.validation import OPEN_UNIT_INTERVAL, POSITIVE, ConfigError, check_all, is_int, is_number, one_of

_DTYPE = torch.float64
# empty-tank calibration (operators.eit.calibration.fit_background) of ref.mat on tank_mesh(0.05): docs/ktc_sim.md
CALIBRATED_BACKGROUND, CALIBRATED_Z = 0.727, 1.2e-4
FLOOR = 1e-3  # the CEM sees max(sigma, FLOOR * background): network iterates may go negative
REF = "training/ref.mat"   # under data_root: the empty tank, whose Inj / Mpat are the patterns


def reference_file(data_root: str | Path) -> Path:
    """The empty-tank file whose Inj / Mpat are the patterns: data_root itself if it is a .mat file, else
    data_root/training/ref.mat."""
    path = Path(data_root)
    return path if path.suffix == ".mat" else path / REF


class KTCDifferenceCEM(ForwardOperator):
    """Difference-data CEM of the KTC2023 tank: sigma (B, E) S/m -> keep * (V(sigma) - V(sigma_bg)) (B, 2356) V.

    data_root: the KTC2023 folder (``training/ref.mat`` supplies Inj and Mpat) or a ref.mat file; h0: mesh size in tank radii
    (0.05: 2,935 triangles); contact_impedance z (Ohm m^2-like units of the files); background sigma_bg
    (S/m); level 1..7 (electrodes 1..2(L-1) removed); noise_relative / noise_of_max: the reference noise
    model's fractions (0.05 %, 0.01 %).
    """

    radius = ktc2023.RADIUS  # m: the tank's; net.domain=grid spans this disk

    RULES = {
        "data_root": (lambda v: isinstance(v, (str, Path)) and str(v) != "" and reference_file(v).is_file(),
                      f"the KTC2023 data folder, holding {REF}, or a ref.mat file (set operator.data_root=PATH or "
                      "DEEPUNROLL_KTC_ROOT)"),
        "h0": (lambda v: is_number(v) and 0.01 <= v <= 0.3,
               "a mesh size in tank radii in [0.01, 0.3]"),
        "contact_impedance": POSITIVE,
        "background": POSITIVE,
        "level": one_of(*range(1, ktc2023.N_LEVELS + 1)),
        "noise_relative": POSITIVE,
        "noise_of_max": POSITIVE,
    }

    def __init__(self, data_root: str | Path, h0: float = 0.05, contact_impedance: float = CALIBRATED_Z,
                 background: float = CALIBRATED_BACKGROUND, level: int = 1, noise_relative: float = 0.05e-2,
                 noise_of_max: float = 0.01e-2, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_all("operator", self.RULES, dict(data_root=data_root, h0=h0, contact_impedance=contact_impedance,
                                               background=background, level=level, noise_relative=noise_relative,
                                               noise_of_max=noise_of_max))
        ref = ktc2023.load_measurement(reference_file(data_root))
        nodes, elements, faces = ktc2023.tank_mesh(float(h0))
        self.cem = CompleteElectrodeModel(nodes, elements, faces, ref["inj"], ref["mpat"], float(contact_impedance),
                                          device=device)
        self.h0, self.level, self.background = float(h0), int(level), float(background)
        self.noise_relative, self.noise_of_max = float(noise_relative), float(noise_of_max)
        self.in_shape, self.out_shape = self.cem.in_shape, self.cem.out_shape
        self._patterns = (ref["inj"], ref["mpat"])
        keep = ktc2023.level_keep_mask(ref["inj"], ref["mpat"], self.level)
        dev = self.cem.nodes.device
        with torch.no_grad():
            v_bg = self.cem(torch.full((1, self.n_in), self.background, dtype=_DTYPE, device=dev))[0]
        std = np.sqrt(noise_variance(v_bg.cpu().numpy(), self.noise_relative, self.noise_of_max)) * keep
        buffers = {"keep": torch.as_tensor(keep, dtype=_DTYPE), "background_voltages": v_bg,
                   "noise_sd": torch.as_tensor(std, dtype=_DTYPE),
                   "centroids": torch.as_tensor(nodes[elements].mean(axis=1), dtype=_DTYPE)}
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor.to(dev), persistent=False)

    # ----------------------------------------------------------------- description
    @property
    def nodes(self) -> torch.Tensor:
        """(N, 2) mesh nodes in m."""
        return self.cem.nodes

    @property
    def elements(self) -> torch.Tensor:
        """(E, 3) node indices of the triangles."""
        return self.cem.elements

    @property
    def keep_mask(self) -> torch.Tensor:
        """(2356,) bool: rows the level keeps."""
        return self.keep > 0

    def metadata(self) -> dict:
        inj, mpat = self._patterns
        return {"operator": "ktc_difference_cem", "mesh": "tank_mesh", "h0": self.h0, "n_nodes": self.cem.n_nodes,
                "n_elems": self.n_in, "level": self.level, "background": self.background,
                "contact_impedance": self.cem.contact_impedance.tolist(), "noise_relative": self.noise_relative,
                "noise_of_max": self.noise_of_max, "injections": np.asarray(inj, dtype=np.float64),
                "measurements": np.asarray(mpat, dtype=np.float64),
                "keep": self.keep.cpu().numpy().astype(np.uint8)}

    def element_mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cem.element_mesh()

    def reference_point(self) -> torch.Tensor:
        """The water background (1, E) S/m."""
        return torch.full((1, self.n_in), self.background, dtype=_DTYPE, device=self.keep.device)

    def observed(self, y: torch.Tensor) -> torch.Tensor:
        """(B, 2356) bool: rows the level keeps where y is not exactly 0 (a removed row is stored as 0)."""
        return (self.keep > 0) & (y.reshape(y.shape[0], -1) != 0)

    def level_masks(self, levels) -> torch.Tensor:
        """(len(levels), 2356) float64 in {0, 1}: the rows each level in ``levels`` keeps (``data.levels``: a
        mixed-level dataset zeroes the rest per sample); needs the operator at level 1 (every electrode)."""
        if self.level != 1:
            raise ConfigError(f"data.levels needs operator.level=1 (every electrode; each sample gets its own "
                              f"level's mask), got operator.level={self.level}")
        levels = list(levels)
        if not levels or not all(is_int(level) and 1 <= level <= ktc2023.N_LEVELS for level in levels):
            raise ConfigError(f"data.levels={levels}: expected a non-empty list of levels in 1..{ktc2023.N_LEVELS}")
        inj, mpat = self._patterns
        masks = np.stack([ktc2023.level_keep_mask(inj, mpat, int(level)) for level in levels])
        return torch.as_tensor(masks, dtype=_DTYPE, device=self.keep.device)

    def noise_std(self) -> torch.Tensor:
        """(2356,) per-entry std (V) of the reference noise model on the simulated empty tank; 0 on removed rows."""
        return self.noise_sd

    # ----------------------------------------------------------------- physics
    def _floored(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max(sigma, floor), 1 where sigma > floor else 0): the CEM sees the floored conductivity, so a network's
        iterate that leaves the positive cone is still a valid input; the derivative is 0 where the floor holds."""
        floor = FLOOR * self.background
        return sigma.clamp_min(floor), (sigma > floor).to(sigma.dtype)

    def _forward(self, sigma: torch.Tensor) -> torch.Tensor:
        floored, _ = self._floored(sigma)
        return ((self.cem(floored).to(_DTYPE) - self.background_voltages) * self.keep).to(sigma.dtype)

    def _vjp(self, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        floored, active = self._floored(sigma)
        return self.cem.vjp(floored, v * self.keep.to(v.dtype)) * active

    def _jacobian(self, sigma: torch.Tensor) -> torch.Tensor:
        floored, active = self._floored(sigma)
        return self.cem.jacobian(floored) * self.keep.to(sigma.dtype)[:, None] * active[:, None, :]

    def misfit_grad(self, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """J_F^T (F(sigma) - y) (B, E) over the rows each sample has (:meth:`observed`), from one factorisation per
        sample (the CEM's fields): J^T r for r = observed * (V(sigma) - V(sigma_bg) - y)."""
        self.check_input(y, "y", self.out_shape)
        floored, active = self._floored(sigma)
        sigma64, _ = self.cem._inputs(floored, None)
        size = self.cem.cholesky.chunk_size(sigma64.device)
        observed = self.observed(y).to(_DTYPE)
        parts = []
        for part, target, rows in zip(sigma64.split(size), y.to(_DTYPE).split(size), observed.split(size)):
            fields = self.cem.fields(part)
            residual = (self.cem.voltages_from_fields(fields) - self.background_voltages - target) * rows
            parts.append(self.cem.vjp_from_fields(fields, residual))
        return (torch.cat(parts) * active.to(_DTYPE)).to(sigma.dtype)


class KTCDifferenceX0:
    """x0 = max(sigma_bg + G y, floor sigma_bg) (B, E) S/m for difference data y (B, 2356) V: the reference
    method's linearised MAP step on the operator's mesh (prior std ``prior_std`` S/m, correlation 1 % at
    ``prior_length`` m), floored so that x0 is a valid CEM input (the linear step can go negative in
    resistive inclusions)."""

    RULES = {"prior_std": POSITIVE, "prior_length": POSITIVE, "floor": OPEN_UNIT_INTERVAL}

    def __init__(self, prior_std: float = 0.05, prior_length: float = ktc2023.RADIUS, floor: float = 0.05) -> None:
        check_all("x0", self.RULES, dict(prior_std=prior_std, prior_length=prior_length, floor=floor))
        self.prior_std, self.prior_length, self.floor = float(prior_std), float(prior_length), float(floor)
        self._cache: tuple | None = None

    def metadata(self) -> dict:
        return {"initial_guess": "KTCDifference", "prior_std": self.prior_std, "prior_length": self.prior_length,
                "floor": self.floor}

    def gain(self, operator: KTCDifferenceCEM, observed: torch.Tensor | None = None) -> torch.Tensor:
        """G (E, 2356) float64 on the operator's device for the rows ``observed`` (2356,) bool (default: the
        operator's level's); built once per operator and pattern (the Jacobian and prior once per operator)."""
        if not isinstance(operator, KTCDifferenceCEM):
            raise ConfigError(f"x0=ktc_difference needs operator=ktc_cem, got {type(operator).__name__}")
        if self._cache is None or self._cache[0] is not operator:
            dev = operator.keep.device
            factor = torch.as_tensor(smoothness_factor(operator.centroids.cpu().numpy(), self.prior_std,
                                                       self.prior_length), dtype=_DTYPE, device=dev)   # (E, r)
            jac = operator.jacobian(operator.reference_point())[0]                              # (n, E), masked
            self._cache = (operator, factor, jac @ factor, {})                                  # A = J_F R (n, r)
        _, factor, a, gains = self._cache
        kept = operator.keep > 0 if observed is None else observed & (operator.keep > 0)
        key = kept.cpu().numpy().tobytes()
        if key not in gains:
            weight = torch.where(kept, 1.0 / torch.where(kept, operator.noise_sd, 1.0).square(), 0.0)  # W (n,)
            weighted = a * weight[:, None]
            normal = a.T @ weighted + torch.eye(a.shape[1], dtype=_DTYPE, device=a.device)
            gains[key] = factor @ torch.cholesky_solve(weighted.T.contiguous(), torch.linalg.cholesky(normal))
        return gains[key]

    def __call__(self, operator: KTCDifferenceCEM, y: torch.Tensor) -> torch.Tensor:
        """x0 (B, E) for y (B, 2356): each sample through the gain of its observed rows (one product per pattern)."""
        y64 = y.to(_DTYPE)
        change = product_per_pattern(operator.observed(y64), y64, lambda pattern: self.gain(operator, pattern),
                                     operator.n_in)
        return (operator.background + change).clamp_min(self.floor * operator.background).to(y.dtype)
