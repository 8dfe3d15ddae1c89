"""Unrolled networks: published parameter counts, accelerators, batch independence."""

import pytest
import torch
from omegaconf import OmegaConf

from deepunroll.nets.accel import RMA, Momentum
from deepunroll.nets.build import build_model
from deepunroll.nets.unrolled import count_parameters
from deepunroll.operators.toy import NonlinearConv1d

NET = {
    "lpgd": {"n_iter": 20, "grad_through_operator": False,
             "step": {"_target_": "deepunroll.nets.lpgd.LPGDStep", "hidden": 32, "n_conv": 4, "share_weights": False}},
    "lpd": {"n_iter": 10, "grad_through_operator": False,
            "step": {"_target_": "deepunroll.nets.lpd.LPDStep", "primal_channels": 5, "dual_channels": 5,
                     "hidden": 32, "share_weights": False}},
}
ACCEL = {
    "none": {"_target_": "deepunroll.nets.accel.NoAcceleration"},
    "momentum": {"_target_": "deepunroll.nets.accel.Momentum", "beta": 0.8, "eta": 1e-3},
    "rma": {"_target_": "deepunroll.nets.accel.RMA", "cell": "lstm", "hidden": 16, "layers": 1},
    "rma_gru2": {"_target_": "deepunroll.nets.accel.RMA", "cell": "gru", "hidden": 8, "layers": 2},
}


def build(net, accel, operator, **net_overrides):
    net_cfg = OmegaConf.merge(OmegaConf.create(NET[net]), net_overrides)
    return build_model(net_cfg, OmegaConf.create(ACCEL[accel]), operator)


def test_published_parameter_counts():
    assert count_parameters(build("lpgd", "none", NonlinearConv1d())) == 130_640
    assert count_parameters(build("lpd", "none", NonlinearConv1d())) == 115_990
    assert count_parameters(RMA(x_shape=(686,), cell="lstm", hidden=128, layers=1)) == 506_286


def test_lstm_forget_bias_and_two_layer_readout():
    rma = RMA(x_shape=(10,), hidden=4, layers=2)
    assert torch.equal(rma.rnn.bias_ih_l1[4:8], torch.ones(4)) and torch.equal(rma.rnn.bias_hh_l1[4:8], torch.zeros(4))
    assert rma.readout.in_features == 8


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_step_is_the_lstm_on_a_length_one_sequence(layers):
    """RMA steps the LSTM by its own weights (two products per layer); it must be nn.LSTM's function: float64,
    three carried steps, measured agreement 1e-16."""
    torch.manual_seed(0)
    rma = RMA(x_shape=(12,), hidden=5, layers=layers).double()
    d = torch.randn(3, 4, 12, dtype=torch.float64)
    ours = theirs = rma.init_state(d[0])
    for d_k in d:
        _, ours = rma(d_k, ours)
        _, theirs = rma.rnn(d_k.unsqueeze(1), theirs)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)


def test_momentum_recursion():
    ma = Momentum(beta=0.8, eta=1e-3)
    d1, d2 = torch.ones(2, 3), 2 * torch.ones(2, 3)
    v1, s = ma(d1, ma.init_state(d1))
    v2, _ = ma(d2, s)
    torch.testing.assert_close(v1, 1e-3 * d1)
    torch.testing.assert_close(v2, 0.8 * 1e-3 * d1 + 1e-3 * d2)


@pytest.mark.parametrize("net", ["lpgd", "lpd"])
@pytest.mark.parametrize("accel", ["none", "momentum", "rma", "rma_gru2"])
def test_batch_independence_float64(net, accel):
    torch.manual_seed(0)
    op = NonlinearConv1d(a=1.0)
    model = build(net, accel, op, n_iter=4).double()
    x = torch.randn(5, 53, dtype=torch.float64)
    y, x0 = op(x), torch.zeros(5, 53, dtype=torch.float64)
    batched = model(y, x0)
    singles = torch.cat([model(y[i : i + 1], x0[i : i + 1]) for i in range(5)])
    assert batched.shape == (5, 53)
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-12)


def test_grad_through_operator_changes_gradients_only_when_asked():
    torch.manual_seed(0)
    op = NonlinearConv1d(a=1.0)
    x = torch.randn(2, 53, dtype=torch.float64)
    y, x0 = op(x), torch.zeros(2, 53, dtype=torch.float64)
    grads = {}
    for through in (False, True):
        torch.manual_seed(1)
        model = build("lpgd", "none", op, n_iter=3, grad_through_operator=through).double()
        model(y, x0).square().sum().backward()
        grads[through] = model.step.blocks[0][0].weight.grad.clone()
    assert not torch.allclose(grads[False], grads[True])


def test_shared_weights_and_bad_sizes():
    op = NonlinearConv1d()
    shared = build("lpgd", "none", op, step={"share_weights": True})
    assert len(shared.step.blocks) == 1 and count_parameters(shared) == 130_640 // 20
    with pytest.raises(ValueError, match=r"net.n_iter=0"):
        build("lpgd", "none", op, n_iter=0)
    with pytest.raises(ValueError, match=r"accel.cell='rnn'"):
        RMA(x_shape=(4,), cell="rnn")


def test_lpd_dual_blocks_learn_with_a_detached_operator():
    """J(x)^T h is linear in h: with the physics detached, gradients still reach the dual blocks."""
    torch.manual_seed(0)
    op = NonlinearConv1d(a=1.0)
    model = build("lpd", "none", op, n_iter=2).double()
    x = torch.randn(3, 53, dtype=torch.float64)
    model(op(x), torch.zeros(3, 53, dtype=torch.float64)).square().sum().backward()
    assert model.step.dual_blocks[0][0].weight.grad.abs().sum() > 0


def test_zero_init_returns_the_initial_guess():
    op = NonlinearConv1d(a=1.0)
    for net in ("lpgd", "lpd"):
        model = build(net, "rma", op, n_iter=3, step={"zero_init": True}).double()
        x0 = torch.randn(2, 53, dtype=torch.float64)
        torch.testing.assert_close(model(op(x0 + 1), x0), x0, rtol=0, atol=0)


def test_authors_toy_rma_settings():
    """toy_lpgd_rma_authors: the published code's LSTM (2 layers, 50 units, forget bias 2) and batch 256."""
    from conftest import compose_config
    from deepunroll.pipeline import build_problem

    cfg = compose_config(["+experiment=toy_lpgd_rma_authors"])
    _, _, model = build_problem(cfg)
    rnn = model.accelerator.rnn
    assert (rnn.num_layers, rnn.hidden_size, cfg.train.batch_size, model.data_fit.kind) == (2, 50, 256, "raw")
    for layer in (0, 1):
        forget = slice(50, 100)
        assert torch.all(getattr(rnn, f"bias_ih_l{layer}")[forget] == 2.0)
        assert torch.all(getattr(rnn, f"bias_hh_l{layer}")[forget] == 0.0)
    default = build_problem(compose_config(["+experiment=toy_lpgd_rma"]))[2].accelerator.rnn
    assert torch.all(default.bias_ih_l0[128:256] == 1.0)


def test_checkpoints_naming_the_old_rma_factory_build_the_same_accelerator():
    """Configs written before accel=convlstm existed named deepunroll.nets.accel.recurrent_momentum."""
    from deepunroll.nets.build import LEGACY_RMA, upgrade_accel
    from deepunroll.nets.convlstm import ConvLSTMAccelerator

    lstm = upgrade_accel(OmegaConf.create({"_target_": LEGACY_RMA, "cell": "gru", "hidden": 8, "layers": 2,
                                           "kernel_size": 3, "forget_bias": 1.0}))
    assert OmegaConf.to_container(lstm) == {"_target_": "deepunroll.nets.accel.RMA", "cell": "gru", "hidden": 8,
                                            "layers": 2, "forget_bias": 1.0}
    conv = upgrade_accel(OmegaConf.create({"_target_": LEGACY_RMA, "cell": "convlstm", "hidden": 4, "layers": 1,
                                           "kernel_size": 5}))
    assert OmegaConf.to_container(conv) == {"_target_": "deepunroll.nets.convlstm.ConvLSTMAccelerator",
                                            "channels_hidden": 4, "kernel_size": 5, "layers": 1}
    model = build_model(OmegaConf.create(NET["lpgd"]), conv, _blur_operator())
    assert isinstance(model.accelerator, ConvLSTMAccelerator) and model.accelerator.readout.in_channels == 4
    current = OmegaConf.create({"_target_": "deepunroll.nets.accel.Momentum", "beta": 0.5, "eta": 1.0})
    assert upgrade_accel(current) is current


def _blur_operator():
    from deepunroll.operators.blur import VolterraBlur2d

    return VolterraBlur2d(image_size=8, kernel_size=3)
