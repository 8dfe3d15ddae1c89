"""Checkpoint files: plain data only, loaded with ``torch.load(weights_only=True)``; atomic writes; RNG states.

A checkpoint is a dict of tensors, numbers, strings, None, lists/tuples and dicts (the config as
plain data, ``OmegaConf.to_container``). Nothing in it is a pickled Python object, so loading a
checkpoint someone shares cannot run code: :func:`load` uses ``weights_only=True`` and refuses
anything else with a one-line :class:`CheckpointError` naming the file. Checkpoints written before
this format (NumPy RNG state pickled as an array) are refused too; convert one you trust with

    python -m deepunroll.train.checkpoint --upgrade PATH [PATH ...]

A model to ship (weights and config only) is written by ``--export CHECKPOINT TARGET [--set KEY=VALUE ...]``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

_ABSENT = object()  # export_model: OmegaConf.select's answer for a key the stored config lacks
REQUIRED = ("model", "config")  # what every deepunroll checkpoint holds (load_model reads both)
EXPORT_EXTRAS = ("segmenter",)  # entries an exported model carries over from its source (ktc_segmenter)
PLAIN_SCALARS = (str, int, float, bool, type(None))
PLAIN_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A file is not a deepunroll checkpoint, or it needs unsafe (pickle) loading."""


def check_plain(obj, where: str = "checkpoint") -> None:
    """TypeError naming the entry (e.g. ``checkpoint['history'][0]['lr']``) that torch.load(weights_only=True)
    could not read back: anything but tensors, numbers, strings, None, lists, tuples and dicts."""
    if type(obj) in PLAIN_SCALARS or isinstance(obj, PLAIN_TORCH):  # exact types: np.float64 is a float
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if type(obj) in (dict, OrderedDict):  # state_dicts are OrderedDicts
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                f"checkpoints hold only str/int keys")
            check_plain(value, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only "
                    f"tensors, numbers, strings, lists and dicts (torch.load(weights_only=True))")


def save_atomic(obj: dict, path: Path) -> None:
    """Check that ``obj`` is plain data, torch.save it to a temporary file beside ``path``, rename over ``path``."""
    check_plain(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())  # one line
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``; :class:`CheckpointError` (one line, naming
    the file) for a file that is not a deepunroll checkpoint or that holds a pickled Python object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    device = torch.device(device)  # a bad device fails here, not as "not a checkpoint" below
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"cannot load {path} onto {device}: no CUDA device is available")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found:
            raise CheckpointError(
                f"{path}: refused to load: it holds a pickled Python object ({found.group(1)}), which could run "
                f"code; deepunroll checkpoints hold only tensors and plain data. If it is an older deepunroll "
                f"checkpoint from a source you trust, convert it with "
                f"`python -m deepunroll.train.checkpoint --upgrade {path}`") from None
        raise CheckpointError(f"{path} is not a deepunroll checkpoint (torch.load: {_first_line(error)})") from None
    except Exception as error:  # noqa: BLE001  (text, truncated zip, empty file: torch raises many kinds)
        raise CheckpointError(f"{path} is not a deepunroll checkpoint (torch.load: {_first_line(error)})") from None
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED):
        what = f"a dict with keys {sorted(map(str, state))[:6]}" if isinstance(state, dict) else \
            f"a {type(state).__name__}"
        raise CheckpointError(f"{path} is not a deepunroll checkpoint (it holds {what}, without "
                              f"{' and '.join(repr(k) for k in REQUIRED)})")
    return state


def _plain_numpy_state(state: tuple) -> dict:
    """NumPy's legacy ``get_state()`` tuple as plain data (the keys as an int64 tensor)."""
    name, keys, pos, has_gauss, cached = state
    return {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _plain_python_state(state: tuple) -> dict:
    """Python's ``random.getstate()`` tuple as plain data."""
    version, internal, gauss_next = state
    return {"version": version, "internal": list(internal), "gauss_next": gauss_next}


def rng_states() -> dict:
    """Torch, NumPy, Python (and CUDA) generator states as tensors, numbers and lists."""
    states = {"torch": torch.get_rng_state(), "numpy": _plain_numpy_state(np.random.get_state()),
              "python": _plain_python_state(random.getstate())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    n = states["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def upgrade(path: str | Path) -> bool:
    """Rewrite an older checkpoint (NumPy RNG state as a pickled array) in the plain format, in place.

    Loads with ``weights_only=False``, i.e. runs whatever the file's pickle says: only for files you
    trust. Returns False (file untouched) if it already loads with ``weights_only=True``.
    """
    path = Path(path)
    try:
        load(path)
        return False
    except CheckpointError:
        pass
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not all(k in state for k in REQUIRED):
        raise CheckpointError(f"{path} is not a deepunroll checkpoint (no {' and '.join(map(repr, REQUIRED))})")
    rng = state.get("rng", {})
    if isinstance(rng.get("numpy"), tuple):
        rng["numpy"] = _plain_numpy_state(rng["numpy"])
    if isinstance(rng.get("python"), tuple):
        rng["python"] = _plain_python_state(rng["python"])
    save_atomic(state, path)  # raises TypeError naming any entry that is still not plain data
    return True


def export_model(source: str | Path, target: str | Path, settings: dict | None = None,
                 provenance: dict | None = None, extra: dict | None = None, weights: dict | None = None) -> dict:
    """Write the weights and config of checkpoint ``source`` to ``target`` without the optimiser, scheduler,
    history and RNG states (a model to ship: about a third of a training checkpoint). ``settings``
    {dotted config key: value} replace entries of the stored config (e.g. a machine's absolute data paths);
    ``provenance`` (plain data: the run, its seed, how it was chosen) is stored beside; ``extra`` {name: plain
    data} adds entries (e.g. a trained segmenter), and keeps one that ``source`` holds unless it names it;
    ``weights`` (a state dict) replace the stored ones (a network trained further, e.g. end to end with its
    segmenter). Returns what was written."""
    state = load(source)
    body = OmegaConf.create(state["config"]["config"])
    for key, value in (settings or {}).items():
        if OmegaConf.select(body, key, default=_ABSENT) is _ABSENT:
            raise KeyError(f"{source}: the stored config has no {key}")
        OmegaConf.update(body, key, value)
    config = {**state["config"], "config": OmegaConf.to_container(body, resolve=False)}
    model = {"model": state["model"] if weights is None else weights, "config": config, "provenance": dict(provenance or {}),
             "epoch": state.get("epoch"), "best_val": state.get("best_val")}
    clash = sorted(set(extra or {}) & set(model))
    if clash:
        raise KeyError(f"export_model: extra entries {clash} would replace the model's own")
    kept = {name: state[name] for name in EXPORT_EXTRAS if name in state}
    model.update({**kept, **(extra or {})})
    save_atomic(model, Path(target))
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deepunroll.train.checkpoint", description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--upgrade", nargs="+", metavar="PATH",
                        help="rewrite these trusted older checkpoints in the plain (weights_only) format")
    action.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "TARGET"),
                        help="write CHECKPOINT's weights and config only (no optimiser state) to TARGET")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="--export: replace stored config entries (strings), e.g. operator.data_root=DATA")
    args = parser.parse_args(argv)
    if args.export:
        pairs = [item.split("=", 1) for item in args.set]
        if any(len(pair) != 2 for pair in pairs):
            parser.error(f"--set expects KEY=VALUE, got {args.set}")
        try:
            export_model(*args.export, settings=dict(pairs))
        except (KeyError, FileNotFoundError, CheckpointError) as error:
            parser.exit(1, f"error: {error.args[0]}\n")
        print(f"{args.export[1]}: weights and config of {args.export[0]}")
        return
    for path in args.upgrade:
        print(f"{path}: {'converted' if upgrade(path) else 'already in the plain format'}")


if __name__ == "__main__":
    main()
