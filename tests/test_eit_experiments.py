"""EIT experiments end to end on a tiny mesh: overrides reach their objects, grid domain, training, outputs."""

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from conftest import REPO, compose_config
from deepunroll.evaluation import evaluate_to_files
from deepunroll.nets.domain import GridDomainNet
from deepunroll.operators.eit.grid import GridOperator, MeshGrid
from deepunroll.pipeline import build_problem, train

TINY = ["operator.h0=0.3", "operator.n_electrodes=8", "data.splits.train=24", "data.splits.val=8",
        "data.splits.test=8", "data.n_train=24", "train.device=cpu", "train.batch_size=8"]


@pytest.fixture
def tiny_eit(tmp_path):
    return TINY + [f"data.root={tmp_path / 'data'}"]


def test_eit_rma_is_the_short_name():
    short, full = compose_config(["+experiment=eit_rma"]), compose_config(["+experiment=eit_lpgd_rma"])
    assert short == full and short.accel._target_.endswith("MeshLSTMAccelerator") and short.net.step.block == "mesh"


@pytest.mark.parametrize("override,check", [
    ("data.n_inclusions=4", lambda op, gen, model, cfg: gen.n_inclusions == 4),
    ("data.n_train=50", lambda op, gen, model, cfg: cfg.data.n_train == 50),
    ("data.noise=0.01", lambda op, gen, model, cfg: cfg.data.noise == 0.01),
    ("operator.electrodes=[0,2,4,6]", lambda op, gen, model, cfg: op.electrodes == [0, 2, 4, 6] and op.n_meas == 4 * 1),
    ("operator.meas_fraction=0.5", lambda op, gen, model, cfg: op.n_meas == 20),
    ("operator.h0=0.25", lambda op, gen, model, cfg: op.config["h0"] == 0.25 and op.n_elems != 114),
    ("net.n_iter=3", lambda op, gen, model, cfg: model.n_iter == 3 and len(model.step.blocks) == 3),
])
def test_overrides_reach_their_objects(tiny_eit, override, check):
    cfg = compose_config(["+experiment=eit_rma"] + tiny_eit + [override])
    operator, generator, model = build_problem(cfg)
    assert check(operator, generator, model, cfg)


def test_grid_maps_are_consistent():
    op = instantiate(compose_config(["+experiment=eit_rma"] + TINY).operator)
    grid = MeshGrid(op.centroids, 16)
    torch.testing.assert_close(grid.project.sum(1), torch.ones(op.n_elems, dtype=torch.float64))
    constant = torch.full((2, op.n_elems), 1.5, dtype=torch.float64)
    torch.testing.assert_close(grid.to_mesh(grid.to_grid(constant)), constant)
    grid_op = GridOperator(op, 16)
    z = 1 + 0.1 * torch.rand(2, 16, 16, dtype=torch.float64)
    errors = grid_op.check_vjp(z)
    assert errors["autograd"] < 1e-10 and errors["finite_difference"] < 1e-6
    y = op(grid.to_mesh(z)) * 1.01
    torch.testing.assert_close(grid_op.misfit_grad(z, y), grid_op.vjp(z, grid_op(z) - y))


def test_grid_domain_builds_2d_network(tiny_eit):
    cfg = compose_config(["+experiment=eit_rma", "domain=grid", "domain.size=16", "net=lpgd", "accel=rma", "net.n_iter=2"]
                         + tiny_eit)
    operator, _, model = build_problem(cfg)
    assert isinstance(model, GridDomainNet) and isinstance(model.net.step.blocks[0][0], torch.nn.Conv2d)
    y = operator(torch.ones(3, operator.n_elems, dtype=torch.float64)).float()
    x0 = torch.ones(3, operator.n_elems)
    out = model(y, x0)
    assert out.shape == (3, operator.n_elems)
    torch.testing.assert_close(model(y[:1], x0[:1]), out[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["domain=grid", "domain.size=16", "net=lpgd", "accel=rma"]], ids=["mesh", "grid"])
def test_tiny_training_lowers_loss_and_writes_outputs(tiny_eit, tmp_path, extra):
    cfg = compose_config(["+experiment=eit_lpgd_rma", "net.n_iter=3", "train.epochs=4"] + tiny_eit + extra)
    result = train(cfg, tmp_path / "run")
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    rows, written = evaluate_to_files([result["best"]])
    assert [r["method"] for r in rows] == ["GN", "eit_lpgd_rma"]
    assert {"ssim_mesh_mean", "dr_mean", "psnr_mean", "rel_err_mean"} <= set(rows[0])
    assert all(p.exists() and p.stat().st_size > 0 for p in written)


def test_batch_gradient_through_operator(tiny_eit):
    """net.grad_through_operator=true differentiates through the FEM (second order): its parameter gradient
    matches a central finite difference of the network's output; with false (d_k = J^T(F(x_k) - y) held
    constant) it does not. Untrained blocks end in zero convolutions (net.step.zero_init), which makes
    the two settings agree exactly, so the net starts from random weights here. Measured (float64,
    eps 1e-6): true 3.1e-11 from the finite difference (1.5e-9 on another CPU: a PReLU kink within eps of the
    iterate makes the central difference machine-dependent, so the bound is 1e-7), false 7.6e-5; the gradients
    differ by 5.0e-5."""
    gen = torch.Generator().manual_seed(1)
    results = {}
    for through in (True, False):
        torch.manual_seed(0)  # the same weights in both settings
        cfg = compose_config(["+experiment=eit_lpgd", "net.n_iter=2", "net.step.zero_init=false",
                              f"net.grad_through_operator={str(through).lower()}"] + tiny_eit)
        operator, _, model = build_problem(cfg)
        model.double()
        gen.manual_seed(1)
        x0 = torch.ones(2, operator.n_elems, dtype=torch.float64)
        y = operator(1.2 * x0 + 0.1 * torch.rand(2, operator.n_elems, generator=gen, dtype=torch.float64))
        weights = torch.randn(2, operator.n_elems, generator=gen, dtype=torch.float64)
        params = [p for p in model.parameters() if p.requires_grad]
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        loss = lambda: (model(y, x0) * weights).sum()  # noqa: E731
        grads = torch.autograd.grad(loss(), params)
        assert all(bool(g.abs().sum() > 0) for g in grads)
        eps, values = 1e-6, []
        with torch.no_grad():
            for sign in (1, -1):
                for p, d in zip(params, direction):
                    p.add_(sign * eps * d)
                values.append(float(loss()))
                for p, d in zip(params, direction):
                    p.sub_(sign * eps * d)
        slope = float(sum((g * d).sum() for g, d in zip(grads, direction)))
        results[through] = (grads, abs((values[0] - values[1]) / (2 * eps) - slope) / abs(slope))
    assert results[True][1] < 1e-7
    assert results[False][1] > 1e-5
    true_grads, false_grads = results[True][0], results[False][0]
    gap = sum(float((a - b).pow(2).sum()) for a, b in zip(true_grads, false_grads)) ** 0.5
    assert gap / sum(float(a.pow(2).sum()) for a in true_grads) ** 0.5 > 1e-5


def test_train_script_evaluates_and_compares(tmp_path):
    """`scripts/train.py +experiment=eit_...` then `scripts/evaluate.py` with two checkpoints."""
    common = TINY + [f"data.root={tmp_path}/data", "net.n_iter=2", "train.epochs=1"]
    for name in ("eit_lpgd", "eit_lpgd_rma"):
        done = subprocess.run([sys.executable, "scripts/train.py", f"+experiment={name}", *common,
                               f"hydra.run.dir={tmp_path}/{name}"], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / name / "checkpoints" / "best_test_metrics.csv").exists()
        assert (tmp_path / name / "checkpoints" / "best_test_reconstructions.png").exists()
    both = f"checkpoint=[{tmp_path}/eit_lpgd/checkpoints/best.pt,{tmp_path}/eit_lpgd_rma/checkpoints/best.pt]"
    done = subprocess.run([sys.executable, "scripts/evaluate.py", both, f"out={tmp_path}/cmp"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "cmp" / "comparison_test_metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["GN", "eit_lpgd", "eit_lpgd_rma"]
    assert (tmp_path / "cmp" / "comparison_test_reconstructions.png").exists()


def test_dataset_with_another_mesh_or_protocol_is_refused(tiny_eit):
    import h5py

    from deepunroll.data.h5 import DatasetError
    from deepunroll.data.make import ensure_dataset
    from deepunroll.pipeline import initial_guess

    cfg = compose_config(["data=eit"] + tiny_eit)
    path = ensure_dataset(cfg.data, instantiate(cfg.operator), initial_guess(cfg))
    with h5py.File(path) as f:  # sigma, voltages, GN x0, mesh, protocol and seed are all in the file
        assert f["train/x"].shape[1] == f["operator"].attrs["n_elems"] and f.attrs["seed"] == 0
        assert {"nodes", "elements", "el_pos", "ex_mat", "meas_mat"} <= set(f["operator"])
    finer = compose_config(["data=eit"] + tiny_eit + ["operator.h0=0.25", f"data.path={path}"])
    with pytest.raises(DatasetError, match=r"operator.h0 is 0.3 in the file but 0.25 in the config"):
        ensure_dataset(finer.data, instantiate(finer.operator), initial_guess(finer))
    fewer = compose_config(["data=eit"] + tiny_eit + ["operator.electrodes=[0,2,4,6]", f"data.path={path}"])
    with pytest.raises(DatasetError, match=r"operator.n_meas is 40 in the file but 4 in the config"):
        ensure_dataset(fewer.data, instantiate(fewer.operator), initial_guess(fewer))


def test_hydra_multirun_sweep(tmp_path):
    """`-m` sweeps over the documented overrides run one job each."""
    args = [sys.executable, "scripts/train.py", "-m", "+experiment=eit_rma", *TINY, f"data.root={tmp_path}/data",
            "net.n_iter=1", "train.epochs=1", "evaluate=false", "data.n_train=8,16", "operator.meas_fraction=1.0,0.5",
            f"hydra.sweep.dir={tmp_path}/sweep"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "checkpoints" / "last.pt").exists())
    assert len(runs) == 4, runs


def test_training_step_benchmark_runs(capsys):
    """`scripts/bench.py train_step` compares our data-fit path with pyEIT's per-sample one on one network."""
    from deepunroll.bench.train_step import main

    main(["--h0", "0.3", "--n-iter", "2", "--repeats", "1", "--epoch-samples", "4"])
    out = capsys.readouterr().out
    assert "ours on cpu with net.direction=raw" in out and "ratio (authors' way / ours):" in out
    assert "one epoch, 4 samples" in out
    main(["--h0", "0.3", "--n-iter", "2", "--repeats", "1", "--epoch-samples", "4", "--direction", "gauss_newton"])
    assert "ours on cpu with net.direction=gauss_newton" in capsys.readouterr().out
