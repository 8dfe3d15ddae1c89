"""End-to-end: experiments compose, smoke training lowers the loss, evaluation and loading work."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, compose_config
from deepunroll.evaluation import evaluate_checkpoint
from deepunroll.tables import write_csv
from deepunroll.nets.unrolled import count_parameters
from deepunroll.pipeline import build_problem, load_model, train

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
TOY = [e for e in EXPERIMENTS if e.startswith("toy_")]
ALIASES = {"eit_rma": "eit_lpgd_rma"}  # short names users type
HAS_DEEPINV = importlib.util.find_spec("deepinv") is not None
NEEDS_EXTRA = pytest.mark.skipif(not HAS_DEEPINV, reason="deepinv not installed (pip install -e \".[deepinv]\")")
KTC_ROOT = REPO.parent / "shared" / "data" / "ktc2023"  # ktc_* experiments read the tank's patterns from ref.mat
NEEDS_KTC = pytest.mark.skipif(not (KTC_ROOT / "training" / "ref.mat").is_file(),
                               reason=f"KTC2023 data not found under {KTC_ROOT} (published by the challenge on Zenodo)")


def _marks(experiment: str) -> list:
    return [NEEDS_EXTRA] if experiment.startswith("deepinv_") else [NEEDS_KTC] if experiment.startswith("ktc_") else []


def test_all_six_toy_variants_exist():
    assert {f"toy_{n}{a}" for n in ("lpgd", "lpd") for a in ("", "_ma", "_rma")} <= set(TOY)


@pytest.mark.parametrize("experiment", [pytest.param(e, marks=_marks(e)) for e in EXPERIMENTS])
def test_experiment_composes_and_builds(experiment):
    extra = [f"operator.data_root={KTC_ROOT}"] if experiment.startswith("ktc_") else []
    cfg = compose_config([f"+experiment={experiment}", *extra])
    assert cfg.name == ALIASES.get(experiment, experiment)
    operator, _, model = build_problem(cfg)
    assert count_parameters(model) > 0
    y = torch.zeros(2, *operator.out_shape)
    assert model(y, torch.ones(2, *operator.in_shape)).shape == (2, *operator.in_shape)


def test_train_evaluate_load(tiny_toy, tmp_path):
    cfg = compose_config(["+experiment=toy_lpd_rma"] + tiny_toy)
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir)
    assert len(result["history"]) == 2 and result["best"].exists() and result["last"].exists()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["config"]["net"]["n_iter"] == 3 and torch.__version__.startswith(record["versions"]["torch"])

    rows = evaluate_checkpoint(result["best"])
    assert [r["method"] for r in rows] == ["x0 (zeros)", "toy_lpd_rma"] and rows[0]["n"] == 32
    assert rows[0]["rel_err_mean"] == pytest.approx(1.0)  # x0 = 0
    csv_path = tmp_path / "metrics.csv"
    write_csv(rows, csv_path)
    assert next(csv.DictReader(open(csv_path)))["method"] == "x0 (zeros)"

    model = load_model(result["best"])
    y = torch.randn(3, *model.operator.out_shape, dtype=torch.float64)
    x_hat = model.reconstruct(y)
    assert x_hat.shape == (3, 53) and torch.isfinite(x_hat).all()
    torch.testing.assert_close(x_hat, model(y.float(), torch.zeros(3, 53)))


def test_smoke_profile_lowers_validation_loss(tmp_path):
    """`train=smoke` as a user runs it: validation loss ends >= 30 % below its first-epoch value."""
    cfg = compose_config(["+experiment=toy_lpgd_rma", "train=smoke", "train.device=cpu", f"data.root={tmp_path}"])
    history = train(cfg, tmp_path / "run")["history"]
    assert len(history) == cfg.train.epochs
    assert history[-1]["val_loss"] <= 0.7 * history[0]["val_loss"]


def test_scripts_run_as_documented(tmp_path):
    """make_data, train and evaluate as a user types them (tiny sizes)."""
    data = [f"data.root={tmp_path}/data", "data.splits.train=64", "data.splits.val=16", "data.splits.test=16"]
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    made = run("scripts/make_data.py", "data=toy", "operator.a=1.5", *data)
    assert made.returncode == 0, made.stderr
    assert "dataset ready" in made.stdout
    trained = run("scripts/train.py", "+experiment=toy_lpgd_ma", "operator.a=1.5", "train.epochs=1", "net.n_iter=2",
                  f"hydra.run.dir={tmp_path}/run", *data)
    assert trained.returncode == 0, trained.stderr
    assert "trainable parameters" in trained.stdout and not "generating dataset" in trained.stdout
    evaluated = run("scripts/evaluate.py", f"checkpoint={tmp_path}/run/checkpoints/best.pt")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "toy_lpgd_ma" in evaluated.stdout and Path(f"{tmp_path}/run/checkpoints/best_test_metrics.csv").exists()


def test_amp_autocasts_the_network_but_not_the_physics(tiny_toy, tmp_path):
    from deepunroll.nets.data_term import DataTerm
    from deepunroll.operators.toy import NonlinearConv1d

    op = NonlinearConv1d(a=1.5)
    x, y = torch.randn(4, 53), torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = DataTerm(op, y).misfit_grad(x)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, op.misfit_grad(x, y), rtol=0, atol=0)
    history = train(compose_config(["+experiment=toy_lpgd_rma", "train.amp=true"] + tiny_toy), tmp_path / "run")["history"]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
