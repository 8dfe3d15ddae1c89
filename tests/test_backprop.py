"""Backprop modes: checkpoint == full; on a contractive affine map T(x) = M x + B theta the DEQ gradient is
closed-form, JFB converges to it geometrically in m, restarted JFB to JFB at the fixed point."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_config
from deepunroll.nets.build import build_model
from deepunroll.nets.unrolled import UnrolledNet
from deepunroll.operators.toy import NonlinearConv1d
from deepunroll.pipeline import build_problem, load_model, train
from deepunroll.train.backprop import FixedPointSettings, anderson, fixed_point_iteration, make_backprop

N = P = 53  # b(theta) = B theta with B = I: gradient errors are then exactly q^m * const


class AffineStep(nn.Module):
    """x_{k+1} = M x_k + B theta (weight-tied; ignores the data term)."""

    weight_tied = True

    def __init__(self, M: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("M", M)
        self.register_buffer("B", B)
        self.theta = nn.Parameter(torch.linspace(-1, 1, B.shape[1], dtype=M.dtype))

    def init_state(self, x0, y):
        return x0

    def direction(self, k, x, data):
        return x, torch.zeros_like(x)

    def update(self, k, x, v):
        return x @ self.M.T + self.B @ self.theta

    def output(self, x):
        return x


def affine_problem(q: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))
    M = q * Q  # ||M^j|| = q^j exactly
    B = torch.eye(N, dtype=torch.float64)
    target = torch.randn(2, N, generator=gen, dtype=torch.float64)
    return M, B, target


def affine_grad(q, mode, n_iter=400, x0=None, index=None, net=None, **settings):
    M, B, target = affine_problem(q)
    if net is None:
        net = UnrolledNet(NonlinearConv1d(), AffineStep(M, B), _no_accel(), n_iter,
                          backprop=make_backprop(mode, FixedPointSettings(**settings)))
    op = net.operator
    y = torch.zeros(2, *op.out_shape, dtype=torch.float64)
    x0 = torch.zeros(2, N, dtype=torch.float64) if x0 is None else x0
    net.zero_grad()
    (0.5 * (net(y, x0, index=index) - target).square().sum()).backward()
    return net.step.theta.grad.clone()


def _no_accel():
    from deepunroll.nets.accel import NoAcceleration

    return NoAcceleration()


def deq_closed_form(q):
    """dL/dtheta = B^T (I - M)^-T (x* - target), x* = (I - M)^-1 B theta."""
    M, B, target = affine_problem(q)
    theta = torch.linspace(-1, 1, P, dtype=torch.float64)
    I = torch.eye(N, dtype=torch.float64)
    x_star = torch.linalg.solve(I - M, B @ theta)
    residual = (x_star - target).sum(0)  # both samples share x* (x* does not depend on x0)
    return B.T @ torch.linalg.solve((I - M).T, residual)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_deq_matches_closed_form(solver):
    grad = affine_grad(0.7, "deq", n_iter=500, tol=1e-13, solver=solver, backward_tol=1e-13, backward_max_iter=500)
    exact = deq_closed_form(0.7)
    assert (grad - exact).norm() <= 1e-6 * exact.norm()


def test_jfb_error_shrinks_geometrically_at_rate_q():
    q = 0.6
    exact = deq_closed_form(q)
    errors = [float((affine_grad(q, "jfb", tol=1e-14, m=m) - exact).norm()) for m in range(1, 7)]
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert all(abs(r - q) < 1e-6 for r in ratios), ratios
    # the seed paper's bound: ||g_JFB_m - g_DEQ|| <= q^m / (1 - q) ||B|| ||x* - target||
    M, B, target = affine_problem(q)
    x_star = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - M, B @ torch.linspace(-1, 1, P, dtype=torch.float64))
    scale = torch.linalg.matrix_norm(B, 2) * (x_star - target).sum(0).norm()
    assert all(e <= q**m / (1 - q) * scale + 1e-12 for m, e in zip(range(1, 7), errors))


def test_jfb_error_shrinks_with_q():
    errors = [float((affine_grad(q, "jfb", tol=1e-14, m=2) - deq_closed_form(q)).norm() / deq_closed_form(q).norm())
              for q in (0.8, 0.5, 0.2)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


def test_restarted_jfb_approaches_jfb_at_the_fixed_point():
    q, m = 0.8, 2
    at_fixed_point = affine_grad(q, "jfb", tol=1e-14, m=m)
    errors = [float((affine_grad(q, "restarted_jfb", n_iter=3, restarts=R, m=m) - at_fixed_point).norm())
              for R in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(errors, errors[1:]))
    # the start of the differentiated block is M^(R K) (x0 - x*) away from x*: errors shrink like q^(R K)
    assert 0.3 * q ** 21 < errors[-1] / errors[0] < 3 * q ** 21


def test_restarted_jfb_warm_start_reaches_the_fixed_point_per_sample():
    q = 0.8
    M, B, _ = affine_problem(q)
    settings = FixedPointSettings(restarts=1, m=1, warm_start=True)
    net = UnrolledNet(NonlinearConv1d(), AffineStep(M, B), _no_accel(), 2, backprop=make_backprop("restarted_jfb", settings))
    y = torch.zeros(2, *net.operator.out_shape, dtype=torch.float64)
    x0 = torch.zeros(2, N, dtype=torch.float64)
    x_star = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - M, B @ net.step.theta.detach())
    cold = net(y, x0)  # no index: no warm start
    for _ in range(40):  # 3 iterations per call, each call starting where the last ended
        warm = net(y, x0, index=torch.tensor([7, 3]))
    assert (cold - x_star).norm() > 0.1 and (warm - x_star).norm() < 1e-6 * x_star.norm()
    assert sorted(net.backprop.cache) == [3, 7]
    net.eval()
    assert torch.equal(net(y, x0, index=torch.tensor([7, 3])), cold)  # eval mode never warm-starts


NET = {"n_iter": 4, "grad_through_operator": False, "step": {"_target_": "deepunroll.nets.lpgd.LPGDStep",
                                                             "hidden": 8, "n_conv": 3, "share_weights": False}}
LPD = {"n_iter": 3, "grad_through_operator": True, "step": {"_target_": "deepunroll.nets.lpd.LPDStep",
                                                            "hidden": 8, "share_weights": False}}
RMA = {"_target_": "deepunroll.nets.accel.RMA", "cell": "lstm", "hidden": 8}


@pytest.mark.parametrize("net_cfg,accel", [(NET, {"_target_": "deepunroll.nets.accel.NoAcceleration"}), (NET, RMA),
                                           (LPD, {"_target_": "deepunroll.nets.accel.Momentum"})])
def test_checkpoint_gradients_equal_full(net_cfg, accel):
    op = NonlinearConv1d(a=1.0)
    x = torch.randn(3, N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, x0 = op(x), torch.zeros(3, N, dtype=torch.float64)
    grads = {}
    for mode in ("full", "checkpoint"):
        torch.manual_seed(1)
        model = build_model(OmegaConf.create({**net_cfg, "backprop": mode}), OmegaConf.create(accel), op).double()
        (model(y, x0) - x).square().sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads["full"] - grads["checkpoint"]).abs().max() <= 1e-10 * grads["full"].abs().max()


@pytest.mark.parametrize("mode", ["jfb", "restarted_jfb", "deq"])
def test_fixed_point_modes_need_a_weight_tied_step(mode):
    with pytest.raises(ValueError, match=r"net.step.share_weights=true"):
        build_model(OmegaConf.create({**NET, "backprop": mode}), OmegaConf.create({"_target_": "deepunroll.nets.accel.NoAcceleration"}),
                    NonlinearConv1d())


def test_anderson_solves_a_linear_fixed_point_faster():
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    M = Q @ torch.diag(torch.linspace(-0.95, 0.95, N, dtype=torch.float64)) @ Q.T
    b = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda u: M @ u + b  # noqa: E731
    u, n_anderson, residual = anderson(f, torch.zeros(N, dtype=torch.float64), 300, 1e-10)
    exact = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - M, b)
    assert residual <= 1e-10 and (u - exact).norm() < 1e-8 * exact.norm()
    _, n_plain, _ = fixed_point_iteration(f, torch.zeros(N, dtype=torch.float64), 1000, 1e-10)
    assert n_plain > 350 and n_anderson < 0.5 * n_plain


@pytest.mark.parametrize("mode", ["full", "checkpoint", "jfb", "restarted_jfb", "deq"])
def test_training_loss_drops_under_every_mode(mode):
    """20 Adam steps (clipped at 1) on 64 toy signals (float64), PnP with spectrally normalised denoiser:
    the training loss ends below half its start."""
    torch.manual_seed(0)
    cfg = compose_config(["+experiment=toy_pnp", f"net.backprop={mode}", "net.n_iter=10", "net.spectral_norm=0.5",
                          "net.fixed_point.restarts=2"])  # warm starts: test_trainer_passes_index_and_logs_lipschitz
    operator, generator, model = build_problem(cfg)
    model.double()
    x = generator.sample(operator, 64, torch.Generator().manual_seed(0)).double()
    y, x0, index = model.operator(x), torch.zeros_like(x), torch.arange(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(y, x0, index=index), x)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_trainer_passes_index_and_logs_lipschitz(tiny_toy, tmp_path):
    cfg = compose_config(["+experiment=toy_lpgd_tied"] + tiny_toy + ["net.backprop=restarted_jfb",
                          "net.fixed_point.warm_start=true", "net.step.hidden=8"])
    result = train(cfg, tmp_path / "run")
    assert all(h["lipschitz"] > 0 for h in result["history"])
    model = load_model(result["last"])
    assert model.backprop.mode == "restarted_jfb"


def test_anderson_survives_a_degenerate_history():
    """Exactly converged residuals (all zero) made the mixing system singular; float32 as in training."""
    from deepunroll.train.backprop import anderson

    u, _, residual = anderson(lambda u: torch.ones(3), torch.zeros(3), max_iter=10, tol=0.0, memory=2)
    assert torch.equal(u, torch.ones(3)) and residual == 0.0
    u, _, _ = anderson(lambda u: 0.5 * u + 1, torch.zeros(4), max_iter=30, tol=0.0)
    torch.testing.assert_close(u, torch.full((4,), 2.0))
