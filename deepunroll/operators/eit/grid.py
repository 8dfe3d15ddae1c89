"""Mesh <-> pixel-grid maps and the EIT operator seen from a pixel grid (``domain=grid``)."""

from __future__ import annotations

import torch

from deepunroll.operators.base import ForwardOperator


def grid_centres(resolution: int, dtype=torch.float64) -> torch.Tensor:
    """Pixel centres of a resolution x resolution grid over [-1, 1]^2: (resolution,)."""
    return -1 + (torch.arange(resolution, dtype=dtype) + 0.5) * 2 / resolution


class MeshGrid(torch.nn.Module):
    """Linear maps between element values (B, n_elems) and images (B, n, n) over [-1, 1]^2.

    ``to_mesh``: bilinear interpolation of the image at each element centroid (rows of ``project``
    sum to 1). ``to_grid``: each pixel takes the value of the element whose centroid is nearest
    to the pixel centre (pixels outside the disk take the nearest boundary element).
    Image row i is y = grid_centres[i], column j is x = grid_centres[j].
    """

    def __init__(self, centroids: torch.Tensor, resolution: int = 32) -> None:
        super().__init__()
        if int(resolution) != resolution or resolution < 2:
            raise ValueError(f"domain.size={resolution!r}; expected an integer >= 2")
        n = self.resolution = int(resolution)
        centroids = torch.as_tensor(centroids, dtype=torch.float64).cpu()
        n_elems = centroids.shape[0]
        frac = ((centroids + 1) / 2 * n - 0.5).clamp(0, n - 1)  # fractional (x, y) pixel index
        low = frac.floor().clamp(max=n - 2).long()
        w = frac - low
        project = torch.zeros(n_elems, n * n, dtype=torch.float64)
        rows = torch.arange(n_elems)
        for dy in (0, 1):
            for dx in (0, 1):
                weight = (w[:, 0] if dx else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1])
                project.index_put_((rows, (low[:, 1] + dy) * n + low[:, 0] + dx), weight, accumulate=True)
        c = grid_centres(n)
        pixels = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1).reshape(-1, 2)  # (n*n, (x, y))
        nearest = torch.cdist(pixels, centroids).argmin(dim=1)
        lift = torch.zeros(n * n, n_elems, dtype=torch.float64)
        lift[torch.arange(n * n), nearest] = 1.0
        self.register_buffer("project", project, persistent=False)
        self.register_buffer("lift", lift, persistent=False)

    def to_mesh(self, image: torch.Tensor) -> torch.Tensor:
        """(B, n, n) -> (B, n_elems)."""
        return image.flatten(1) @ self.project.T.to(image.dtype)

    def to_grid(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B, n_elems) -> (B, n, n)."""
        return (sigma @ self.lift.T.to(sigma.dtype)).reshape(-1, self.resolution, self.resolution)


class GridOperator(ForwardOperator):
    """F(to_mesh(z)) for images z (B, n, n): a mesh operator seen from a pixel grid.

    vjp, misfit_grad and jacobian use the mesh operator's exact versions and the adjoint of
    ``to_mesh`` (its transpose). The grid spans the disk of radius ``mesh_operator.radius`` (absent: 1, the
    unit disk of the EIT operator; the KTC2023 tank: 0.115 m).
    """

    def __init__(self, mesh_operator: ForwardOperator, resolution: int = 32) -> None:
        super().__init__()
        self.mesh_operator = mesh_operator
        radius = float(getattr(mesh_operator, "radius", 1.0))
        self.grid = MeshGrid(torch.as_tensor(mesh_operator.centroids, dtype=torch.float64) / radius, resolution)
        self.in_shape = (self.grid.resolution, self.grid.resolution)
        self.out_shape = tuple(mesh_operator.out_shape)

    def _to_image(self, element_values: torch.Tensor) -> torch.Tensor:
        """Adjoint of to_mesh: (B, n_elems) -> (B, n, n)."""
        return (element_values @ self.grid.project.to(element_values.dtype)).reshape(-1, *self.in_shape)

    def _forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mesh_operator(self.grid.to_mesh(z))

    def _vjp(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._to_image(self.mesh_operator.vjp(self.grid.to_mesh(z), v))

    def _jacobian(self, z: torch.Tensor) -> torch.Tensor:
        return self.mesh_operator.jacobian(self.grid.to_mesh(z)) @ self.grid.project.to(z.dtype)

    def reference_point(self) -> torch.Tensor:
        return self.grid.to_grid(self.mesh_operator.reference_point())

    def linearize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, J) from one mesh linearisation: J = J_mesh @ project, (B, n_meas, n*n)."""
        self.check_input(z)
        predicted, jac = self.mesh_operator.linearize(self.grid.to_mesh(z))
        return predicted, jac @ self.grid.project.to(jac.dtype)

    def observed(self, y: torch.Tensor) -> torch.Tensor | None:
        return self.mesh_operator.observed(y)

    def misfit_grad(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.check_input(z)
        return self._to_image(self.mesh_operator.misfit_grad(self.grid.to_mesh(z), y))
