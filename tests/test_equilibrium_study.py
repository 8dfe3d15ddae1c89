"""The equilibrium study (profile=tiny): resumable runs, scores at the trained depth and at the fixed point."""

import csv
import math

import pytest
import torch

from conftest import run_tiny
from deepunroll.pipeline import load_checkpoint_config, load_datasets, load_model
from deepunroll.studies import equilibrium
from deepunroll.studies.common import load_profile


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    return run_tiny(tmp_path_factory, equilibrium)


def test_one_row_per_run_with_depths_and_skipped_steps(tiny_study):
    out, rows = tiny_study
    spec = load_profile("equilibrium", "tiny")
    assert [(r["model"], r["mode"]) for r in rows] == [(m, k) for m in spec["models"] for k in spec["modes"]]
    depth = {(r["model"], r["mode"]): r["trained_depth"] for r in rows}
    assert depth[("pnp", "full_K10")] == 10 and depth[("pnp", "jfb")] == 21 and depth[("pnp", "deq")] == 21
    assert depth[("pnp", "restarted_jfb")] in (21, 42)  # best epoch x (2 restarts x 10 + 1)
    for r in rows:
        assert r["train_steps"] == 2 * 4 and 0 <= r["skipped_steps"] <= r["train_steps"]
        assert 1 <= r["fp_iterations"] <= equilibrium.FP_MAX_ITER
        if r["fp_residual"] <= equilibrium.FP_TOL:  # converged before the cap, to a finite point
            assert r["fp_iterations"] < equilibrium.FP_MAX_ITER and r["mse_fixed_point"] > 0
        else:  # ran to the cap, or diverged (residual not finite)
            assert r["fp_iterations"] == equilibrium.FP_MAX_ITER or not math.isfinite(r["fp_residual"])
    with open(out / "results" / "equilibrium.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (out / "results" / "equilibrium.md").read_text()
    assert "test MSE at trained depth" in md and "| pnp | restarted_jfb |" in md and "/8" in md


def test_iterate_reproduces_the_models_forward_and_reaches_the_fixed_point(tiny_study):
    """For `full` at K=10, ten cold iterations of T are exactly the model's own forward pass; with a
    tolerance, the returned point satisfies it."""
    out, rows = tiny_study
    best = out / "runs" / "reproduce" / "equilibrium_tiny" / "lpgd_tied_full_K10_s0" / "checkpoints" / "best.pt"
    net = load_model(best)
    test = load_datasets(load_checkpoint_config(best), net.operator, splits=("test",))["test"]
    y, x0 = test.y.float(), test.x0.float()
    x10, iterations, _ = equilibrium.iterate(net, y, x0, 10)
    assert iterations == 10
    torch.testing.assert_close(x10, net.reconstruct(y, x0), rtol=0, atol=0)
    row = next(r for r in rows if (r["model"], r["mode"]) == ("lpgd_tied", "full_K10"))
    x_fp, iterations, residual = equilibrium.iterate(net, y, x0, equilibrium.FP_MAX_ITER, equilibrium.FP_TOL)
    assert iterations == row["fp_iterations"]
    if residual <= equilibrium.FP_TOL:  # a fixed point: one more application moves x by at most the tolerance
        x_next, _, _ = equilibrium.iterate(net, y, x0, iterations + 1)
        assert float((x_next - x_fp).norm() / x_fp.norm()) <= 2 * equilibrium.FP_TOL
    else:  # not converged: it ran to the cap, or the iterates diverged
        assert iterations == equilibrium.FP_MAX_ITER or not math.isfinite(residual)


def test_rerun_trains_nothing(tiny_study, capsys):
    out, rows = tiny_study
    again = equilibrium.run("tiny", out)
    assert "trainable parameters" not in capsys.readouterr().out
    assert [r["test_mse"] for r in again] == [r["test_mse"] for r in rows]
