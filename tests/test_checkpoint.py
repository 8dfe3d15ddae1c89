"""Checkpoints are data, not code: written as plain data, read with torch.load(weights_only=True), and
anything else (a pickled object, an older-format file, text, a truncated file) refused in one line naming the file."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import deepunroll
from conftest import REPO, compose_config
from deepunroll.pipeline import load_checkpoint_config, load_trained, train
from deepunroll.train import checkpoint
from deepunroll.train.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny toy run: (run folder, its config)."""
    root = tmp_path_factory.mktemp("ckpt")
    overrides = ["+experiment=toy_lpgd_rma", f"data.root={root / 'data'}", "data.splits.train=64",
                 "data.splits.val=16", "data.splits.test=16", "train.epochs=2", "train.batch_size=16",
                 "train.device=cpu", "net.n_iter=2"]
    cfg = compose_config(overrides)
    train(cfg, root / "run")
    return root / "run", overrides


def test_checkpoint_loads_with_weights_only_and_holds_plain_data(trained):
    run_dir, _ = trained
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        checkpoint.check_plain(state)
        assert {"model", "optimizer", "scheduler", "epoch", "history", "rng", "config"} <= set(state)
        assert type(state["config"]["config"]) is dict and state["config"]["config"]["name"] == "toy_lpgd_rma"
        assert state["epoch"] == 2 if name == "last.pt" else state["epoch"] >= 1
    model = deepunroll.load_model(run_dir / "checkpoints" / "best.pt")
    assert not model.training and sum(p.numel() for p in model.parameters()) > 0
    assert load_checkpoint_config(run_dir / "checkpoints" / "best.pt").name == "toy_lpgd_rma"
    cfg, again = load_trained(run_dir / "checkpoints" / "best.pt", overrides={"name": "renamed"})  # read once
    assert cfg.name == "renamed" and cfg.net.n_iter == load_checkpoint_config(run_dir / "checkpoints" / "best.pt").net.n_iter
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match=r"best.pt: trained on operator deepunroll.operators.toy.NonlinearConv1d, "
                                         r"expected deepunroll.realdata.ktc_sim.KTCDifferenceCEM$"):
        load_trained(run_dir / "checkpoints" / "best.pt", operator="deepunroll.realdata.ktc_sim.KTCDifferenceCEM")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    checkpoint.seed_everything(3)
    path = tmp_path / "rng.pt"
    checkpoint.save_atomic({"model": {}, "config": {}, "rng": checkpoint.rng_states()}, path)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(3))
    checkpoint.seed_everything(99)
    checkpoint.restore_rng_states(checkpoint.load(path)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(3))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and np.array_equal(got[3], expected[3])


class Payload:
    """Pickles as a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_a_pickled_object_is_refused_and_nothing_runs(trained, tmp_path):
    run_dir, _ = trained
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    marker = tmp_path / "code_ran"
    state["config"]["payload"] = Payload(marker)
    evil = tmp_path / "shared.pt"
    torch.save(state, evil)
    for load in (checkpoint.load, deepunroll.load_model, load_checkpoint_config):
        with pytest.raises(CheckpointError) as caught:
            load(evil)
        message = str(caught.value)
        assert message.startswith(f"{evil}: refused to load: it holds a pickled Python object (")
        assert "system" in message and "\n" not in message
    assert not marker.exists()
    # the same file loaded the unsafe way does run the payload: the refusal above is what protects
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_older_format_checkpoint_is_refused_then_upgraded_on_request(trained, tmp_path):
    """Before the plain format, the NumPy RNG state was pickled as an array: refused, never loaded unsafely."""
    run_dir, _ = trained
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    state["rng"]["numpy"] = np.random.get_state()
    state["rng"]["python"] = random.getstate()
    old = tmp_path / "old.pt"
    torch.save(state, old)
    with pytest.raises(CheckpointError, match=r"multiarray._reconstruct\).*--upgrade " + str(old).replace(".", r"\.")):
        deepunroll.load_model(old)
    done = subprocess.run([sys.executable, "-m", "deepunroll.train.checkpoint", "--upgrade", str(old)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{old}: converted" in done.stdout
    upgraded = checkpoint.load(old)
    checkpoint.restore_rng_states(upgraded["rng"])
    for name, tensor in state["model"].items():
        assert torch.equal(upgraded["model"][name], tensor), name
    assert deepunroll.load_model(old) is not None
    assert checkpoint.upgrade(old) is False  # already plain: untouched


@pytest.mark.parametrize("content,detail", [
    (b"hello world\n", "torch.load: "),
    (b"", "torch.load: EOFError"),
    (b"12 3\n", "torch.load: "),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content, detail):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a deepunroll checkpoint ({detail}") and "\n" not in message


def test_truncated_tensor_and_foreign_dict_are_named(trained, tmp_path):
    run_dir, _ = trained
    data = (run_dir / "checkpoints" / "best.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"^{cut} is not a deepunroll checkpoint \(torch.load: RuntimeError"):
        checkpoint.load(cut)
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor.pt is not a deepunroll checkpoint \(it holds a Tensor, without "
                                              r"'model' and 'config'\)"):
        checkpoint.load(tmp_path / "tensor.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"it holds a dict with keys \['state_dict'\], without"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing.pt does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_saving_anything_but_plain_data_fails_and_writes_nothing(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"checkpoint\['history'\]\[0\]\['lr'\] is a numpy.float64"):
        checkpoint.save_atomic({"model": {}, "config": {}, "history": [{"lr": np.float64(1e-3)}]}, path)
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['path'\] is a pathlib"):
        checkpoint.save_atomic({"model": {}, "config": {"path": tmp_path}}, path)
    assert not list(tmp_path.iterdir())


def test_evaluate_script_names_a_corrupt_checkpoint_in_one_line(tmp_path):
    path = tmp_path / "best.pt"
    path.write_text("not a checkpoint\n")
    run = lambda **env: subprocess.run([sys.executable, "scripts/evaluate.py", f"checkpoint={path}"], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, timeout=300, env=os.environ | env)
    short = run()
    assert short.returncode == 1
    lines = short.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} is not a deepunroll checkpoint (torch.load: ")
    full = run(HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "CheckpointError" in full.stderr
