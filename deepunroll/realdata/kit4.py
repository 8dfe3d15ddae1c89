"""KIT4 open 2D EIT archive (Hauptmann et al., arXiv:1704.01178; Zenodo 1203914): a 16-electrode tank.

deepunroll reads the files from a folder given as a setting (``root``) holding ``datamat_A_B.mat``
(experiment A.B; ``datamat_1_0.mat`` is the empty tank). Facts used here: ``CurrentPattern`` (16, 79)
entries 0 or +-sqrt(2) (columns 1-64 skip 0-3 pairs, 65-79 "all against 1": +k, -1 for k = 2..16), the same
in every file; ``MeasPattern`` (16, 16) cyclic adjacent differences (column m: V_m - V_(m+1), column 16:
V_16 - V_1), each column summing to 0; ``Uel`` (16, 79) with Uel[m, i] measurement m of injection i. Units
of currents and voltages are not stated. The files carry no geometry; eitinn and FEIT model a tank of radius
14 cm with 16 electrodes of 2.5 cm arc, electrode 1 centred at 90 degrees and the rest numbered clockwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.operators.eit.mesh import build_electrode_disk_mesh
from deepunroll.realdata.difference import tank_difference_imaging
from deepunroll.realdata.pixel_grid import PixelMap

N_ELECTRODES, RADIUS, ELECTRODE_LENGTH = 16, 0.14, 0.025  # m
ALL_AGAINST_1 = np.arange(64, 79)  # 0-based injection columns 65-79, the ones eitinn and FEIT reconstruct from
EMPTY_TANK = "datamat_1_0.mat"


def load_measurement(path: str | Path, columns=None) -> dict[str, np.ndarray]:
    """{"inj": (16, n) currents, "mpat": (16, 16), "uel": (n * 16,) injection-major} from a ``datamat_A_B.mat``;
    n = 79, or the 0-based injection ``columns`` picked. Currents are divided by sqrt(2) (entries +-1), as
    eitinn and FEIT do; ``uel`` is ``Uel.T.reshape(-1)``, entry i * 16 + m = measurement m of injection i."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KIT4: {path} does not exist (expected the archive's datamat_A_B.mat files)")
    data = scipy.io.loadmat(str(path))
    try:
        inj, mpat, uel = data["CurrentPattern"], data["MeasPattern"], data["Uel"]
    except KeyError as missing:
        raise ValueError(f"KIT4: {path} has no {missing} array (expected CurrentPattern/MeasPattern/Uel)")
    columns = slice(None) if columns is None else columns
    return {"inj": np.asarray(inj, dtype=np.float64)[:, columns] / np.sqrt(2),
            "mpat": np.asarray(mpat, dtype=np.float64),
            "uel": np.ascontiguousarray(np.asarray(uel, dtype=np.float64).T[columns]).reshape(-1)}


def kit4_mesh(h0: float = 0.05, radius: float = RADIUS) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(nodes (N, 2) in the unit of ``radius`` (m by default), elements (E, 3), faces: 16 arrays (k, 2)) of the
    tank: electrodes of 2.5/14 rad, electrode l (0-based) centred at 90 - 22.5 l degrees. h0 in tank radii."""
    return build_electrode_disk_mesh(N_ELECTRODES, h0, ELECTRODE_LENGTH / RADIUS, np.pi / 2, radius, clockwise=True)


def kit4_operator(root: str | Path, h0: float = 0.05, contact_impedance=1e-4, columns=None,
                  device=None) -> CompleteElectrodeModel:
    """The CEM on :func:`kit4_mesh` (metres) with the files' patterns (currents / sqrt 2), all 79 injections or
    the 0-based ``columns`` (e.g. :data:`ALL_AGAINST_1`); contact_impedance in Ohm m (1e-4: near the fit)."""
    nodes, elements, faces = kit4_mesh(h0)
    ref = load_measurement(Path(root) / EMPTY_TANK, columns)
    return CompleteElectrodeModel(nodes, elements, faces, ref["inj"], ref["mpat"], contact_impedance, device=device)


def target_names(root: str | Path) -> list[str]:
    """Experiment names "A_B" of every ``datamat_A_B.mat`` in ``root`` except the empty tank, in (A, B) order."""
    names = [p.stem[len("datamat_"):] for p in Path(root).glob("datamat_*_*.mat")]
    names = [n for n in names if all(part.isdigit() for part in n.split("_")) and f"datamat_{n}.mat" != EMPTY_TANK]
    if not names:
        raise FileNotFoundError(f"KIT4: no datamat_A_B.mat target files in {root}")
    return sorted(names, key=lambda n: tuple(int(part) for part in n.split("_")))


def load_targets(root: str | Path, columns=None) -> tuple[list[str], np.ndarray]:
    """(names, voltages (T, n * 16)) of every target in ``root`` (:func:`target_names`, :func:`load_measurement`)."""
    names = target_names(root)
    return names, np.stack([load_measurement(Path(root) / f"datamat_{n}.mat", columns)["uel"] for n in names])


class KIT4Difference:
    """Difference imaging of the KIT4 tank: sigma0 and one contact impedance fitted to ``datamat_1_0`` on
    :func:`kit4_mesh` (``calibration``), then the MAP estimate with the KTC2023 reference method's smoothness
    prior (prior_std in the fitted conductivity's unit, correlation 1 % at prior_length m) and noise model on
    the empty tank. ``columns``: the injections used (None: all 79).

    ``changes(data)`` (T, E) conductivity changes for voltages (T, n * 16); ``images(data)`` (T, n, n) with
    n = image_size on a square grid over the tank (+y up, as the electrode-1-at-the-top photos), and
    ``tank_mask`` (n, n) bool the pixels inside the tank.
    """

    def __init__(self, root: str | Path, h0: float = 0.05, columns=None, gauss_newton_steps: int = 0,
                 prior_std: float = 0.05, prior_length: float = RADIUS, image_size: int = 128, device=None) -> None:
        self.nodes, self.elements, faces = kit4_mesh(h0)
        self.reference = load_measurement(Path(root) / EMPTY_TANK, columns)
        self.solver, self.calibration = tank_difference_imaging(
            (self.nodes, self.elements, faces), self.reference, "fit", 1e-4, prior_std, prior_length,
            gauss_newton_steps, device=device)
        self.pixels = PixelMap(self.nodes, self.elements, image_size, RADIUS)
        self.tank_mask = np.zeros(image_size * image_size, dtype=bool)
        self.tank_mask[self.pixels.inside] = True
        self.tank_mask = self.tank_mask.reshape(image_size, image_size)

    def changes(self, data: np.ndarray) -> np.ndarray:
        """(T, E) float64 conductivity changes."""
        return self.solver(np.atleast_2d(data), self.reference["uel"]).cpu().numpy()

    def images(self, data: np.ndarray) -> np.ndarray:
        """(T, n, n) nodal images of :meth:`changes`, 0 outside the tank."""
        return self.pixels(self.changes(data))
