"""Backprop modes: checkpoint == full; on a contractive affine map T(x) = M x + B theta the DEQ gradient is
closed-form and JFB converges to it geometrically in m; restarted JFB restarts every training sample from
its previous output (by dataset index), and those warm starts survive a checkpoint and the grid domain."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose_config
from deepunroll.nets.build import build_model
from deepunroll.nets.unrolled import UnrolledNet
from deepunroll.operators.toy import NonlinearConv1d
from deepunroll.pipeline import build_problem, load_datasets, load_model, train
from deepunroll.config_checks import validate
from deepunroll.nets.backprop import BACKPROP, Backprop, make_backprop, upgrade_backprop, warm_starts
from deepunroll.validation import ConfigError
from deepunroll.train.trainer import Trainer, TrainSettings

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
                          backprop=make_backprop(mode, **settings))
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


class RecordingAffineStep(AffineStep):
    """AffineStep that records the state every iteration starts from (``starts``: one (B, N) tensor per iteration)."""

    def __init__(self, M, B):
        super().__init__(M, B)
        self.starts = []

    def direction(self, k, x, data):
        self.starts.append(x.detach().clone())
        return super().direction(k, x, data)


def restarted_net(q=0.8, n_iter=2, restarts=1, m=1):
    M, B, _ = affine_problem(q)
    net = UnrolledNet(NonlinearConv1d(), RecordingAffineStep(M, B), _no_accel(), n_iter,
                      backprop=make_backprop("restarted_jfb", restarts=restarts, m=m))
    x_star = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - M, B @ net.step.theta.detach())
    return net, x_star


def test_restarted_jfb_starts_each_sample_from_its_stored_output():
    net, _ = restarted_net()
    y = torch.zeros(2, *net.operator.out_shape, dtype=torch.float64)
    x0 = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def start_of(index, x0=x0):
        net.step.starts.clear()
        out = net(y, x0, index=None if index is None else torch.tensor(index))
        return net.step.starts[0], out.detach()

    start, first = start_of([7, 3])  # neither sample seen: both start from x0
    assert torch.equal(start, x0)
    start, second = start_of([3, 9])  # 3 starts from its stored output, 9 (new) from x0
    assert torch.equal(start[0], first[1]) and torch.equal(start[1], x0[1])
    assert torch.equal(net.backprop.cache.seen.nonzero().flatten(), torch.tensor([3, 7, 9]))
    start, _ = start_of([9, 7], x0.flip(0))  # rows follow their index, not their position in the batch
    assert torch.equal(start[0], second[1]) and torch.equal(start[1], first[0])
    net.eval()
    start, _ = start_of([7, 3])  # eval mode never warm-starts
    assert torch.equal(start, x0)
    net.train()
    with pytest.raises(ValueError, match=r"restarted_jfb .* needs its dataset index: call net\(y, x0, index=...\)"):
        start_of(None)


def test_restarted_jfb_contracts_across_passes():
    """||M^j v|| = q^j ||v|| exactly: after E passes of R K + m = 3 iterations each a sample is q^(3E) as far
    from x* as x0 was (restarted), while cold passes (eval mode) stay at q^3. Measured: 1e-15 relative."""
    q = 0.8
    net, x_star = restarted_net(q)
    y = torch.zeros(2, *net.operator.out_shape, dtype=torch.float64)
    x0 = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    distance = (x0 - x_star).norm(dim=1)
    for passes in range(1, 6):
        warm = net(y, x0, index=torch.tensor([7, 3])).detach()
        torch.testing.assert_close((warm - x_star).norm(dim=1), q ** (3 * passes) * distance, rtol=1e-12, atol=0)
    net.eval()
    torch.testing.assert_close((net(y, x0) - x_star).norm(dim=1), q ** 3 * distance, rtol=1e-12, atol=0)


def _restarted_toy(tiny_toy, extra=()):
    cfg = compose_config(["+experiment=toy_lpgd_tied"] + tiny_toy + ["backprop=restarted_jfb", "net.step.hidden=8",
                                                                       "backprop.restarts=2", *extra])
    torch.manual_seed(0)
    operator, _, model = build_problem(cfg)
    return model, load_datasets(cfg, operator)


class Interrupted(torch.utils.data.Dataset):
    """A dataset that raises KeyboardInterrupt when asked for more than ``limit`` samples (a killed run)."""

    def __init__(self, base, limit):
        self.base, self.limit, self.served = base, limit, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.served += 1
        if self.served > self.limit:
            raise KeyboardInterrupt
        return self.base[i]


def test_warm_starts_survive_an_interrupted_run(tiny_toy, tmp_path):
    """Killed after epoch 1 of 2, resumed: the warm starts come back from last.pt (plain data, weights_only) and
    epoch 2 retraces the uninterrupted run exactly; without them (an older checkpoint) it starts cold and differs
    (measured epoch-2 training loss: 0.3020 warm, as uninterrupted, against 0.2739 cold)."""
    settings = dict(epochs=2, batch_size=16)
    model, data = _restarted_toy(tiny_toy)
    whole = [h["train_loss"] for h in
             Trainer(model, TrainSettings(**settings), tmp_path / "whole", seed=0).fit(data["train"], data["val"])]

    model, data = _restarted_toy(tiny_toy)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, TrainSettings(**settings), tmp_path / "cut", seed=0).fit(
            Interrupted(data["train"], len(data["train"])), data["val"])
    saved = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)
    assert saved["epoch"] == 1 and "warm_starts" not in torch.load(tmp_path / "cut/checkpoints/best.pt",
                                                                    weights_only=True)
    cache = warm_starts(model).state_dict()
    assert torch.equal(saved["warm_starts"]["index"], torch.arange(len(data["train"])))
    assert torch.equal(cache["index"], saved["warm_starts"]["index"])
    assert all(torch.equal(a, b) for a, b in zip(cache["leaves"], saved["warm_starts"]["leaves"]) if a is not None)

    resumed, data = _restarted_toy(tiny_toy)
    trainer = Trainer(resumed, TrainSettings(**settings, resume=True), tmp_path / "cut", seed=0)
    trainer._restore()
    again = warm_starts(resumed).state_dict()
    assert torch.equal(again["index"], cache["index"])
    assert all(torch.equal(a, b) for a, b in zip(again["leaves"], cache["leaves"]) if a is not None)
    history = [h["train_loss"] for h in trainer.fit(data["train"], data["val"])]
    assert history == whole

    del saved["warm_starts"]  # a checkpoint written before warm starts were saved: loads, resumes cold
    (tmp_path / "old/checkpoints").mkdir(parents=True)
    torch.save(saved, tmp_path / "old/checkpoints/last.pt")
    cold, data = _restarted_toy(tiny_toy)
    history = [h["train_loss"] for h in Trainer(cold, TrainSettings(**settings, resume=True), tmp_path / "old",
                                                seed=0).fit(data["train"], data["val"])]
    assert history[0] == whole[0] and abs(history[1] / whole[1] - 1) > 1e-2


def test_grid_domain_passes_the_index(tmp_path):
    """domain=grid (GridDomainNet) hands the trainer's dataset indices to the grid network: after one
    epoch on a tiny EIT problem every training sample has a warm start, checkpointed in last.pt."""
    cfg = compose_config(["+experiment=eit_lpgd", "net=lpgd_tied", "domain=grid", "domain.size=8",
                          "backprop=restarted_jfb", "net.n_iter=2", "backprop.restarts=1",
                          "net.step.hidden=4", "operator.h0=0.3", "operator.n_electrodes=8", "data.splits.train=16",
                          "data.splits.val=4", "data.splits.test=4", "data.n_train=16", "train.device=cpu",
                          "train.batch_size=8", "train.epochs=1", f"data.root={tmp_path / 'data'}"])
    result = train(cfg, tmp_path / "run")
    saved = torch.load(result["last"], weights_only=True)["warm_starts"]
    assert torch.equal(saved["index"], torch.arange(16)) and saved["leaves"][0].shape == (16, 8, 8)
    assert "lipschitz" in result["history"][0]  # GridDomainNet forwards the diagnostics too


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
        model = build_model(OmegaConf.create(net_cfg), OmegaConf.create(accel), op, backprop=mode).double()
        (model(y, x0) - x).square().sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (grads["full"] - grads["checkpoint"]).abs().max() <= 1e-10 * grads["full"].abs().max()


@pytest.mark.parametrize("mode", ["jfb", "restarted_jfb", "deq"])
def test_fixed_point_modes_need_a_weight_tied_step(mode):
    with pytest.raises(ValueError, match=r"net.step.share_weights=true"):
        build_model(OmegaConf.create(NET), OmegaConf.create({"_target_": "deepunroll.nets.accel.NoAcceleration"}),
                    NonlinearConv1d(), backprop=mode)


@pytest.mark.parametrize("mode", ["full", "checkpoint", "jfb", "restarted_jfb", "deq"])
def test_training_loss_drops_under_every_mode(mode):
    """20 Adam steps (clipped at 1) on 64 toy signals (float64), PnP with spectrally normalised denoiser:
    the training loss ends below half its start. restarted_jfb takes 40: every step continues each sample's
    iteration (21 more per step) on a map that starts non-contractive (Lipschitz about 1 on J's null space), and
    its training loss first rises (measured 0.59 -> 1.89 at step 14) before it falls (0.17 at step 40)."""
    torch.manual_seed(0)
    cfg = compose_config(["+experiment=toy_pnp", f"backprop={mode}", "net.n_iter=10", "net.spectral_norm=0.5",
                          *(["backprop.restarts=2"] if mode == "restarted_jfb" else [])])
    operator, generator, model = build_problem(cfg)
    model.double()
    x = generator.sample(operator, 64, torch.Generator().manual_seed(0)).double()
    y, x0, index = model.operator(x), torch.zeros_like(x), torch.arange(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40 if mode == "restarted_jfb" else 20):
        loss = torch.nn.functional.mse_loss(model(y, x0, index=index), x)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_trainer_passes_index_and_logs_lipschitz(tiny_toy, tmp_path):
    cfg = compose_config(["+experiment=toy_lpgd_tied"] + tiny_toy + ["backprop=restarted_jfb", "net.step.hidden=8"])
    result = train(cfg, tmp_path / "run")
    assert all(h["lipschitz"] > 0 and h["lipschitz_detached"] > 0 for h in result["history"])
    model = load_model(result["last"])
    assert model.backprop.mode == "restarted_jfb"
    state = torch.load(result["last"], weights_only=True)  # as written before the backprop group existed, when
    config = state["config"]["config"]                    # net.fixed_point.warm_start=false was still allowed
    del config["backprop"], config["domain"]
    config["net"] |= {"backprop": "restarted_jfb", "fixed_point": {"tol": 1e-4, "m": 1, "restarts": 3,
                                                                   "warm_start": False, "solver": "anderson"}}
    torch.save(state, tmp_path / "older.pt")
    older = load_model(tmp_path / "older.pt")  # loads for evaluation (cold anyway)
    assert older.backprop.mode == "restarted_jfb" and (older.backprop.restarts, older.backprop.m) == (3, 1)
    torch.testing.assert_close(older.reconstruct(torch.zeros(2, *older.operator.out_shape)),
                               model.reconstruct(torch.zeros(2, *model.operator.out_shape)), rtol=0, atol=0)


def test_configs_written_before_the_groups_existed_build_the_same_objects():
    """net.backprop / net.fixed_point.* and net.domain / net.grid_size become the backprop and domain nodes."""
    from deepunroll.pipeline import upgrade_config

    older = OmegaConf.create({"net": {"n_iter": 3, "backprop": "deq", "domain": "grid", "grid_size": 16,
                                      "fixed_point": {"tol": 1e-5, "m": 2, "restarts": 4, "warm_start": True,
                                                      "backward_max_iter": 7}}})
    cfg = upgrade_config(older)
    assert OmegaConf.to_container(cfg.net) == {"n_iter": 3}
    assert OmegaConf.to_container(cfg.domain) == {"_target_": "deepunroll.nets.domain.GridDomain", "size": 16}
    assert OmegaConf.to_container(cfg.backprop) == {"_target_": "deepunroll.nets.backprop.DEQ", "tol": 1e-5,
                                                    "jacobian": "full", "solver": "anderson", "anderson_memory": 5,
                                                    "backward_tol": 1e-8, "backward_max_iter": 7}
    oldest = upgrade_config(OmegaConf.create({"net": {"n_iter": 3}}))  # before net.backprop existed at all
    assert oldest.backprop._target_.endswith(".Full") and oldest.domain._target_.endswith(".NativeDomain")
    today = compose_config(["+experiment=toy_pnp"])
    assert upgrade_config(today) is today
    assert upgrade_backprop({"backprop": "jfb", "fixed_point": {"m": 3, "solver": "fixed_point"}}) == {
        "_target_": "deepunroll.nets.backprop.JFB", "tol": 1e-4, "m": 3, "jacobian": "full"}


class Doubled(Backprop):
    """A mode added as a user would: the full loop run twice (2K iterations of the weight-tied map)."""

    mode = "doubled"

    def __init__(self) -> None:
        super().__init__()

    def __call__(self, net, z, data, index=None):
        for _ in range(2 * net.n_iter):
            z = net.iteration(0, z, data)
        return z


def test_a_mode_added_to_the_registry_is_known_everywhere(monkeypatch):
    """Adding a backprop mode is one class, one registry entry and one file configs/backprop/<mode>.yaml
    (here the config node such a file would hold): the config checks, build_problem, make_backprop and
    UnrolledNet accept it."""
    with pytest.raises(ConfigError, match=r"^backprop='doubled': expected one of full, checkpoint, jfb, "
                                          r"restarted_jfb, deq$"):
        make_backprop("doubled")
    monkeypatch.setitem(BACKPROP, "doubled", Doubled)
    cfg = compose_config(["+experiment=toy_lpgd_tied", "backprop=full"])
    cfg.backprop = Doubled().config()
    assert cfg.backprop._target_ == "test_backprop.Doubled"
    validate(cfg)
    assert isinstance(build_problem(cfg)[2].backprop, Doubled)
    M, B, _ = affine_problem(0.5)
    x0 = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(2, *NonlinearConv1d().out_shape, dtype=torch.float64)
    doubled = UnrolledNet(NonlinearConv1d(), AffineStep(M, B), _no_accel(), 3, backprop="doubled")
    full = UnrolledNet(NonlinearConv1d(), AffineStep(M, B), _no_accel(), 6, backprop="full")
    assert isinstance(doubled.backprop, Doubled)
    assert torch.equal(doubled(y, x0), full(y, x0))


def test_the_backprop_group_has_one_file_per_registered_mode():
    """configs/backprop/<mode>.yaml builds BACKPROP[mode] with its default settings, and nothing else is there."""
    from hydra.utils import instantiate

    from deepunroll.pipeline import CONFIGS

    files = {p.stem: OmegaConf.load(p) for p in (CONFIGS / "backprop").glob("*.yaml")}
    assert sorted(files) == sorted(BACKPROP)
    for mode, node in files.items():
        built = instantiate(node)
        assert type(built) is BACKPROP[mode] and built.config() == make_backprop(mode).config()


def test_backprop_settings_check_themselves():
    with pytest.raises(ConfigError, match=r"^backprop.anderson_memory=0: expected a positive integer$"):
        make_backprop("deq", anderson_memory=0)
    with pytest.raises(TypeError, match="restart"):
        make_backprop("jfb", restart=2)


def test_trainer_logs_the_fixed_point_solves(tiny_toy, tmp_path):
    """deq's forward and adjoint solver statistics reach TensorBoard (solver/*) once per epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_config(["+experiment=toy_lpgd_tied"] + tiny_toy + ["backprop=deq", "net.step.hidden=8"])
    train(cfg, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"solver/forward_iterations", "solver/forward_residual", "solver/backward_iterations",
            "solver/backward_residual"} <= tags
    iterations = [e.value for e in events.Scalars("solver/forward_iterations")]
    assert len(iterations) == 2 and all(1 <= i <= 3 for i in iterations)  # net.n_iter=3 caps the forward solve
