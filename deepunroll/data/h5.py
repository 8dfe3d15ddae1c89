"""HDF5 dataset files: layout, writing (atomic) and validated reading.

Layout (format "deepunroll-dataset", version 1)::

    /                 attrs: format, format_version, problem, seed, noise, generator (JSON), deepunroll_version
    /operator         attrs: scalar/list parameters of the forward operator (lists as JSON);
                      datasets: its array parameters (e.g. W1, W2; EIT mesh nodes/elements)
    /{train,val,test} datasets: x  (n, *in_shape)   ground truth
                                y  (n, *out_shape)  measurements (noise included)
                                x0 (n, *in_shape)   initial reconstruction
                      attrs: n
Units are those of the operator (toy: unitless; EIT: conductivity in S/m, voltages in V).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch

import deepunroll

FORMAT, FORMAT_VERSION = "deepunroll-dataset", 1
SPLITS = ("train", "val", "test")
FIELDS = ("x", "y", "x0")


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, malformed, or disagrees with the config."""


def _encode(value):
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_dataset(path: str | Path, splits: dict[str, dict[str, torch.Tensor]], operator_meta: dict, data_meta: dict) -> None:
    """Write ``splits[split][field]`` plus metadata to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, deepunroll_version=deepunroll.__version__)
        f.attrs.update({k: _encode(v) for k, v in data_meta.items()})
        group = f.create_group("operator")
        for key, value in operator_meta.items():
            if isinstance(value, np.ndarray):
                group.create_dataset(key, data=value)
            else:
                group.attrs[key] = _encode(value)
        for split, fields in splits.items():
            g = f.create_group(split)
            for name, tensor in fields.items():
                g.create_dataset(name, data=tensor.detach().cpu().numpy())
            g.attrs["n"] = int(fields["x"].shape[0])
    os.replace(tmp, path)


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist; create it with `python scripts/make_data.py ...`")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"dataset file {path} is unreadable (truncated or corrupt: {err}); delete it and regenerate") from err
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise DatasetError(f"{path} is not a deepunroll dataset (attribute 'format' != {FORMAT!r})")
    return f


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-10, atol=1e-14))
    return bool(np.array_equal(a, b))


def _short(value) -> str:
    arr = np.asarray(value)
    return f"array of shape {arr.shape}" if arr.ndim and arr.size > 8 else repr(_decode(value) if not arr.ndim else arr.tolist())


def check_metadata(path: str | Path, operator_meta: dict, data_meta: dict) -> None:
    """Raise DatasetError naming the first field where the file disagrees with the expected metadata.

    Scalar parameters (a, h0, seed, ...) are compared before lists and arrays, so the message names
    the setting a user changed rather than a shape derived from it.
    """
    path = Path(path)
    order = sorted(operator_meta, key=lambda k: (isinstance(operator_meta[k], (list, tuple, np.ndarray)),))
    with _open(path) as f:
        for key in order:
            expected = operator_meta[key]
            if key in f["operator"]:
                stored = f["operator"][key][()]
            elif key in f["operator"].attrs:
                stored = _decode(f["operator"].attrs[key])
            else:
                raise DatasetError(f"{path}: operator.{key} is missing from the file; regenerate it")
            if not _same(stored, expected):
                raise DatasetError(
                    f"{path}: operator.{key} is {_short(stored)} in the file but {_short(expected)} in the config"
                )
        for key, expected in data_meta.items():
            stored = _decode(f.attrs.get(key))
            if stored != expected and not (np.isscalar(expected) and _same(stored, expected)):
                raise DatasetError(f"{path}: data.{key} is {stored!r} in the file but {expected!r} in the config")


def read_split(path: str | Path, split: str, n: int | None, in_shape, out_shape) -> dict[str, torch.Tensor]:
    """The first ``n`` samples (all when None) of one split as float64 tensors, checked for shape and finiteness."""
    path = Path(path)
    if split not in SPLITS:
        raise DatasetError(f"split {split!r}; expected one of {SPLITS}")
    shapes = {"x": tuple(in_shape), "y": tuple(out_shape), "x0": tuple(in_shape)}
    with _open(path) as f:
        if split not in f:
            raise DatasetError(f"{path} has no split {split!r}")
        group = f[split]
        available = int(group.attrs.get("n", 0))
        if n is not None and n > available:
            raise DatasetError(f"data.n_{split}={n} exceeds the {available} {split} samples in {path}")
        fields = {}
        for name in FIELDS:
            if name not in group:
                raise DatasetError(f"{path}: /{split}/{name} is missing")
            try:
                array = group[name][: (available if n is None else n)]
            except OSError as err:
                raise DatasetError(f"{path}: /{split}/{name} is unreadable (truncated or corrupt: {err})") from err
            if array.shape[1:] != shapes[name] or array.shape[0] != (available if n is None else n):
                raise DatasetError(
                    f"{path}: /{split}/{name} has shape {array.shape}; expected (n, {', '.join(map(str, shapes[name]))})"
                )
            if not np.isfinite(array).all():
                bad = int((~np.isfinite(array)).sum())
                raise DatasetError(f"{path}: /{split}/{name} contains {bad} NaN/Inf values")
            fields[name] = torch.from_numpy(np.asarray(array, dtype=np.float64))
    return fields
