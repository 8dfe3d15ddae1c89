"""KTC2023 (Kuopio Tomography Challenge 2023) files: the organisers' meshes and the measurement files.

The data are published by the challenge (Zenodo; see the README's "Real data" section); deepunroll reads
them from a folder given as a setting (``root``), laid out as ``root/mesh/Mesh_{sparse,dense}.mat`` and
``root/training/{dataN,ref}.mat``. Facts used here: node coordinates ``g`` in metres (tank radius 0.115),
triangles ``H`` 0-based counter-clockwise, ``elfaces`` the 32 electrodes' boundary segments as 0-based node
pairs; ``Inj`` (32, 76) currents, ``Mpat`` (32, 31) measurement patterns (V_m - V_(m+1)), ``Uel`` (2356,)
voltages injection-major, NaN where a level removed data.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import scipy.io

from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.operators.eit.mesh import build_electrode_disk_mesh

MESHES = ("sparse", "dense")
RADIUS, N_ELECTRODES, N_LEVELS = 0.115, 32, 7
ELECTRODE_WIDTH = np.deg2rad(5.625)  # electrode k centred at 90 + (k - 1) 11.25 degrees, counter-clockwise


def tank_mesh(h0: float = 0.05) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Our own mesh of the KTC2023 tank (radius 0.115 m, 32 electrodes of 5.625 degrees, electrode 1 at the top,
    numbered counter-clockwise): (nodes (N, 2) in m, elements (E, 3), electrode faces); h0 in tank radii.
    Built once per h0 (distmesh takes a second or so); each call returns fresh copies."""
    nodes, elements, faces = _tank_mesh(float(h0))
    return nodes.copy(), elements.copy(), [f.copy() for f in faces]


@functools.lru_cache(maxsize=4)
def _tank_mesh(h0: float) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    return build_electrode_disk_mesh(N_ELECTRODES, h0, ELECTRODE_WIDTH, first_angle=np.pi / 2, radius=RADIUS)


def removed_electrodes(level: int) -> np.ndarray:
    """0-based indices of the electrodes level L removes: electrodes 1 .. 2(L - 1) (1-based)."""
    if not (isinstance(level, (int, np.integer)) and 1 <= level <= N_LEVELS):
        raise ValueError(f"KTC2023 level must be an integer in 1..{N_LEVELS}, got {level!r}")
    return np.arange(2 * (level - 1))


def level_keep_mask(inj: np.ndarray, mpat: np.ndarray, level: int) -> np.ndarray:
    """(n_inj * n_meas,) bool, injection-major: True where neither the injection nor the measurement pattern
    touches an electrode that ``level`` removed (equals the non-NaN pattern of the level files)."""
    removed = removed_electrodes(level)
    inj_ok = ~np.any(inj[removed] != 0, axis=0)
    meas_ok = ~np.any(mpat[removed] != 0, axis=0)
    return (inj_ok[:, None] & meas_ok[None, :]).reshape(-1)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"KTC2023: {path} does not exist (expected the challenge's files under the data root)")
    return scipy.io.loadmat(str(path))


def load_mesh(root: str | Path, which: str = "sparse") -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(nodes (N, 2) in m, elements (E, 3), electrode faces: 32 arrays (k, 2)) of the organisers' 1st-order mesh."""
    if which not in MESHES:
        raise ValueError(f"KTC2023 mesh must be one of {', '.join(MESHES)}, got {which!r}")
    mesh = _load(Path(root) / "mesh" / f"Mesh_{which}.mat")
    faces = [np.asarray(f, dtype=np.int64).reshape(-1, 2) for f in mesh["elfaces"].reshape(-1)]
    return np.asarray(mesh["g"], dtype=np.float64), np.asarray(mesh["H"], dtype=np.int64), faces


def load_measurement(path: str | Path) -> dict[str, np.ndarray]:
    """{"inj": (32, 76), "mpat": (32, 31), "uel": (2356,) with NaN kept} from a ``dataN.mat`` or ``ref.mat``."""
    data = _load(Path(path))
    suffix = "ref" if "Uelref" in data else ""
    try:
        return {"inj": np.asarray(data["Inj" + suffix], dtype=np.float64),
                "mpat": np.asarray(data["Mpat"], dtype=np.float64),
                "uel": np.asarray(data["Uel" + suffix], dtype=np.float64).reshape(-1)}
    except KeyError as missing:
        raise ValueError(f"KTC2023: {path} has no {missing} array (expected Inj/Mpat/Uel or Injref/Mpat/Uelref)")


def ktc_operator(root: str | Path, which: str = "sparse", contact_impedance=1e-6,
                 device=None) -> CompleteElectrodeModel:
    """The CEM on the organisers' mesh with the challenge's injection and measurement patterns."""
    nodes, elements, faces = load_mesh(root, which)
    ref = load_measurement(Path(root) / "training" / "ref.mat")
    return CompleteElectrodeModel(nodes, elements, faces, ref["inj"], ref["mpat"], contact_impedance, device=device)
