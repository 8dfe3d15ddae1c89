"""Excitation / measurement protocols (pyEIT's), limited-electrode and row-subset variants.

A measurement row is (a, b, n, m): +1 A injected at electrode a, -1 A at electrode b, and
the voltage V = phi(el n) - phi(el m) read (pyEIT's ``subtract_row``: meas_mat[:, 0] minus
meas_mat[:, 1]). Electrode indices are the mesh's (0 .. n_el-1, node ``el_pos[i]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyeit.eit.protocol
from pyeit.eit.protocol import PyEITProtocol


def plain(value: int | str | Sequence) -> int | str | list:
    """A config value as plain Python: sequences (lists, tuples, Hydra ListConfig) -> list, else as is."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [item for item in value]
    return value


def build_protocol(n_el: int = 16, dist_exc: int | list[int] = 1, step_meas: int = 1, parser: str | list[str] = "std") -> PyEITProtocol:
    """``pyeit.eit.protocol.create(n_el, dist_exc, step_meas, parser)``; adjacent/"std" with 16 electrodes: 208 rows."""
    dist_exc = plain(dist_exc)
    dist_exc = [int(d) for d in dist_exc] if isinstance(dist_exc, list) else int(dist_exc)
    parser = plain(parser)
    parser = [str(p) for p in parser] if isinstance(parser, list) else str(parser)
    for dist in dist_exc if isinstance(dist_exc, list) else [dist_exc]:
        if dist % int(n_el) == 0:
            raise ValueError(f"operator.dist_exc={dist} puts source and sink on the same electrode (n_el={n_el})")
    return pyeit.eit.protocol.create(int(n_el), dist_exc=dist_exc, step_meas=int(step_meas), parser_meas=parser)


def check_electrodes(electrodes: Sequence[int] | None, n_el: int) -> list[int] | None:
    """Validate ``operator.electrodes``: distinct mesh electrode indices, >= 4 of them, returned sorted."""
    if electrodes is None:
        return None
    kept = sorted(int(e) for e in electrodes)
    if len(set(kept)) != len(kept):
        raise ValueError(f"operator.electrodes must be distinct electrode indices, got {list(electrodes)}")
    if len(kept) < 4 or kept[0] < 0 or kept[-1] >= n_el:
        raise ValueError(
            f"operator.electrodes must hold at least 4 indices in [0, {n_el}) (an adjacent protocol needs 4); got {list(electrodes)}"
        )
    return kept


def select_rows(n_rows: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded subset of protocol rows: round(fraction * n_rows) (>= 1) distinct indices, sorted."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"operator.meas_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(n_rows, dtype=np.int64)
    n_keep = max(1, int(round(fraction * n_rows)))
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(n_rows, size=n_keep, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class MeasurementPlan:
    """The rows an operator measures.

    ex_mat (n_exc, 2) and meas_mat (n_exc, n_per_exc, 2): the full protocol, pyEIT layout, in
    mesh electrode indices. rows (n_meas,): the kept rows of its flattened (n_exc * n_per_exc)
    list. abmn (n_meas, 4): the kept rows as (a, b, n, m). active (n_act,): the electrodes any
    kept row uses (the only ones whose unit-current fields are solved for).
    """

    ex_mat: np.ndarray
    meas_mat: np.ndarray
    rows: np.ndarray
    abmn: np.ndarray
    active: np.ndarray

    @classmethod
    def from_protocol(
        cls,
        protocol: PyEITProtocol,
        electrodes: Sequence[int] | None = None,
        meas_fraction: float = 1.0,
        meas_seed: int = 0,
    ) -> "MeasurementPlan":
        """Plan from a pyEIT protocol whose local electrode i is mesh electrode ``electrodes[i]`` (identity if None)."""
        ex_mat = np.asarray(protocol.ex_mat, dtype=np.int64)
        meas_mat = np.asarray(protocol.meas_mat, dtype=np.int64)
        if electrodes is not None:
            lookup = np.asarray(electrodes, dtype=np.int64)
            ex_mat, meas_mat = lookup[ex_mat], lookup[meas_mat]
        if (ex_mat[:, 0] == ex_mat[:, 1]).any():
            raise ValueError("protocol.ex_mat has an excitation with source == sink; every row needs two electrodes")
        n_exc, n_per, _ = meas_mat.shape
        if n_exc * n_per == 0:
            raise ValueError(f"protocol has no measurement rows (ex_mat {ex_mat.shape}, meas_mat {meas_mat.shape})")
        full = np.concatenate([np.repeat(ex_mat, n_per, axis=0), meas_mat.reshape(-1, 2)], axis=1)
        rows = select_rows(full.shape[0], meas_fraction, meas_seed)
        abmn = full[rows]
        return cls(ex_mat=ex_mat, meas_mat=meas_mat, rows=rows, abmn=abmn, active=np.unique(abmn))

    @property
    def n_meas(self) -> int:
        return self.abmn.shape[0]

    def transfer_matrix(self) -> np.ndarray:
        """C (n_meas, n_act * n_act) with V = C vec(R), R[j, l] = potential at active electrode j
        for a unit current into active electrode l (grounded at the reference node):
        V = R[n, a] - R[n, b] - R[m, a] + R[m, b]."""
        n_act = self.active.shape[0]
        local = np.searchsorted(self.active, self.abmn)  # (n_meas, 4) positions in `active`
        a, b, n, m = local.T
        c = np.zeros((self.n_meas, n_act * n_act))
        rows = np.arange(self.n_meas)
        for row_el, col_el, sign in ((n, a, 1.0), (n, b, -1.0), (m, a, -1.0), (m, b, 1.0)):
            np.add.at(c, (rows, row_el * n_act + col_el), sign)
        return c
