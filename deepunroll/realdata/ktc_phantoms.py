"""Random KTC2023-like targets on a tank mesh: water with 1..k resistive or conductive inclusions.

Each inclusion is star-shaped about its centre c, with boundary radius rho(theta) (m):

* ``polygon``: V vertices (V uniform in 3..``max_vertices``) at increasing angles from a random start, the
  angular steps proportional to 1.2 + U(0, 1) (so every step is below pi and c lies inside), each vertex at
  radius r U(0.6, 1); rho(theta) is the distance from c to the edge that the ray at theta crosses;
* ``blob``: rho(theta) = r max(0.35, 1 + sum_(m=1..4) a_m cos(m theta) + b_m sin(m theta)),
  a_m, b_m ~ U(-1, 1) 0.35 / m^1.5 (smooth, random, non-convex possible).

r (the shape's nominal radius) is U(``radius``) in m. The bounding radius rho_max (the largest vertex radius,
or a blob's maximum over 256 angles plus 0.5 % slack) places every inclusion inside the tank (radius
:data:`ktc2023.RADIUS`) with a ``margin`` (|c| + rho_max <= RADIUS - margin) and apart from the others
(|c_i - c_j| >= rho_max_i + rho_max_j + ``min_gap``), so inclusions never overlap; min_gap = 0 lets bounding
circles touch. The data README does not state the challenge's placement rule; its four training targets show
1-2 objects that do not touch. A target that breaks a rule is redrawn with the same number of inclusions, so
the counts stay uniform in 1..``max_inclusions`` (0..max with ``allow_empty``). Each inclusion is resistive or
conductive with probability 1/2, its conductivity the sample's water value times a factor drawn log-uniformly
from ``resistive`` / ``conductive``; water is ``background`` (1 + U(-spread, spread)). An element takes an
inclusion's value when its centroid lies strictly inside (|p - c| < rho(theta_p)).

Labels (0 water, 1 resistive, 2 conductive) follow exactly from sigma (:meth:`KTCPhantoms.labels`): the three
value ranges are disjoint, which the constructor checks, so a dataset stores sigma only.
"""

from __future__ import annotations

import math

import torch

from deepunroll.operators.base import ForwardOperator
from deepunroll.realdata.ktc2023 import RADIUS
from deepunroll.validation import BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_INTERVAL, ConfigError, check_all, \
    is_int, is_number

SHAPES = ("polygon", "blob")
_N_MODES, _BLOB_AMPLITUDE, _BLOB_FLOOR, _BLOB_GRID, _BLOB_SLACK = 4, 0.35, 0.35, 256, 1.005
_STEP_FLOOR = 1.2   # angular steps 1.2 + U(0, 1): with 3 vertices the largest is below 2.2 / 4.6 of a turn


def _range(low: float, high: float):
    """Rule for [a, b] with low <= a <= b <= high."""
    def ok(v):
        return (not isinstance(v, (str, bytes)) and hasattr(v, "__len__") and len(v) == 2
                and all(is_number(t) for t in v) and low <= v[0] <= v[1] <= high)
    return ok, f"two numbers [low, high] with {low} <= low <= high <= {high}"


class KTCPhantoms:
    """sigma (n, E) in S/m on the operator's mesh (``operator.centroids`` (E, 2) in m), float64.

    max_inclusions: counts uniform in 1..max_inclusions (0.. with allow_empty); shapes: drawn uniformly from
    these; radius [m]: nominal radius range; margin [m]: clearance from the tank wall; min_gap [m]: clearance
    between bounding circles; background [S/m] and background_spread (relative, uniform); resistive /
    conductive: factor ranges of the water value (log-uniform); max_vertices: polygons have 3..max_vertices.
    """

    RULES = {
        "max_inclusions": POSITIVE_INT,
        "shapes": (lambda v: not isinstance(v, str) and len(v) > 0 and all(s in SHAPES for s in v),
                   "a non-empty list of " + ", ".join(SHAPES)),
        "radius": _range(1e-3, 0.5 * RADIUS),
        "margin": NON_NEGATIVE,
        "min_gap": NON_NEGATIVE,
        "background": POSITIVE,
        "background_spread": UNIT_INTERVAL,
        "resistive": _range(1e-9, 1.0),
        "conductive": _range(1.0, 1e9),
        "max_vertices": (lambda v: is_int(v) and v >= 3, "an integer >= 3"),
        "allow_empty": BOOL,
    }

    def __init__(self, max_inclusions: int = 3, shapes=SHAPES, radius=(0.015, 0.04), margin: float = 0.01,
                 min_gap: float = 0.005, background: float = 0.727, background_spread: float = 0.02,
                 resistive=(0.01, 0.1), conductive=(10.0, 100.0), max_vertices: int = 7,
                 allow_empty: bool = False) -> None:
        check_all("data.generator", self.RULES, dict(
            max_inclusions=max_inclusions, shapes=shapes, radius=radius, margin=margin, min_gap=min_gap,
            background=background, background_spread=background_spread, resistive=resistive,
            conductive=conductive, max_vertices=max_vertices, allow_empty=allow_empty))
        if radius[0] + margin >= RADIUS:
            raise ConfigError(f"data.generator.radius={list(radius)}: with margin {margin} no inclusion fits in the "
                              f"tank (radius {RADIUS} m)")
        spread = float(background_spread)
        if resistive[1] * (1 + spread) >= 1 - spread or conductive[0] * (1 - spread) <= 1 + spread:
            raise ConfigError(f"data.generator.background_spread={background_spread}: the water range overlaps the "
                              f"resistive {list(resistive)} or conductive {list(conductive)} factors")
        self.max_inclusions, self.shapes = int(max_inclusions), [str(s) for s in shapes]
        self.radius = (float(radius[0]), float(radius[1]))
        self.margin, self.min_gap = float(margin), float(min_gap)
        self.background, self.background_spread = float(background), spread
        self.resistive = (float(resistive[0]), float(resistive[1]))
        self.conductive = (float(conductive[0]), float(conductive[1]))
        self.max_vertices, self.allow_empty = int(max_vertices), bool(allow_empty)

    def metadata(self) -> dict:
        return {"generator": type(self).__name__, "max_inclusions": self.max_inclusions, "shapes": self.shapes,
                "radius": list(self.radius), "margin": self.margin, "min_gap": self.min_gap,
                "background": self.background, "background_spread": self.background_spread,
                "resistive": list(self.resistive), "conductive": list(self.conductive),
                "max_vertices": self.max_vertices, "allow_empty": self.allow_empty}

    # ------------------------------------------------------------------ geometry
    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Geometry and values of n targets with k = max_inclusions slots each, float64 on the CPU:
        active (n, k) bool, centre (n, k, 2) m, shape (n, k) (0 polygon, 1 blob), radius (n, k) m,
        vertex_angle / vertex_radius (n, k, V) (polygons; unused vertices repeat the last), fourier (n, k, 2, 4)
        (blobs), rho_max (n, k) m, label (n, k) (1 resistive, 2 conductive), value (n, k) S/m, water (n,) S/m.
        Targets that break the placement rules are redrawn with their inclusion count."""
        low = 0 if self.allow_empty else 1
        count = torch.randint(low, self.max_inclusions + 1, (n,), generator=generator)
        out = self._draw_once(count, generator)
        pending = ~self._valid(out)
        while bool(pending.any()):
            index = pending.nonzero()[:, 0]
            redraw = self._draw_once(count[index], generator)
            ok = self._valid(redraw)
            for key, value in redraw.items():
                out[key][index[ok]] = value[ok]
            pending[index[ok]] = False
        return out

    def _draw_once(self, count: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One draw of every target's inclusions, count (n,) active slots each; rules not yet checked."""
        n, k, v_max, f64 = count.shape[0], self.max_inclusions, self.max_vertices, torch.float64

        def rand(*shape):
            return torch.rand(*shape, generator=gen, dtype=f64)

        active = torch.arange(k)[None] < count[:, None]
        shape = torch.as_tensor([SHAPES.index(s) for s in self.shapes])[
            torch.randint(len(self.shapes), (n, k), generator=gen)]
        radius = self.radius[0] + (self.radius[1] - self.radius[0]) * rand(n, k)
        # polygons: V in 3..max_vertices at increasing angles, each step below pi; radii r U(0.6, 1)
        n_vert = torch.randint(3, v_max + 1, (n, k), generator=gen)
        unused = torch.arange(v_max) >= n_vert[..., None]
        steps = torch.where(unused, torch.zeros((), dtype=f64), _STEP_FLOOR + rand(n, k, v_max))
        before = torch.cumsum(steps, -1) - steps                      # vertex j at the sum of steps 0..j-1
        angles = 2 * math.pi * (before / steps.sum(-1, keepdim=True) + rand(n, k, 1))
        vertex_radius = radius[..., None] * (0.6 + 0.4 * rand(n, k, v_max))
        last = (n_vert - 1)[..., None]                                # unused vertices repeat the last one
        angles = torch.where(unused, angles.gather(-1, last), angles)
        vertex_radius = torch.where(unused, vertex_radius.gather(-1, last), vertex_radius)
        # blobs: Fourier coefficients decaying as m^-1.5
        modes = torch.arange(1, _N_MODES + 1, dtype=f64)
        fourier = (2 * rand(n, k, 2, _N_MODES) - 1) * _BLOB_AMPLITUDE / modes**1.5
        grid = torch.linspace(0, 2 * math.pi, _BLOB_GRID + 1, dtype=f64)[:-1]
        blob_max = self._blob_rho(radius[..., None], fourier, grid).amax(-1) * _BLOB_SLACK
        rho_max = torch.where(shape == 0, vertex_radius.amax(-1), blob_max)
        # centres uniform in the disc that keeps the bounding circle inside the tank with the margin
        reach = (RADIUS - self.margin - rho_max).clamp_min(0)
        r_c, t_c = reach * rand(n, k).sqrt(), 2 * math.pi * rand(n, k)
        centre = torch.stack([r_c * torch.cos(t_c), r_c * torch.sin(t_c)], -1)
        # classes and conductivities
        label = 1 + (rand(n, k) < 0.5).long()
        water = self.background * (1 + self.background_spread * (2 * rand(n) - 1))
        lo = torch.where(label == 1, math.log(self.resistive[0]), math.log(self.conductive[0]))
        hi = torch.where(label == 1, math.log(self.resistive[1]), math.log(self.conductive[1]))
        value = water[:, None] * torch.exp(lo + (hi - lo) * rand(n, k))
        return {"active": active, "centre": centre, "shape": shape, "radius": radius, "vertex_angle": angles,
                "vertex_radius": vertex_radius, "fourier": fourier, "rho_max": rho_max, "label": label,
                "value": value, "water": water}

    def _valid(self, draw: dict) -> torch.Tensor:
        """(n,) bool: every active inclusion fits inside the tank with the margin, and every pair keeps min_gap
        between its bounding circles."""
        active = draw["active"]
        fits = ((draw["rho_max"] <= RADIUS - self.margin) | ~active).all(dim=1)
        k = self.max_inclusions
        if k == 1:
            return fits
        i, j = torch.triu_indices(k, k, offset=1)
        dist = (draw["centre"][:, i] - draw["centre"][:, j]).norm(dim=-1)
        clear = dist >= draw["rho_max"][:, i] + draw["rho_max"][:, j] + self.min_gap
        return fits & (clear | ~(active[:, i] & active[:, j])).all(dim=1)

    @staticmethod
    def _blob_rho(radius: torch.Tensor, fourier: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """rho(theta) (..., T) in m of blobs: radius (..., 1) m, fourier (..., 2, M), theta (..., T) or (T,)."""
        m = torch.arange(1, fourier.shape[-1] + 1, dtype=theta.dtype)
        phase = theta[..., None] * m                                        # (..., T, M)
        wave = (torch.cos(phase) * fourier[..., 0, None, :] + torch.sin(phase) * fourier[..., 1, None, :]).sum(-1)
        return radius * (1 + wave).clamp_min(_BLOB_FLOOR)

    @staticmethod
    def _polygon_rho(angles: torch.Tensor, radii: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """rho(theta) (..., T) in m of star-shaped polygons with vertices at polar (angles, radii) (..., V) about
        the centre, angles non-decreasing over less than one turn with steps below pi; theta (..., T)."""
        v = angles.shape[-1]
        start = angles[..., :1]
        rel = torch.remainder(theta - start, 2 * math.pi)                   # (..., T) in [0, 2 pi)
        offsets = (angles - start).contiguous()                             # (..., V) from 0, non-decreasing
        index = (torch.searchsorted(offsets, rel.contiguous(), right=True) - 1).clamp(0, v - 1)
        nxt = torch.remainder(index + 1, v)
        a0, a1 = angles.gather(-1, index), angles.gather(-1, nxt)
        r0, r1 = radii.gather(-1, index), radii.gather(-1, nxt)
        p0 = torch.stack([r0 * torch.cos(a0), r0 * torch.sin(a0)], -1)
        edge = torch.stack([r1 * torch.cos(a1), r1 * torch.sin(a1)], -1) - p0
        # the ray t (cos theta, sin theta) meets p0 + s edge at t = cross(p0, edge) / cross(d, edge)
        num = p0[..., 0] * edge[..., 1] - p0[..., 1] * edge[..., 0]
        den = torch.cos(theta) * edge[..., 1] - torch.sin(theta) * edge[..., 0]
        return num / den

    def inside(self, draw: dict, points: torch.Tensor) -> torch.Tensor:
        """(n, k, P) bool: point (P, 2) m lies strictly inside active inclusion (n, k). rho(theta) is evaluated
        only where the point lies inside the bounding circle (rho <= rho_max), so the test is exact and cheap."""
        rel = points[None, None] - draw["centre"][:, :, None]              # (n, k, P, 2)
        dist = rel.norm(dim=-1)
        near = (dist < draw["rho_max"][..., None]) & draw["active"][..., None]
        b, s, p = near.nonzero(as_tuple=True)
        theta = torch.atan2(rel[b, s, p, 1], rel[b, s, p, 0])[:, None]     # (Q, 1)
        poly = draw["shape"][b, s] == 0
        rho = torch.empty_like(theta)
        rho[poly] = self._polygon_rho(draw["vertex_angle"][b, s][poly], draw["vertex_radius"][b, s][poly],
                                      theta[poly])
        rho[~poly] = self._blob_rho(draw["radius"][b, s][~poly, None], draw["fourier"][b, s][~poly], theta[~poly])
        out = torch.zeros_like(near)
        out[b, s, p] = dist[b, s, p] < rho[:, 0]
        return out

    def rasterise(self, draw: dict, centroids: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """sigma (n, E) S/m from a draw and element centroids (E, 2) m, in chunks of ``chunk`` targets."""
        out = [torch.empty(0, centroids.shape[0], dtype=torch.float64)]
        for start in range(0, draw["active"].shape[0], chunk):
            part = {key: value[start:start + chunk] for key, value in draw.items()}
            inside = self.inside(part, centroids)                            # (c, k, E), disjoint over k
            values = (inside * part["value"][..., None]).sum(1)
            out.append(torch.where(inside.any(1), values, part["water"][:, None]))
        return torch.cat(out)

    def labels(self, sigma: torch.Tensor) -> torch.Tensor:
        """(n, E) int64 classes of sigma (n, E) S/m: 1 (resistive) below, 2 (conductive) above the geometric
        means between the water range background (1 -+ spread) and the resistive / conductive ranges, else 0."""
        water = (1 - self.background_spread) * (1 + self.background_spread)
        low = self.background * math.sqrt(water * self.resistive[1])
        high = self.background * math.sqrt(water * self.conductive[0])
        return (sigma < low).long() + 2 * (sigma > high).long()

    def sample(self, operator: ForwardOperator, n: int, generator: torch.Generator, split: str = "") -> torch.Tensor:
        """(n, E) float64 conductivities (S/m) on the operator's mesh and device (``split`` does not matter:
        the splits differ by the generator's state)."""
        if int(n) < 0:
            raise ValueError(f"number of phantoms must be >= 0, got {n}")
        if not hasattr(operator, "centroids"):
            raise ConfigError(f"data.generator: KTCPhantoms needs an operator with element centroids "
                              f"(operator=ktc_cem), got {type(operator).__name__}")
        centroids = torch.as_tensor(operator.centroids, dtype=torch.float64)
        sigma = self.rasterise(self.draw(int(n), generator), centroids.cpu())
        return sigma.to(centroids.device)
