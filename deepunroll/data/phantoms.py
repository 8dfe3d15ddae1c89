"""Published EIT phantoms: non-overlapping circular inclusions in a unit disk of background 1.0.

2 inclusions: centres U(-0.6, 0.6)^2, radii 0.2 + 0.1 U, values 2.0, 0.5;
3 inclusions: centres U(-0.55, 0.55)^2, radii 0.15 + 0.1 U, values 2.0, 1.5, 0.5;
4 inclusions: as 3 with a fourth value 0.3.
A draw is rejected when any two circles are closer than ``margin``:
|c_i - c_j| < r_i + r_j + margin. An element takes an inclusion's value when its centroid
lies strictly inside the circle (as pyEIT's ``set_perm``); later inclusions win.
"""

from __future__ import annotations

import torch

from deepunroll.operators.base import ForwardOperator

PUBLISHED = {
    2: {"centre_range": 0.6, "radius_min": 0.2, "radius_span": 0.1, "values": [2.0, 0.5]},
    3: {"centre_range": 0.55, "radius_min": 0.15, "radius_span": 0.1, "values": [2.0, 1.5, 0.5]},
    4: {"centre_range": 0.55, "radius_min": 0.15, "radius_span": 0.1, "values": [2.0, 1.5, 0.5, 0.3]},
}


class EITPhantoms:
    """sigma (n, n_elems): background + ``n_inclusions`` disjoint circular inclusions (S per element).
    The published x0 (Gauss-Newton from the background) is the ``x0=gauss_newton`` config group.
    """

    def __init__(self, n_inclusions: int = 2, margin: float = 0.05, background: float = 1.0) -> None:
        if int(n_inclusions) not in PUBLISHED:
            raise ValueError(f"data.generator.n_inclusions={n_inclusions}; expected one of {sorted(PUBLISHED)}")
        if margin < 0:
            raise ValueError(f"data.generator.margin={margin}; expected >= 0")
        if not background > 0:
            raise ValueError(f"data.generator.background={background}; expected a positive conductivity")
        self.n_inclusions, self.margin, self.background = int(n_inclusions), float(margin), float(background)
        self.layout = PUBLISHED[self.n_inclusions]

    def metadata(self) -> dict:
        return {
            "generator": type(self).__name__,
            "n_inclusions": self.n_inclusions,
            "margin": self.margin,
            "background": self.background,
            **{key: (list(value) if isinstance(value, list) else value) for key, value in self.layout.items()},
        }

    def draw_circles(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres (n, k, 2) and radii (n, k), float64, by vectorised rejection of overlapping draws."""
        k, layout = self.n_inclusions, self.layout
        pair_i, pair_j = torch.triu_indices(k, k, offset=1)
        centres = [torch.empty(0, k, 2, dtype=torch.float64)]
        radii, n_kept = [torch.empty(0, k, dtype=torch.float64)], 0
        while n_kept < n:
            batch = max(1024, 40 * (n - n_kept))  # acceptance is ~3 % for 4 inclusions
            xy = (2 * torch.rand(batch, 2, k, generator=generator, dtype=torch.float64) - 1) * layout["centre_range"]
            r = layout["radius_min"] + layout["radius_span"] * torch.rand(batch, k, generator=generator, dtype=torch.float64)
            xy = xy.transpose(1, 2)  # (batch, k, 2): all x drawn, then all y, as the published script
            gap = (xy[:, pair_i] - xy[:, pair_j]).square().sum(-1)
            ok = (gap >= (r[:, pair_i] + r[:, pair_j] + self.margin).square()).all(dim=1)
            centres.append(xy[ok])
            radii.append(r[ok])
            n_kept += int(ok.sum())
        return torch.cat(centres)[:n], torch.cat(radii)[:n]

    def rasterise(self, centroids: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """sigma (n, E) from element centroids (E, 2), centres (n, k, 2), radii (n, k)."""
        dist_sq = (centroids[None, None] - centres[:, :, None]).square().sum(-1)  # (n, k, E)
        inside = dist_sq < radii[..., None].square()
        sigma = torch.full(dist_sq[:, 0].shape, self.background, dtype=centroids.dtype, device=centroids.device)
        for index, value in enumerate(self.layout["values"]):
            sigma = torch.where(inside[:, index], torch.as_tensor(value, dtype=sigma.dtype), sigma)
        return sigma

    def sample(self, operator: ForwardOperator, n: int, generator: torch.Generator, split: str = "") -> torch.Tensor:
        """(n, n_elems) float64 phantoms on the operator's mesh, on the operator's device."""
        if int(n) < 0:
            raise ValueError(f"number of phantoms must be >= 0, got {n}")
        centres, radii = self.draw_circles(int(n), generator)
        centroids = operator.centroids.to(torch.float64)
        return self.rasterise(centroids, centres.to(centroids.device), radii.to(centroids.device))
