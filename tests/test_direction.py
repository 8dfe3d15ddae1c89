"""net.direction: the data-fit signal the learned blocks see (deepunroll.nets.direction)."""

import math

import pytest
import torch

from conftest import compose_config
from deepunroll.nets.data_term import DataTerm
from deepunroll.nets.direction import KINDS, DataFit, operator_norm, power_norm
from deepunroll.operators.eit import EIT
from deepunroll.operators.toy import NonlinearConv1d
from deepunroll.pipeline import build_problem


@pytest.fixture(scope="module")
def toy():
    op = NonlinearConv1d()
    x = torch.randn(4, *op.in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).cumsum(1) / 5
    y = op(torch.randn_like(x) * 0.3 + x)
    return op, x, y


@pytest.fixture(scope="module")
def coarse_eit():
    return EIT(h0=0.2)


def test_operator_norm_is_the_largest_singular_value(toy, coarse_eit):
    for op in (toy[0], coarse_eit):
        x = op.reference_point()
        exact = torch.linalg.svdvals(op.jacobian(x)[0]).max().item()
        assert operator_norm(op, x) == pytest.approx(exact, rel=1e-12)
        # power iteration (for Jacobians too large to form) converges from below
        approx = power_norm(op, x, n_iter=300)
        assert approx <= exact * (1 + 1e-12) and approx == pytest.approx(exact, rel=2e-3)


def test_scaled_and_normalised_are_the_raw_gradient_rescaled(toy):
    op, x, y = toy
    raw = op.misfit_grad(x, y)
    scaled = DataFit(op, "scaled")
    c = float(scaled.scale)
    assert c == pytest.approx(torch.linalg.svdvals(op.jacobian(op.reference_point())[0]).max().item(), rel=1e-12)
    d, aux = scaled.misfit_direction(op, x, y)
    torch.testing.assert_close(d, raw / c**2, rtol=1e-13, atol=0)
    assert aux is None
    d, aux = DataFit(op, "scaled", normalize=True).misfit_direction(op, x, y)
    rms = (raw / c**2).square().mean(1).sqrt()
    torch.testing.assert_close(d, raw / (raw.square().mean(1, keepdim=True).sqrt()), rtol=1e-13, atol=0)
    torch.testing.assert_close(aux, rms.log10(), rtol=1e-13, atol=0)
    torch.testing.assert_close(d.square().mean(1), torch.ones(4, dtype=torch.float64), rtol=1e-13, atol=0)


def test_gauss_newton_direction_solves_the_damped_system(toy):
    op, x, y = toy
    fit = DataFit(op, "gauss_newton", damping=0.05)
    d, _ = fit.misfit_direction(op, x, y)
    for b in range(x.shape[0]):
        jac = op.jacobian(x[b : b + 1])[0]
        gram = jac @ jac.T
        lam = 0.05 * gram.diagonal().mean()
        # the same vector from the n x n form: (J^T J + lam I)^{-1} J^T r
        expected = torch.linalg.solve(jac.T @ jac + lam * torch.eye(jac.shape[1], dtype=jac.dtype), jac.T @ (op(x[b : b + 1])[0] - y[b]))
        torch.testing.assert_close(d[b], expected, rtol=1e-9, atol=1e-12)
    # LPD's primal input from h: c J^T (J J^T + lam I)^{-1} h, linear in h and differentiable in it
    h = torch.randn_like(y).requires_grad_()
    out = fit.adjoint_direction(op, x, h)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(fit.adjoint_direction(op, x, 2 * h.detach()), 2 * out.detach(), rtol=1e-12, atol=0)


def test_gauss_newton_direction_does_not_depend_on_the_measurement_scale(toy):
    """Scale-free: multiplying F and y by 1000 leaves the direction unchanged (lambda is relative)."""
    op, x, y = toy

    class Scaled(NonlinearConv1d):  # every path of the operator multiplied by 1000
        def _forward(self, x):
            return 1000 * super()._forward(x)

        def _vjp(self, x, v):
            return super()._vjp(x, 1000 * v)

        def _jacobian(self, x):
            return 1000 * super()._jacobian(x)

        def misfit_grad(self, x, y):
            return self.vjp(x, self(x) - y)

    big = Scaled()
    d_small, _ = DataFit(op, "gauss_newton").misfit_direction(op, x, y)
    d_big, _ = DataFit(big, "gauss_newton").misfit_direction(big, x, 1000 * y)
    torch.testing.assert_close(d_big, d_small, rtol=1e-9, atol=1e-13)
    assert float(DataFit(big, "scaled").scale) == pytest.approx(1000 * float(DataFit(op, "scaled").scale), rel=1e-12)


def test_frozen_gauss_newton_is_gauss_newton_with_the_reference_jacobian(toy):
    """At x_ref frozen_gn equals gauss_newton (measured 1e-15); elsewhere it is G (F(x) - y) with G from J(x_ref),
    so it differs from gauss_newton at x (the Jacobian moved); LPD's input is c G h. Relinearising after the
    operator changed rebuilds G."""
    op, x, y = toy
    frozen, full = DataFit(op, "frozen_gn", damping=0.05), DataFit(op, "gauss_newton", damping=0.05)
    x_ref = op.reference_point().expand_as(x).contiguous()
    torch.testing.assert_close(frozen.misfit_direction(op, x_ref, y)[0], full.misfit_direction(op, x_ref, y)[0],
                               rtol=1e-10, atol=1e-14)
    jac = op.jacobian(op.reference_point())[0]
    gram = jac @ jac.T
    gain = jac.T @ torch.linalg.inv(gram + 0.05 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype))
    d, aux = frozen.misfit_direction(op, x, y)
    torch.testing.assert_close(d, (op(x) - y) @ gain.T, rtol=1e-9, atol=1e-13)
    assert aux is None and float((d - full.misfit_direction(op, x, y)[0]).norm() / d.norm()) > 1e-3
    h = torch.randn_like(y)
    torch.testing.assert_close(frozen.adjoint_direction(op, x, h), frozen.scale * h @ gain.T, rtol=1e-9, atol=1e-13)

    class Doubled(NonlinearConv1d):
        def _jacobian(self, x):
            return 2 * super()._jacobian(x)

    frozen.linearise_at_reference(Doubled())
    torch.testing.assert_close(frozen.gain, (2 * jac).T @ torch.linalg.inv(
        4 * gram + 0.05 * 4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)), rtol=1e-9, atol=1e-13)


def test_direction_none_is_a_post_processing_network_of_the_same_size():
    """net.direction=none: the trained blocks never see the data term, so swapping every y leaves the output
    unchanged; the parameter count equals the unrolled network's; the ablation context leaves it disabled."""
    from deepunroll.ablation import data_term_removed

    outputs, sizes = {}, {}
    for kind in ("scaled", "none"):
        cfg = compose_config(["+experiment=toy_lpgd_rma", f"net.direction={kind}", "net.n_iter=2", "seed=0"])
        op, _, model = build_problem(cfg)
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))  # zero-init blocks would hide any input
        x = torch.rand(3, *op.in_shape, dtype=torch.float64)
        y = op(x).float()
        x0 = (x + 0.1).float()
        with torch.no_grad():
            outputs[kind] = (model(y, x0), model(y.roll(1, 0), x0))
        sizes[kind] = sum(p.numel() for p in model.parameters())
        if kind == "none":
            with data_term_removed(model):
                pass
            assert model.data_fit.disabled
    assert sizes["scaled"] == sizes["none"]
    assert torch.equal(*outputs["none"])
    assert float((outputs["scaled"][0] - outputs["scaled"][1]).abs().max()) > 1e-4


def test_measurements_are_centred_and_scaled(toy):
    op, x, y = toy
    fit = DataFit(op, "scaled")
    torch.testing.assert_close(fit.measurements(op(op.reference_point())), torch.zeros(1, *op.out_shape, dtype=torch.float64))
    data = DataTerm(op, y.float(), data_fit=fit)
    torch.testing.assert_close(data.target, ((y - fit.y_ref) / fit.scale).float())
    torch.testing.assert_close(data.forward(x.float()), ((op(x) - fit.y_ref) / fit.scale).float())
    h = torch.randn_like(y)
    torch.testing.assert_close(data.vjp(x.float(), h.float()), (op.vjp(x, h) / fit.scale).float(), rtol=1e-5, atol=1e-6)


def test_raw_data_term_is_the_operator_itself(toy):
    op, x, y = toy
    data = DataTerm(op, y, data_fit=DataFit(op, "raw"))
    assert data.target is y
    torch.testing.assert_close(data.misfit_grad(x), op.misfit_grad(x, y), rtol=0, atol=0)
    torch.testing.assert_close(data.vjp(x, y), op.vjp(x, y), rtol=0, atol=0)


def test_bad_direction_settings_name_the_key(toy):
    with pytest.raises(ValueError, match=r"net.direction='newton'; expected one of"):
        DataFit(toy[0], "newton")
    with pytest.raises(ValueError, match=r"net.direction_damping=0"):
        DataFit(toy[0], "gauss_newton", damping=0)
    with pytest.raises(ValueError, match=r"net.direction_normalize=true needs net.direction=scaled or gauss_newton"):
        DataFit(toy[0], "raw", normalize=True)
    with pytest.raises(ValueError, match=r"net.direction='gn'; expected one of"):
        build_problem(compose_config(["+experiment=toy_lpgd", "net.direction=gn"]))


@pytest.mark.parametrize("kind,normalize", [(k, False) for k in KINDS] + [("scaled", True), ("gauss_newton", True)])
def test_every_kind_builds_and_runs_lpgd_and_lpd(kind, normalize):
    for experiment in ("toy_lpgd_rma", "toy_lpd_rma", "toy_pnp"):
        cfg = compose_config([f"+experiment={experiment}", f"net.direction={kind}", f"net.direction_normalize={normalize}",
                              "net.n_iter=2"])
        op, _, model = build_problem(cfg)
        y = op(torch.rand(3, *op.in_shape, dtype=torch.float64)).float()
        out = model(y, torch.zeros(3, *op.in_shape))
        loss = out.square().sum() + sum(p.square().sum() for p in model.parameters())  # zero-init nets need a push
        loss.backward()
        assert out.shape == (3, *op.in_shape) and math.isfinite(loss.item())
        assert model.data_fit.kind == kind and ("scale" in model.state_dict() or "data_fit.scale" in model.state_dict()) == (kind not in ("raw", "none"))
        assert not any(key.endswith("gain") for key in model.state_dict())  # frozen_gn rebuilds G, never saves it


@pytest.mark.parametrize("kind", ["scaled", "gauss_newton"])
def test_directions_are_differentiated_through_the_operator(toy, kind):
    """net.grad_through_operator=true: d/dx of ||d(x)||^2 matches central differences (measured 6e-10 relative
    on the toy, 7e-9 on a coarse EIT mesh)."""
    for op, x, y in (toy, _coarse_eit_problem()):
        data = DataTerm(op, y, through_operator=True, data_fit=DataFit(op, kind, 0.01))

        def energy(z):
            return data.misfit_direction(z)[0].square().sum()

        z = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(energy(z), z)
        u = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        fd = (energy(x + 1e-6 * u) - energy(x - 1e-6 * u)) / 2e-6
        assert float((grad * u).sum()) == pytest.approx(float(fd), rel=1e-6)


def _coarse_eit_problem():
    op = EIT(h0=0.3, n_electrodes=8)
    x = 1 + 0.2 * torch.rand(2, op.n_elems, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return op, x, op(1.1 * x)
