"""Mesh values to a square pixel image: the 256 x 256 KTC2023 grid and its orientation.

The KTC2023 convention (data README, §1.8): the image covers [-r, r]^2 (r = 0.115 m), columns grow with x,
rows grow downwards (decreasing y); the organisers place pixel centres at linspace(-r + w/2, r + w/2, n) with
w = 2r/n (spacing 2r/(n-1), the last centre just outside the tank), and pixels outside the mesh are 0.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from matplotlib.tri import Triangulation

from deepunroll.operators.eit.mesh import signed_areas


def ktc_pixel_centres(n: int = 256, radius: float = 0.115) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the pixel centres, each (n, n): row i, column j at (c_j, c_(n-1-i)), c = linspace(-r + w/2, r + w/2, n)."""
    w = 2 * radius / n
    c = np.linspace(-radius + w / 2, radius + w / 2, n)
    x, y = np.meshgrid(c, c[::-1])
    return x, y


def element_to_node(nodes: np.ndarray, elements: np.ndarray) -> sp.csr_matrix:
    """(N, E) area-weighted averaging: nodal value = mean of the adjacent elements' values, weighted by area."""
    area = signed_areas(nodes, elements)
    rows = elements.reshape(-1)
    cols = np.repeat(np.arange(elements.shape[0]), 3)
    weights = sp.csr_matrix((np.repeat(area, 3), (rows, cols)), shape=(nodes.shape[0], elements.shape[0]))
    return sp.diags(1.0 / np.asarray(weights.sum(axis=1)).reshape(-1)) @ weights


class PixelMap:
    """Linear map from per-element values (B, E) to images (B, n, n).

    ``mode="nodal"`` (default) averages the elements onto the nodes (by area) and interpolates linearly
    inside each triangle, like the organisers' nodal images; ``mode="element"`` gives each pixel the value
    of the triangle containing its centre. Pixels outside the mesh are 0. nodes (N, 2) in the units of
    ``radius`` (m for KTC2023); elements (E, 3).
    """

    def __init__(self, nodes: np.ndarray, elements: np.ndarray, n: int = 256, radius: float = 0.115,
                 mode: str = "nodal") -> None:
        if mode not in ("nodal", "element"):
            raise ValueError(f"PixelMap: mode must be 'nodal' or 'element', got {mode!r}")
        nodes, elements = np.asarray(nodes, dtype=np.float64), np.asarray(elements, dtype=np.int64)
        x, y = ktc_pixel_centres(n, radius)
        points = np.stack([x.reshape(-1), y.reshape(-1)], axis=1)
        triangle = Triangulation(nodes[:, 0], nodes[:, 1], elements).get_trifinder()(points[:, 0], points[:, 1])
        inside = np.flatnonzero(triangle >= 0)
        tri = triangle[inside]
        if mode == "element":
            matrix = sp.csr_matrix((np.ones(inside.size), (inside, tri)), shape=(n * n, elements.shape[0]))
        else:
            corners = nodes[elements[tri]]  # (P, 3, 2)
            e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
            d = points[inside] - corners[:, 0]
            det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
            l1 = (d[:, 0] * e2[:, 1] - d[:, 1] * e2[:, 0]) / det
            l2 = (e1[:, 0] * d[:, 1] - e1[:, 1] * d[:, 0]) / det
            bary = np.stack([1 - l1 - l2, l1, l2], axis=1)
            interp = sp.csr_matrix((bary.reshape(-1), (np.repeat(inside, 3), elements[tri].reshape(-1))),
                                   shape=(n * n, nodes.shape[0]))
            matrix = interp @ element_to_node(nodes, elements)
        self.n, self.inside = n, inside
        self.matrix = matrix.tocsr()

    def __call__(self, values) -> np.ndarray:
        """Images (B, n, n) (or (n, n) for a single (E,) vector) of float64 values."""
        values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
        images = (self.matrix @ flat.T).T.reshape(-1, self.n, self.n)
        return images[0] if values.ndim == 1 else images
