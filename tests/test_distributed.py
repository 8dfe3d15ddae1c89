"""torchrun with 2 CPU processes (gloo) gives the single-process result for the same global batch."""

import os
import subprocess
import sys

import torch

from conftest import REPO
from deepunroll.train import checkpoint

ARGS = ["+experiment=toy_lpgd_rma", "net.n_iter=3", "accel.hidden=16", "train.epochs=2", "train.batch_size=16",
        "train.dtype=float64", "train.device=cpu", "evaluate=false", "data.splits.train=64", "data.splits.val=16",
        "data.splits.test=16"]


def run(launcher: list[str], tmp_path, name: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*launcher, "scripts/train.py", *ARGS, f"data.root={tmp_path}/data",
                           f"hydra.run.dir={tmp_path}/{name}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return checkpoint.load(tmp_path / name / "checkpoints" / "last.pt"), done.stdout


def test_two_processes_equal_one(tmp_path):
    single, _ = run([sys.executable], tmp_path, "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double, stdout = run(torchrun, tmp_path, "ddp")
    assert "x 2 process(es)" in stdout and stdout.count("epoch   2/2") == 1  # only rank 0 reports
    for name, tensor in single["model"].items():
        torch.testing.assert_close(double["model"][name], tensor, rtol=1e-9, atol=1e-11, msg=name)
    for a, b in zip(single["history"], double["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-10 * abs(a["train_loss"])
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-10 * abs(a["val_loss"])
