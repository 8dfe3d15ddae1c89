"""EIT networks must use the measurements (issue: physics-visible data-fit signal).

The spread test shows the signal reaching the blocks and the accelerator is of order one where the
published raw gradient is not; the ablation test trains LPGD-RMA briefly and shows that removing the
data term or swapping the measurements hurts the Gauss-Newton-direction network and not the raw one.
"""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from deepunroll.ablation import data_term_removed, physics_ablation
from deepunroll.nets.data_term import DataTerm
from deepunroll.nets.direction import DataFit
from deepunroll.pipeline import build_problem, load_datasets, load_model, train


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt())


@pytest.mark.parametrize("experiment,extra,default,raw_ratio", [
    ("eit_rma", ["operator.h0=0.2"], "gauss_newton", 5.7e-3),
    ("toy_lpgd_rma", [], "gauss_newton", 0.28),
])
def test_data_fit_signal_has_order_one_spread(experiment, extra, default, raw_ratio):
    """rms(d) / rms(x - x_true) at x = x_true + 0.05 noise: the signal the blocks and the LSTM read
    (with no accelerator the blocks read d itself; RMA's LSTM reads d) against the error it should fix."""
    cfg = compose_config([f"+experiment={experiment}"] + extra)
    assert cfg.net.direction == default
    operator, generator, _ = build_problem(cfg)
    g = torch.Generator().manual_seed(0)
    x = generator.sample(operator, 8, g, split="test").double()
    y = operator(x)
    delta = 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    ratios = {}
    for kind in ("raw", default):
        data = DataTerm(operator, y, data_fit=DataFit(operator, kind, cfg.net.direction_damping))
        ratios[kind] = _rms(data.misfit_grad(x + delta)) / _rms(delta)
    assert 0.1 < ratios[default] < 10
    assert ratios["raw"] == pytest.approx(raw_ratio, rel=0.05)  # EIT: 1/175 of order one; the toy's raw is fine


ABLATION = ["+experiment=eit_lpgd_rma", "operator.h0=0.2", "data.splits.train=200", "data.splits.val=50",
            "data.splits.test=100", "data.n_train=200", "net.n_iter=3", "train.epochs=10", "train.batch_size=4",
            "train.lr=3e-3", "train.device=cpu", "evaluate=false"]


def test_gauss_newton_network_needs_the_measurements_and_raw_does_not(tmp_path):
    """LPGD-RMA as the experiment builds it (mesh blocks, RMA on the mesh, Gauss-Newton direction with damping 1e-5) on
    a coarse EIT mesh (172 elements), 20-45 s of training per signal on one core.

    Measured (1 thread, 2026-12-07): gauss_newton test MSE 1.07e-3, 0.088 of the GN x0's; data term removed 3.73x,
    another sample's y 594x. raw (the same network with the published input): 2.13e-3, both ratios 1.000 (a
    post-processing network). With the published 1D CNN blocks and fully connected LSTM the removed-data-term ratio
    was 1.15-1.58, moving with float32 rounding across CPUs; the bounds below leave room for that.
    """
    ratios = {}
    for kind in ("gauss_newton", "raw"):
        cfg = compose_config(ABLATION + [f"net.direction={kind}", f"data.root={tmp_path / 'data'}"])
        model = load_model(train(cfg, tmp_path / kind)["best"])
        test = load_datasets(cfg, model.operator, splits=("test",))["test"]
        ratios[kind] = physics_ablation(model, test)
    gn, raw = ratios["gauss_newton"], ratios["raw"]
    assert gn["no_data_term_ratio"] >= 2.0 and gn["other_y_ratio"] > 50 * gn["no_data_term_ratio"]
    # the published raw input fails the same check: its network does not read the data term at all
    assert raw["no_data_term_ratio"] == pytest.approx(1.0, abs=0.01) and raw["other_y_ratio"] == pytest.approx(1.0, abs=0.01)
    gauss_newton_x0 = float((test.x0.double() - test.x.double()).square().mean())
    assert gn["full"] < 0.15 * gauss_newton_x0 and gn["full"] < 0.7 * raw["full"]  # 0.088 and 0.50 measured


def _perturbed(model):
    """The model with every parameter moved off its (zero) initialisation, so each input reaches the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _without_magnitude(model):
    """Zero the log10 rms(d) channel that ``net.direction_normalize`` adds."""
    original = model.data_fit.misfit_direction

    def direction(op, x64, y64):
        d, aux = original(op, x64, y64)
        return d, torch.zeros_like(aux)

    model.data_fit.misfit_direction = direction


def _without_fed_direction(model):
    """Zero the d_k channel that ``net.step.feed_direction`` adds (v_k, from the same d_k, is kept)."""
    original = model.step.direction

    def direction(k, x, data):
        (x, aux, d), d_k = original(k, x, data)
        return (x, aux, torch.zeros_like(d)), d_k

    model.step.direction = direction


@pytest.mark.parametrize("option,remove", [
    ("net.direction_normalize=true", _without_magnitude),   # x, v and log10 rms(d)
    ("net.step.feed_direction=true", _without_fed_direction),  # x, v and d
])
def test_lpgd_blocks_read_the_extra_channel(option, remove):
    cfg = compose_config(["+experiment=eit_lpgd_rma", "net=lpgd", "operator.h0=0.3", "operator.n_electrodes=8",
                          "net.n_iter=2", option])
    operator, _, model = build_problem(cfg)
    assert model.step.blocks[0][0].in_channels == 3
    model = _perturbed(model).eval()
    x = 1 + 0.2 * torch.rand(2, operator.n_elems, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, x0 = operator(x).float(), torch.ones(2, operator.n_elems)
    out = model(y, x0)
    remove(model)
    assert (model(y, x0) - out).abs().max() > 1e-3


def test_learned_data_step_moves_along_the_direction():
    cfg = compose_config(["+experiment=toy_lpgd", "net.n_iter=2", "+net.step.step_size=0.5"])
    operator, _, model = build_problem(cfg)
    x = torch.rand(2, *operator.in_shape, dtype=torch.float64)
    y, x0 = operator(x).float(), torch.zeros(2, *operator.in_shape)
    with_step = model(y, x0)
    assert with_step.abs().max() > 1e-3  # zero-initialised blocks: only the data step moves x
    with torch.no_grad():
        model.step.step_sizes.zero_()
    torch.testing.assert_close(model(y, x0), x0)


def test_checkpoint_carries_the_scale_and_old_configs_build_raw(tmp_path):
    cfg = compose_config(["+experiment=eit_rma", "operator.h0=0.3", "operator.n_electrodes=8", "net.n_iter=2",
                          "net.direction=scaled"])
    _, _, model = build_problem(cfg)
    state = model.state_dict()
    assert {"data_fit.scale", "data_fit.y_ref"} <= set(state)
    state["data_fit.scale"] = state["data_fit.scale"] * 3  # a checkpoint's value wins over the recomputed one
    _, _, again = build_problem(cfg)
    again.load_state_dict(state)
    assert float(again.data_fit.scale) == pytest.approx(3 * float(model.data_fit.scale), rel=1e-15)
    # configs written before net.direction existed (every checkpoint until now) build the published raw input
    old = OmegaConf.to_container(cfg)
    for key in ("direction", "direction_damping", "direction_normalize"):
        old["net"].pop(key)
    _, _, legacy = build_problem(OmegaConf.create(old))
    assert legacy.data_fit.kind == "raw" and not any(k.startswith("data_fit") for k in legacy.state_dict())


def test_removing_the_data_term_zeroes_every_direction():
    cfg = compose_config(["+experiment=eit_lpd_rma", "operator.h0=0.3", "operator.n_electrodes=8", "net.n_iter=2"])
    operator, _, model = build_problem(cfg)
    model = _perturbed(model)  # zero-initialised dual blocks would leave h, hence J^T h, at zero
    x = 1 + 0.2 * torch.rand(2, operator.n_elems, dtype=torch.float64)
    y = operator(x).float()
    seen = []
    model.accelerator.register_forward_hook(lambda module, args, out: seen.append(args[0].abs().max().item()))
    model(y, torch.ones(2, operator.n_elems))
    with data_term_removed(model):
        model(y, torch.ones(2, operator.n_elems))
    assert min(seen[:2]) > 0 and seen[2:] == [0.0, 0.0] and not model.data_fit.disabled


def test_physics_use_study_tabulates_runs_and_resumes(tmp_path):
    from deepunroll.studies import physics_use

    rows = physics_use.run("tiny", tmp_path)
    assert [r["variant"] for r in rows] == ["raw (published)", "gauss_newton 0.001"]
    assert all(r["no_data_term_ratio"] > 0 and r["other_y_ratio"] > 0 for r in rows)
    table = (tmp_path / "results" / "physics_use_tiny.md").read_text()
    assert "gauss_newton 0.001 vs raw" in table and (tmp_path / "figures" / "physics_use_tiny.png").stat().st_size > 0
    again = physics_use.run("tiny", tmp_path, report_only=True)  # finished runs are read back, nothing retrained
    assert again == rows
