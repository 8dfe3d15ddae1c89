"""Disk mesh for EIT (built by pyEIT) and the per-element geometry the batched FEM needs.

Conventions follow pyEIT 1.2.4: nodes (N, 2) in units of the disk radius, triangles (E, 3)
counter-clockwise, point electrodes on the nodes ``el_pos``, one grounded reference node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyeit.mesh
from pyeit.mesh import PyEITMesh


def build_disk_mesh(n_electrodes: int = 16, h0: float = 0.1) -> PyEITMesh:
    """pyEIT's unit-disk mesh: ``pyeit.mesh.create(n_electrodes, h0=h0)`` (h0=0.1: 376 nodes, 686 elements).

    pyEIT's generator draws from NumPy's global RNG (a rejection step that keeps every point
    for the uniform size function, so the mesh is deterministic). We run it under a fixed
    seed and restore the caller's global RNG state afterwards, so building an operator
    neither depends on nor disturbs ``np.random``.
    """
    if int(n_electrodes) < 3:
        raise ValueError(f"n_electrodes must be >= 3, got {n_electrodes}")
    if not 0.0 < float(h0) <= 0.5:
        raise ValueError(f"h0 (mesh size, in disk radii) must be in (0, 0.5], got {h0}")
    state = np.random.get_state()
    try:
        np.random.seed(0)
        return pyeit.mesh.create(int(n_electrodes), h0=float(h0))
    finally:
        np.random.set_state(state)


def build_electrode_disk_mesh(n_electrodes: int, h0: float, width: float, first_angle: float = np.pi / 2,
                              radius: float = 1.0, clockwise: bool = False,
                              ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A disk mesh whose boundary follows the electrodes: (nodes (N, 2), elements (E, 3) CCW, faces).

    Electrode l is the arc of angular ``width`` (rad) centred at ``first_angle + 2 pi l / n_electrodes``
    (numbered counter-clockwise), or at ``first_angle - 2 pi l / n_electrodes`` with ``clockwise`` (e.g. the
    KIT4 tank); its end points and points at most h0 apart along it are fixed nodes of pyEIT's
    distmesh (h0 in disk radii), and faces[l] (k, 2) lists its boundary segments. Coordinates are scaled
    by ``radius`` (e.g. 0.115 m for the KTC2023 tank).
    """
    n_electrodes, h0, width = int(n_electrodes), float(h0), float(width)
    if n_electrodes < 2 or not 0 < width < 2 * np.pi / n_electrodes:
        raise ValueError(f"electrode mesh: need >= 2 electrodes narrower than their spacing, got {n_electrodes} "
                         f"of width {width} rad")
    if not 0.0 < h0 <= 0.5:
        raise ValueError(f"h0 (mesh size, in disk radii) must be in (0, 0.5], got {h0}")
    centres = first_angle + (-2 if clockwise else 2) * np.pi * np.arange(n_electrodes) / n_electrodes
    per_arc = max(2, int(np.ceil(width / h0)) + 1)
    offsets = np.linspace(-width / 2, width / 2, per_arc)
    angles = (centres[:, None] + offsets[None, :]).reshape(-1)
    fixed = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    state = np.random.get_state()
    try:
        np.random.seed(0)
        mesh = pyeit.mesh.create(n_electrodes, h0=h0, p_fix=fixed)
    finally:
        np.random.set_state(state)
    nodes, elements = np.ascontiguousarray(mesh.node[:, :2]), np.ascontiguousarray(mesh.element, dtype=np.int64)
    edges = np.sort(elements[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    boundary = unique[counts == 1]
    theta = np.arctan2(nodes[:, 1], nodes[:, 0])
    faces = []
    for centre in centres:
        offset = np.angle(np.exp(1j * (theta[boundary] - centre)))  # (k, 2) angles from the centre
        inside = np.all(np.abs(offset) <= width / 2 + 1e-9, axis=1)
        if not inside.any():
            raise ValueError(f"electrode mesh: no boundary segment on the electrode at {centre:.3f} rad (h0 too large?)")
        faces.append(boundary[inside])
    return nodes * float(radius), elements, faces


@dataclass(frozen=True)
class MeshGeometry:
    """Plain arrays describing a 2D triangle mesh with point electrodes.

    nodes (N, 2) float64; elements (E, 3) int64 (CCW); el_pos (n_el,) node index of each
    electrode; ref_node: the grounded node (potential 0).
    """

    nodes: np.ndarray
    elements: np.ndarray
    el_pos: np.ndarray
    ref_node: int

    @classmethod
    def from_pyeit(cls, mesh: PyEITMesh) -> "MeshGeometry":
        """Copy the arrays of a 2D ``PyEITMesh`` (z coordinates dropped), validating them."""
        if not isinstance(mesh, PyEITMesh):
            raise TypeError(f"mesh must be a pyeit.mesh.PyEITMesh, got {type(mesh).__name__}")
        if mesh.element.shape[1] != 3:
            raise ValueError(f"mesh.element must be triangles (E, 3); got shape {mesh.element.shape} (3D not supported)")
        geometry = cls(
            nodes=np.ascontiguousarray(mesh.node[:, :2], dtype=np.float64),
            elements=np.ascontiguousarray(mesh.element, dtype=np.int64),
            el_pos=np.ascontiguousarray(np.asarray(mesh.el_pos).reshape(-1), dtype=np.int64),
            ref_node=int(mesh.ref_node),
        )
        geometry.validate()
        return geometry

    @property
    def n_nodes(self) -> int:
        return self.nodes.shape[0]

    @property
    def n_elems(self) -> int:
        return self.elements.shape[0]

    @property
    def n_el(self) -> int:
        return self.el_pos.shape[0]

    def validate(self) -> None:
        """Raise ``ValueError`` on out-of-range indices or non-CCW / degenerate triangles."""
        n = self.n_nodes
        check_triangles(self.nodes, self.elements)
        if self.el_pos.min() < 0 or self.el_pos.max() >= n:
            raise ValueError(f"mesh.el_pos must be node indices in [0, {n}); got {self.el_pos.tolist()}")
        if not 0 <= self.ref_node < n:
            raise ValueError(f"mesh.ref_node must be a node index in [0, {n}); got {self.ref_node}")

    def centroids(self) -> np.ndarray:
        """Element centroids (E, 2): the mean of the three vertices."""
        return self.nodes[self.elements].mean(axis=1)


def check_triangles(nodes: np.ndarray, elements: np.ndarray) -> None:
    """Raise ``ValueError`` unless every triangle indexes existing nodes and is counter-clockwise with positive area."""
    n = nodes.shape[0]
    if elements.min() < 0 or elements.max() >= n:
        raise ValueError(f"mesh.element indices must lie in [0, {n}); got [{elements.min()}, {elements.max()}]")
    bad = int((signed_areas(nodes, elements) <= 0).sum())
    if bad:
        raise ValueError(
            f"mesh has {bad} triangles that are clockwise or degenerate; expected counter-clockwise "
            "elements with positive area (pyeit.mesh.check_order fixes the orientation)"
        )


def signed_areas(nodes: np.ndarray, elements: np.ndarray) -> np.ndarray:
    """Signed triangle areas (E,): positive for counter-clockwise vertex order."""
    xy = nodes[elements]
    e1, e2 = xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def scaled_edges(nodes: np.ndarray, elements: np.ndarray) -> np.ndarray:
    """Edge vectors opposite each vertex divided by sqrt(4 area): S (E, 3, 2).

    The P1 element stiffness matrix at unit conductivity is K_e = S_e S_e^T
    (K_e[i, j] = grad(phi_i) . grad(phi_j) * area), so for nodal vectors u, w:
    u^T K_e w = (S_e^T u) . (S_e^T w). Dimensionless (conductivity 1 S, unit disk).
    """
    xy = nodes[elements]  # (E, 3, 2)
    edges = xy[:, [2, 0, 1]] - xy[:, [1, 2, 0]]  # edge opposite vertex i
    area = signed_areas(nodes, elements)
    return edges / np.sqrt(4.0 * area)[:, None, None]
