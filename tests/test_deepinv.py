"""deepunroll operators as deepinv physics (the optional extra ``[deepinv]``; skipped without it)."""

import pytest
import torch

deepinv = pytest.importorskip("deepinv", reason="deepinv not installed (pip install -e \".[deepinv]\")")

from deepunroll.data.generators import add_relative_noise  # noqa: E402
from deepunroll.data.patches import ImagePatches  # noqa: E402
from deepunroll.data.phantoms import EITPhantoms  # noqa: E402
from deepunroll.initial_guess import ConstantImageInverse  # noqa: E402
from deepunroll.interop.deepinv import OperatorPhysics  # noqa: E402
from deepunroll.operators.blur import VolterraBlur2d  # noqa: E402
from deepunroll.operators.eit import EIT  # noqa: E402
from deepunroll.operators.toy import NonlinearConv1d  # noqa: E402


@pytest.mark.parametrize("make", [lambda: EIT(h0=0.2), lambda: VolterraBlur2d(image_size=12), lambda: NonlinearConv1d()],
                         ids=["eit", "blur2d", "toy"])
def test_wrapper_is_our_operator_and_its_exact_adjoint(make):
    """A and A_vjp are the operator's forward and vjp (shapes with deepinv's channel axis for images), and
    <v, A_vjp(x, v')> matches a central difference of <v, A(x)> along a random direction."""
    op = make()
    physics = OperatorPhysics(op)
    gen = torch.Generator().manual_seed(0)
    x = 0.5 + 0.3 * torch.rand(3, *op.in_shape, generator=gen, dtype=torch.float64)
    v = torch.randn(3, *op.out_shape, generator=gen, dtype=torch.float64)
    channel = (slice(None), None) if len(op.in_shape) == 2 else (slice(None),)
    assert physics.channel_axis == (len(op.in_shape) == 2)
    torch.testing.assert_close(physics.A(x[channel]), op(x)[channel], rtol=0, atol=0)
    vjp = physics.A_vjp(x[channel], v[channel])
    torch.testing.assert_close(vjp, op.vjp(x, v)[channel], rtol=0, atol=0)
    direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    h = 1e-5
    central = ((v * (op(x + h * direction) - op(x - h * direction))).sum() / (2 * h)).item()
    ours = vjp[:, 0] if physics.channel_axis else vjp
    assert (ours * direction).sum().item() == pytest.approx(central, rel=1e-6)


def test_deepinv_gradient_descent_reconstructs_eit():
    """deepinv's PGD (L2 data fidelity, no prior, step 1/||J(1)||^2) on noise-free EIT data of 4 two-inclusion
    phantoms (h0 0.1) from sigma = 1: the mean relative error falls from 0.2538 to 0.2059 in 50 iterations
    and the residual to 0.267 of the start (measured)."""
    op = EIT(h0=0.1)
    physics = OperatorPhysics(op)
    x = EITPhantoms(2).sample(op, 4, torch.Generator().manual_seed(0))
    y = op(x)
    init = physics.reference_point(y)
    lipschitz = float(torch.linalg.matrix_norm(op.jacobian(init[:1])[0], 2)) ** 2
    model = deepinv.optim.PGD(data_fidelity=deepinv.optim.L2(), prior=deepinv.optim.ZeroPrior(), stepsize=1 / lipschitz,
                              lambda_reg=0.0, max_iter=50, early_stop=False)
    with torch.no_grad():
        estimate = model(y, physics, init=init)
    relative = ((estimate - x).norm(dim=1) / x.norm(dim=1)).mean().item()
    assert ((init - x).norm(dim=1) / x.norm(dim=1)).mean().item() == pytest.approx(0.2538, abs=1e-4)
    assert relative == pytest.approx(0.2059, abs=1e-3)
    assert ((op(estimate) - y).norm() / (op(init) - y).norm()).item() == pytest.approx(0.2665, abs=2e-3)


def test_deepinv_tv_proximal_gradient_deblurs_the_volterra_blur():
    """deepinv's PGD with its TV prior (step 0.3, 100 iterations) on 4 test patches of the 2D Volterra blur
    (32 x 32, a = 1, Gaussian width 1.5, 1 % noise) from our constant-inverse x0: PSNR 33.99 -> 36.84 dB at
    lambda 0.01; without the prior (lambda 0) it overfits the noise (33.21 dB) (measured)."""
    op = VolterraBlur2d(image_size=32, a=1.0, kernel_width=1.5)
    gen = torch.Generator().manual_seed(0)
    x = ImagePatches(32).sample(op, 4, gen, split="test")
    y = add_relative_noise(op(x), 0.01, gen)
    physics = OperatorPhysics(op)
    x0 = ConstantImageInverse()(op, y)

    def psnr(image):
        return (10 * torch.log10(1 / (image - x).square().mean(dim=(1, 2)))).mean().item()

    scores = {}
    for lam in (0.0, 0.01):
        model = deepinv.optim.PGD(data_fidelity=deepinv.optim.L2(), prior=deepinv.optim.TVPrior(n_it_max=20),
                                  stepsize=0.3, lambda_reg=lam, max_iter=100, early_stop=False)
        with torch.no_grad():
            scores[lam] = psnr(model(y[:, None], physics, init=x0[:, None])[:, 0])
    assert psnr(x0) == pytest.approx(33.99, abs=0.01)
    assert scores[0.01] == pytest.approx(36.84, abs=0.05)
    assert scores[0.0] == pytest.approx(33.21, abs=0.05)


def test_wrapper_refuses_other_objects():
    with pytest.raises(TypeError, match="needs a deepunroll ForwardOperator"):
        OperatorPhysics(torch.nn.Identity())


def gaussian_blur_operator(sigma=1.5, size=16):
    from deepunroll.interop.deepinv import PhysicsOperator, gaussian_filter

    return PhysicsOperator(deepinv.physics.Blur(filter=gaussian_filter(sigma), padding="reflect"), size, "blur")


def test_deepinv_physics_as_our_operator():
    """deepinv's Blur through PhysicsOperator: forward = A, vjp = A_adjoint (the adjoint identity to 1e-13),
    float64 physics returning the input's dtype, and the filter in the metadata (so the dataset fingerprint
    follows the blur)."""
    op = gaussian_blur_operator()
    assert op.in_shape == (16, 16) and op.out_shape == (16, 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 16, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 16, 16, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op(x), op.physics.A(x[:, None])[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(op.vjp(x, v), op.physics.A_adjoint(v[:, None])[:, 0], rtol=0, atol=0)
    assert (op(x) * v).sum().item() == pytest.approx((x * op.vjp(x, v)).sum().item(), rel=1e-13)
    assert op(x.float()).dtype == torch.float32
    meta, other = op.metadata(), gaussian_blur_operator(sigma=2.0).metadata()
    assert meta["physics"] == "blur" and meta["physics.filter"].shape == (1, 1, 13, 13)
    assert meta["physics.filter"].sum() == pytest.approx(1.0, abs=1e-6) and not (
        other["physics.filter"].shape == meta["physics.filter"].shape
        and (other["physics.filter"] == meta["physics.filter"]).all())
    with pytest.raises(TypeError, match="operator.physics must be a deepinv.physics.Physics"):
        type(op)(torch.nn.Identity(), 16)


def test_unrolled_network_with_a_deepinv_denoiser_block_on_deepinv_physics():
    """+experiment=deepinv_blur_lpgd_rma with net.step.block=dncnn builds (DnCNN blocks, zero head: the untrained
    network returns x0), and 30 Adam steps on 8 patches lower its loss 5-fold; a DnCNN block's output depends on every
    input channel (x and the data-fit direction)."""
    from conftest import compose_config
    from deepunroll.data.patches import ImagePatches
    from deepunroll.nets.blocks import make_block
    from deepunroll.pipeline import build_problem

    cfg = compose_config(["+experiment=deepinv_blur_lpgd_rma", "net.step.block=dncnn", "operator.image_size=16",
                          "net.n_iter=2"])
    operator, _, model = build_problem(cfg)
    x = ImagePatches(16).sample(operator, 8, torch.Generator().manual_seed(0), split="train")
    y = operator(x)
    x0 = operator.dagger(y)
    torch.testing.assert_close(model(y.float(), x0.float()), x0.float(), rtol=0, atol=1e-6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (model(y.float(), x0.float()) - x.float()).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]  # measured 8.0e-3 -> 1.6e-3
    block = make_block("dncnn", 2, 1, hidden=8, n_conv=3, dim=2)
    inputs = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    for channel in (0, 1):
        changed = inputs.clone()
        changed[:, channel] = 0
        assert (block(changed) - block(inputs)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="works on images"):
        make_block("dncnn", 2, 1, dim=1)


def test_side_by_side_study_runs_both_methods_on_the_same_data(tmp_path_factory):
    """profile=tiny: one seed, both methods trained for one epoch on the same 64 patches; the table has x0 and
    both rows, and the deepinv model trains its per-iteration step sizes and CNN blocks."""
    from conftest import run_tiny
    from deepunroll.studies import deepinv_side_by_side as study

    out, rows = run_tiny(tmp_path_factory, study)
    assert [r["method"] for r in rows] == ["ours: LPGD-RMA (ConvLSTM)", "deepinv: unfolded PGD (PnP CNN)"]
    assert all(r["epochs"] == 1 and 10 < r["psnr"] < 40 for r in rows)
    text = (out / "results" / "deepinv_side_by_side_tiny.md").read_text()
    assert "x0 (constant-image inverse)" in text and "Paired PSNR difference" in text
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"net": {"n_iter": 3, "step": {"hidden": 8, "n_conv": 2, "zero_init": True}}})
    model = study.deepinv_unfolded_pgd(cfg, None)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "stepsize" in n} == {f"params_algo.stepsize.{k}" for k in range(3)}
    assert sum(".denoiser.block." in n for n in trainable) == 3 * 5  # per block: 2 convolutions (w, b), 1 PReLU
