"""The KTC2023 difference-imaging baseline end to end: measurements -> conductivity change -> 256 x 256 labels.

Pipeline: the complete electrode model on a tank mesh (ours from :func:`ktc2023.tank_mesh`, or the
organisers' sparse/dense mesh), linearised at a homogeneous sigma0 (:class:`difference.DifferenceImaging`
with the reference method's smoothness prior and noise model), the level's removed electrodes masked,
nodal images on the challenge grid (:class:`pixel_grid.PixelMap`) and the organisers' three-class Otsu rule
(:func:`segmentation.segment_ktc`). The defaults are the reference method's settings as ``KTC_SCORING``
describes them (sigma0 = 1, z = 1e-6, one linear step); ``sigma0="fit"`` calibrates sigma0 and z on the
reference measurement first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepunroll.realdata import ktc2023
from deepunroll.realdata.difference import tank_difference_imaging
from deepunroll.realdata.pixel_grid import PixelMap
from deepunroll.realdata.segmentation import segment_ktc

MESH_CHOICES = ("ours",) + ktc2023.MESHES


@dataclass
class KTCSettings:
    """mesh: "ours" (built, h0 in tank radii) or the organisers' "sparse"/"dense" (read from mesh_root/mesh/);
    sigma0: linearisation conductivity (S/m, 2D-effective) or "fit"; contact_impedance (Ohm m, ignored with
    "fit"); prior_std (S/m) and prior_length (m) of the smoothness prior; pixel_mode "nodal" or "element"."""

    mesh: str = "ours"
    h0: float = 0.05
    mesh_root: str | None = None
    sigma0: float | str = 1.0
    contact_impedance: float = 1e-6
    gauss_newton_steps: int = 0
    prior_std: float = 0.05
    prior_length: float = ktc2023.RADIUS
    pixel_mode: str = "nodal"

    def __post_init__(self) -> None:
        if self.mesh not in MESH_CHOICES:
            raise ValueError(f"KTC settings: mesh must be one of {', '.join(MESH_CHOICES)}, got {self.mesh!r}")
        if self.mesh != "ours" and self.mesh_root is None:
            raise ValueError(f"KTC settings: mesh={self.mesh!r} needs mesh_root (the folder holding "
                             "mesh/Mesh_sparse.mat and mesh/Mesh_dense.mat)")
        if not (self.sigma0 == "fit" or (isinstance(self.sigma0, (int, float)) and self.sigma0 > 0)):
            raise ValueError(f"KTC settings: sigma0 must be a positive number or 'fit', got {self.sigma0!r}")
        if not self.contact_impedance > 0:
            raise ValueError(f"KTC settings: contact_impedance must be > 0, got {self.contact_impedance!r}")
        if self.pixel_mode not in ("nodal", "element"):
            raise ValueError(f"KTC settings: pixel_mode must be 'nodal' or 'element', got {self.pixel_mode!r}")


class KTCReconstructor:
    """Built once from the reference measurement ``ref`` ({"inj", "mpat", "uel"}, :func:`ktc2023.load_measurement`
    of ``ref.mat``): the mesh, the operator, the Jacobian at sigma0, the prior factor and the pixel map.

    ``images(data, level)`` (B, 256, 256) float conductivity changes (S/m, 0 outside the tank) and
    ``labels(data, level)`` (B, 256, 256) uint8 in {0, 1, 2} for data (B, 2356) (NaN where the level removed
    electrodes). ``calibration`` holds the fit when ``sigma0="fit"``, else None.
    """

    def __init__(self, ref: dict, settings: KTCSettings | None = None, device=None) -> None:
        self.settings = settings = settings or KTCSettings()
        if settings.mesh == "ours":
            nodes, elements, faces = ktc2023.tank_mesh(settings.h0)
        else:
            nodes, elements, faces = ktc2023.load_mesh(settings.mesh_root, settings.mesh)
        self.ref = ref
        self.n_elements = elements.shape[0]
        self.solver, self.calibration = tank_difference_imaging(
            (nodes, elements, faces), ref, settings.sigma0, settings.contact_impedance, settings.prior_std,
            settings.prior_length, settings.gauss_newton_steps, device=device)
        self.sigma0 = float(self.solver.sigma0[0, 0])
        self.pixels = PixelMap(nodes, elements, mode=settings.pixel_mode)

    def images(self, data: np.ndarray, level: int) -> np.ndarray:
        """(B, 256, 256) conductivity change images for data (B, 2356) or (2356,)."""
        keep = ktc2023.level_keep_mask(self.ref["inj"], self.ref["mpat"], level)
        return self.pixels(self.solver(np.atleast_2d(data), self.ref["uel"], keep))

    def labels(self, data: np.ndarray, level: int) -> np.ndarray:
        """(B, 256, 256) uint8 segmentations (0 water, 1 resistive, 2 conductive)."""
        return np.stack([segment_ktc(image) for image in self.images(data, level)])


def data_files(folder: str | Path) -> list[tuple[int, Path]]:
    """[(N, path)] of every ``dataN.mat`` in ``folder``, sorted by N."""
    found = []
    for path in Path(folder).glob("data*.mat"):
        stem = path.stem[len("data"):]
        if stem.isdigit():
            found.append((int(stem), path))
    return sorted(found)
