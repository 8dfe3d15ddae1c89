"""Reliability: config validation, crash-safe resume after SIGKILL, NaN handling, determinism."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, compose_config, tiny_trainer, untimed
from deepunroll.config_checks import ConfigError, validate
from deepunroll.pipeline import train
from deepunroll.train import checkpoint
from deepunroll.train.trainer import ExistingRunError, NonFiniteLossError


@pytest.mark.parametrize(
    "override,message",
    [
        ("net.n_iter=0", r"net.n_iter=0: expected a positive integer"),
        ("train.epochs=abc", r"train.epochs='abc': expected a positive integer"),
        ("data.noise=-0.1", r"data.noise=-0.1: expected a number >= 0"),
        ("data.n_train=20000", r"data.n_train=20000: exceeds the training pool data.splits.train=11000"),
        ("train.device=gpu", r"train.device='gpu': expected one of auto, cpu, cuda"),
        ("+train.epoch=3", r"train.epoch: unknown key"),
        ("train.betas=[0.9,1.5]", r"train.betas=\[0.9, 1.5\]: expected two numbers in \[0, 1\)"),
        ("+operator.h0=0", r"^operator.h0: not an argument of deepunroll.operators.toy.NonlinearConv1d; its arguments "
                           r"are signal_length, window, stride, a, seed, dtype$"),
        ("operator=eit", None),
        ("+experiment=eit_lpgd operator.h0=0", r"^operator.h0=0: expected a number in \(0, 0.5\] \(mesh size in disk "
                                               r"radii\)$"),
        ("+experiment=toy_pnp net.step.reg_level=0", r"^net.step.reg_level=0: expected a number > 0$"),
        ("+domain.size=16", r"^domain.size: not an argument of deepunroll.nets.domain.NativeDomain; it takes no arguments$"),
        ("+experiment=eit_lpgd domain=grid domain.size=0", r"^domain.size=0: expected a positive integer$"),
    ],
)
def test_bad_values_name_the_key(override, message):
    cfg = compose_config(override.split())
    if message is None:  # a good config passes
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_accel_options_are_checked():
    with pytest.raises(ConfigError, match=r"accel.cell='rnn': expected one of lstm, gru \(the convolutional LSTM for "
                                          r"images: accel=convlstm\)"):
        validate(compose_config(["accel=rma", "accel.cell=rnn"]))
    with pytest.raises(ConfigError, match=r"^accel.kernel_size=4: expected an odd positive integer$"):
        validate(compose_config(["accel=convlstm", "accel.kernel_size=4"]))
    with pytest.raises(ConfigError, match=r"^accel.beta=1.0: expected a number in \[0, 1\)$"):
        validate(compose_config(["accel=momentum", "accel.beta=1.0"]))


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_typo_fails_before_any_work(tmp_path):
    """Hydra's struct mode names an unknown key; our checks name a bad value; no data is written."""
    typo = run_script("scripts/train.py", "train.epoch=3", f"data.root={tmp_path}")
    assert typo.returncode != 0 and "train.epoch" in typo.stderr
    bad = run_script("scripts/train.py", "net.n_iter=-2", f"data.root={tmp_path}")
    assert bad.returncode != 0 and "net.n_iter=-2: expected a positive integer" in bad.stderr
    unknown_accel = run_script("scripts/train.py", "accel=foo", f"data.root={tmp_path}")
    assert unknown_accel.returncode != 0 and "foo" in unknown_accel.stderr and "rma" in unknown_accel.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script,args,message", [
    ("scripts/train.py", ["net.n_iter=-2"], "error: net.n_iter=-2: expected a positive integer"),
    ("scripts/train.py", ["+experiment=toy_lpgd", "net.step.block=mesh"],
     "error: net.step.block=mesh needs an operator whose x lives on the elements of a triangle mesh (EIT, CEM); "
     "this operator has none (net.step.block=cnn, or net=lpgd)"),
    ("scripts/make_data.py", ["data.noise=-0.1"], "error: data.noise=-0.1: expected a number >= 0"),
    ("scripts/evaluate.py", ["checkpoint=x.pt", "split=dev"], "error: split='dev': expected one of train, val, test"),
    ("scripts/evaluate.py", [], "error: checkpoint: missing; pass checkpoint=PATH or 'checkpoint=[PATH_A,PATH_B]'"),
    ("scripts/reproduce.py", ["profile=huge"], "error: profile='huge': expected one of converged, mesh, paper, quick, tiny for study=rma"),
    ("scripts/reproduce.py", ["study=rmaa"], "error: study='rmaa': expected one of argmin, argmin_eit, deepinv_side_by_side, direction_alignment, equilibrium, kit4_difference, ktc2023_learned, ktc2023_levels, physics_use, rma"),
])
def test_config_errors_are_one_line_in_every_script(tmp_path, script, args, message):
    """The message alone on stderr, exit status 1, nothing written; the traceback only with HYDRA_FULL_ERROR=1."""
    done = run_script(script, *args, f"data.root={tmp_path}" if "data" in script or "train" in script else
                      f"out_dir={tmp_path}" if "reproduce" in script else f"out={tmp_path}")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [message], done.stderr
    assert not list(tmp_path.iterdir())


def test_full_traceback_with_hydra_full_error(tmp_path):
    env = os.environ | {"HYDRA_FULL_ERROR": "1"}
    done = subprocess.run([sys.executable, "scripts/train.py", "net.n_iter=-2", f"data.root={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "deepunroll.validation.ConfigError: net.n_iter=-2: expected a positive integer" in done.stderr


RESUME = ["+experiment=toy_lpgd_ma", "net.n_iter=4", "train.epochs=5", "train.batch_size=16", "train.device=cpu",
          "data.splits.train=512", "data.splits.val=32", "data.splits.test=32"]


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = f"data.root={tmp_path}/data"
    reference = run_script("scripts/train.py", *RESUME, data, f"hydra.run.dir={tmp_path}/reference")
    assert reference.returncode == 0, reference.stderr

    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "scripts/train.py", *RESUME, data, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load(last)["epoch"]
    assert 1 <= killed_at < 5, "the run must be killed mid-training for this test to mean anything"

    again = run_script("scripts/train.py", *RESUME, data, f"hydra.run.dir={run_dir}")
    assert again.returncode != 0 and "train.resume=true" in again.stderr  # never silently overwritten
    resumed = run_script("scripts/train.py", *RESUME, data, f"hydra.run.dir={run_dir}", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} from its checkpoint after epoch {killed_at}" in resumed.stdout

    ours = checkpoint.load(last)
    ref = checkpoint.load(tmp_path / "reference" / "checkpoints" / "last.pt")
    assert ours["epoch"] == ref["epoch"] == 5
    for name, tensor in ref["model"].items():
        assert torch.equal(ours["model"][name], tensor), name
    assert [h["val_loss"] for h in ours["history"]] == [h["val_loss"] for h in ref["history"]]


def inject_nan(model, at_call):
    """Make the model's output NaN on its at_call-th training call."""
    original, calls = model.forward, {"n": 0}

    def forward(y, x0):
        out = original(y, x0)
        calls["n"] += model.training
        return out * float("nan") if model.training and calls["n"] == at_call else out

    model.forward = forward


def test_nan_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tiny_toy, tmp_path):
    trainer, datasets = tiny_trainer(tiny_toy, tmp_path)
    inject_nan(trainer.model, at_call=6 + 3)  # 6 steps per epoch (96 / 16): epoch 2, step 3
    with pytest.raises(NonFiniteLossError, match=r"at epoch 2, step 3; the last good checkpoint is .*last.pt"):
        trainer.fit(datasets["train"], datasets["val"])
    kept = checkpoint.load(trainer.last_path)
    assert kept["epoch"] == 1 and all(torch.isfinite(t).all() for t in kept["model"].values())


def test_nan_loss_skip_counts_steps(tiny_toy, tmp_path):
    trainer, datasets = tiny_trainer(tiny_toy, tmp_path, on_nonfinite="skip")
    inject_nan(trainer.model, at_call=4)
    history = trainer.fit(datasets["train"], datasets["val"])
    assert trainer.skipped_steps == 1 and len(history) == 3
    assert checkpoint.load(trainer.last_path)["skipped_steps"] == 1


def test_existing_checkpoint_is_not_overwritten(tiny_toy, tmp_path):
    cfg = compose_config(["+experiment=toy_lpgd"] + tiny_toy)
    train(cfg, tmp_path / "run")
    with pytest.raises(ExistingRunError, match="train.resume=true"):
        train(cfg, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="train.resume=true but"):
        train(compose_config(["+experiment=toy_lpgd", "train.resume=true"] + tiny_toy), tmp_path / "other")


def test_same_seed_same_numbers(tiny_toy, tmp_path):
    cfg = compose_config(["+experiment=toy_lpgd_rma"] + tiny_toy)
    first = untimed(train(cfg, tmp_path / "a")["history"])
    assert first == untimed(train(cfg, tmp_path / "b")["history"])
    other_seed = train(compose_config(["+experiment=toy_lpgd_rma", "seed=1"] + tiny_toy), tmp_path / "c")["history"]
    assert untimed(other_seed) != first


def test_git_commit_ignores_rewritten_outputs(tmp_path):
    """Sweeps rewrite results/ and figures/ while running: that must not mark their records dirty."""
    from deepunroll.record import git_commit

    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text("a")
    (tmp_path / "code.py").write_text("a")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "results" / "t.md").write_text("b")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("b")
    assert git_commit(tmp_path) == clean + "-dirty"
