"""ArgminLayer: every backward against closed forms (float64), the shipped energies, the discrete layer."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from deepunroll.nets.argmin import BACKWARDS, ArgminLayer
from deepunroll.optim.descent import ICM, GradientDescent
from deepunroll.nets.energies import HuberTVEnergy, LabelEnergy, greedy_colouring
from deepunroll.operators.base import ForwardOperator
from deepunroll.train.memory import count_saved_bytes

DT = torch.float64
TAUS = [1e-1, 1e-2, 1e-3]


def rel_err(a, b):
    return float((a - b).norm() / b.norm()) if not a.requires_grad else rel_err(a.detach(), b)


def slope(taus, errors):
    return float(np.polyfit(np.log(taus), np.log(errors), 1)[0])


class Tikhonov(nn.Module):
    """E(x; y, w) = 1/2 ||A x - y||^2 + scale/2 sum_i w_i x_i^2; x* = (A^T A + scale diag(w))^-1 A^T y."""

    def __init__(self, matrix, scale=1.0, learn_scale=False):
        super().__init__()
        self.matrix = matrix
        self.scale = nn.Parameter(torch.tensor(scale, dtype=DT), requires_grad=learn_scale)

    def forward(self, x, y, w):
        return 0.5 * (x @ self.matrix.T - y).pow(2).sum(1) + 0.5 * self.scale * (w * x * x).sum(1)

    def init(self, y, w):
        return y.new_zeros(y.shape[0], self.matrix.shape[1])

    def lipschitz(self, y, w):
        return torch.linalg.matrix_norm(self.matrix, 2) ** 2 + self.scale.detach() * w.amax(1)


class LogCosh(nn.Module):
    """Separable, smooth, strongly convex, not quadratic: E(x; z, w) = sum 1/2 (x - z)^2 + w log cosh x."""

    def forward(self, x, z, w):
        return (0.5 * (x - z) ** 2 + w * (x.cosh().log())).sum(1)

    def init(self, z, w):
        return z.clone()

    def lipschitz(self, z, w):
        return 1 + w.amax(1)


def tikhonov_case(seed=0, batch=3, m=10, n=8):
    """Problem, loss weights c (g = c) and the analytic gradients of <c, x*> wrt y and w."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(m, n, generator=gen, dtype=DT) / 3
    y = torch.randn(batch, m, generator=gen, dtype=DT).requires_grad_()
    w = (0.5 + torch.rand(batch, n, generator=gen, dtype=DT)).requires_grad_()
    c = torch.randn(batch, n, generator=gen, dtype=DT)
    hessian = matrix.T @ matrix + torch.diag_embed(w.detach())
    x_star = torch.linalg.solve(hessian, (y.detach() @ matrix)[..., None])[..., 0]
    v = torch.linalg.solve(hessian, c[..., None])[..., 0]
    return matrix, y, w, c, (v @ matrix.T, -x_star * v)


def layer_grads(layer, c, *theta):
    return torch.autograd.grad((c * layer(*theta)).sum(), theta)


# ---------------------------------------------------------------- smooth: exact gradients
@pytest.mark.parametrize("backward", ["implicit", "unroll"])
@pytest.mark.parametrize("accelerated", [True, False])
def test_tikhonov_gradient_matches_closed_form(backward, accelerated):
    matrix, y, w, c, exact = tikhonov_case()
    layer = ArgminLayer(Tikhonov(matrix), GradientDescent(400, accelerated=accelerated), backward=backward)
    for ours, ref in zip(layer_grads(layer, c, y, w), exact):
        assert (ours - ref).abs().max() < 1e-8


@pytest.mark.parametrize("side", ["left", "right"])
def test_lagrangian_one_sided_is_first_order_on_tikhonov(side):
    matrix, y, w, c, exact = tikhonov_case()
    errors = []
    for tau in TAUS:
        layer = ArgminLayer(Tikhonov(matrix), GradientDescent(400), backward="lagrangian", tau=tau, side=side)
        grad_y, grad_w = layer_grads(layer, c, y, w)
        assert rel_err(grad_y, exact[0]) < 1e-10  # grad_y E is linear in x: exact at any tau
        errors.append(rel_err(grad_w, exact[1]))
    assert 0.9 < slope(TAUS, errors) < 1.1
    assert errors[-1] < 1e-2


def test_lagrangian_central_is_exact_on_tikhonov():
    # x_tau is affine in tau and grad_theta E quadratic in x, so the central difference is exact.
    matrix, y, w, c, exact = tikhonov_case()
    for tau in TAUS:
        layer = ArgminLayer(Tikhonov(matrix), GradientDescent(400), backward="lagrangian", tau=tau)
        for ours, ref in zip(layer_grads(layer, c, y, w), exact):
            assert rel_err(ours, ref) < 1e-9


@pytest.mark.parametrize("tol,bound", [(1e-4, 2e-4), (1e-8, 1e-8)])
def test_lagrangian_solver_tolerance_holds_at_any_tau(tol, bound):
    """The perturbed solve's stop rule is relative to its O(tau) move from x*, not to ||x||: the gradient
    error is O(tol) at every tau. Measured (central, max over y and w): tol 1e-4 -> 3e-5 ... 1.0e-4,
    tol 1e-8 -> 3.3e-9 ... 4.5e-9. A rule relative to ||x|| stopped the tau = 1e-4 solve after one step:
    76 % error; it is the same solver and tolerance here."""
    matrix, y, w, c, exact = tikhonov_case()
    for tau in [1e-1, 1e-2, 1e-4, 1e-6]:
        solver = GradientDescent(2000, tol=tol)
        layer = ArgminLayer(Tikhonov(matrix), solver, backward="lagrangian", tau=tau)
        for ours, ref in zip(layer_grads(layer, c, y, w), exact):
            assert rel_err(ours, ref) < bound, tau
        assert solver.n_iter_run > 10  # the last perturbed solve did iterate


def test_one_sided_lagrangian_warns_when_tol_is_not_far_below_tau():
    """One-sided differences divide the forward solve's error by tau: warned, and the warning is real."""
    matrix, y, w, c, exact = tikhonov_case()
    with pytest.warns(UserWarning, match=r"side='right' with solver tol=0.0001 > tau/100 \(tau=0.0001\)"):
        warned = ArgminLayer(Tikhonov(matrix), GradientDescent(2000, tol=1e-4), backward="lagrangian", tau=1e-4,
                             side="right")
    assert rel_err(layer_grads(warned, c, y, w)[1], exact[1]) > 0.3  # measured 0.50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = ArgminLayer(Tikhonov(matrix), GradientDescent(2000, tol=1e-8), backward="lagrangian", tau=1e-4,
                            side="right")
        ArgminLayer(Tikhonov(matrix), GradientDescent(2000, tol=1e-4), backward="lagrangian", tau=1e-4)  # central
    assert rel_err(layer_grads(quiet, c, y, w)[1], exact[1]) < 3e-4  # measured 2.1e-4 (O(tau) = 1.55e-4)


@pytest.mark.parametrize("side, order", [("left", 1), ("right", 1), ("central", 2)])
def test_lagrangian_order_on_smooth_nonquadratic_energy(side, order):
    gen = torch.Generator().manual_seed(1)
    z = (2 * torch.randn(2, 6, generator=gen, dtype=DT)).requires_grad_()
    w = (0.5 + torch.rand(2, 6, generator=gen, dtype=DT)).requires_grad_()
    c = torch.randn(2, 6, generator=gen, dtype=DT)
    solver = GradientDescent(2000, tol=1e-15)
    x_star = ArgminLayer(LogCosh(), solver)(z, w).detach()
    curvature = 1 + w.detach() / x_star.cosh() ** 2  # d^2E/dx^2 (diagonal)
    exact = (c / curvature, -x_star.tanh() * c / curvature)  # (dx*/dz)^T c, (dx*/dw)^T c
    errors = []
    for tau in TAUS:
        layer = ArgminLayer(LogCosh(), solver, backward="lagrangian", tau=tau, side=side)
        grads = layer_grads(layer, c, z, w)
        errors.append(math.hypot(*(float((a - b).norm()) for a, b in zip(grads, exact))))
    assert order - 0.15 < slope(TAUS, errors) < order + 0.15
    assert errors[-1] < 1e-2 if order == 1 else errors[-1] < 1e-5


def test_implicit_and_unroll_reach_energy_parameters():
    matrix, y, w, c, _ = tikhonov_case()
    grads = {}
    for backward in ("implicit", "unroll", "lagrangian"):
        energy = Tikhonov(matrix, scale=0.7, learn_scale=True)
        layer = ArgminLayer(energy, GradientDescent(400), backward=backward, tau=1e-3)
        (grads[backward],) = torch.autograd.grad((c * layer(y, w)).sum(), [energy.scale])
    assert abs(float(grads["implicit"] - grads["unroll"])) < 1e-9 * abs(float(grads["unroll"]))
    assert abs(float(grads["lagrangian"] - grads["unroll"])) < 1e-6 * abs(float(grads["unroll"]))


# ---------------------------------------------------------------- Huber-TV layer
class Matrix(ForwardOperator):
    def __init__(self, matrix):
        super().__init__()
        self.matrix, self.in_shape, self.out_shape = matrix, (matrix.shape[1],), (matrix.shape[0],)

    def _forward(self, x):
        return x @ self.matrix.T


def huber_case(ndim):
    gen = torch.Generator().manual_seed(2)
    if ndim == 1:
        operator = Matrix(torch.randn(24, 16, generator=gen, dtype=DT) / 4)
        x_true = torch.cumsum(torch.randn(2, 16, generator=gen, dtype=DT), 1) / 4
        y = operator(x_true)
    else:
        operator = None
        y = torch.randn(2, 6, 6, generator=gen, dtype=DT)
    w = 0.05 + 0.1 * torch.rand((2, *(y.shape[1:] if ndim == 2 else (16,))), generator=gen, dtype=DT)
    return HuberTVEnergy(operator, ndim=ndim, delta=0.1), y.requires_grad_(), w.requires_grad_(), gen


@pytest.mark.parametrize("ndim", [1, 2])
def test_huber_tv_backwards_agree(ndim):
    energy, y, w, gen = huber_case(ndim)
    c = torch.randn(energy.init(y, w).shape, generator=gen, dtype=DT)
    grads = {}
    for backward, tau in [("implicit", 1.0), ("unroll", 1.0), ("lagrangian", 1e-5)]:
        layer = ArgminLayer(energy, GradientDescent(1500, tol=1e-14), backward=backward, tau=tau)
        x = layer(y, w)
        grads[backward] = torch.cat([g.flatten() for g in layer_grads(layer, c, y, w)])
    x = x.detach().requires_grad_()
    (grad_x,) = torch.autograd.grad(energy(x, y, w).sum(), x)
    assert float(grad_x.abs().max()) < 1e-10  # solved
    assert rel_err(grads["implicit"], grads["unroll"]) < 1e-8
    assert rel_err(grads["lagrangian"], grads["implicit"]) < 1e-4
    assert float(grads["implicit"].abs().max()) > 1e-3


@pytest.mark.parametrize("ndim", [1, 2])
def test_huber_tv_lipschitz_bound_holds(ndim):
    energy, y, w, gen = huber_case(ndim)
    bound = energy.lipschitz(y, w)
    for _ in range(5):
        x1 = torch.randn(energy.init(y, w).shape, generator=gen, dtype=DT).requires_grad_()
        x2 = (x1.detach() + 0.05 * torch.randn(x1.shape, generator=gen, dtype=DT)).requires_grad_()
        g1, g2 = (torch.autograd.grad(energy(x, y, w).sum(), x)[0] for x in (x1, x2))
        ratio = (g1 - g2).flatten(1).norm(dim=1) / (x1 - x2).flatten(1).norm(dim=1)
        assert bool((ratio <= bound).all())


def test_warm_start_from_solution_stops_at_once():
    energy, y, w, _ = huber_case(1)
    solver = GradientDescent(2000, tol=1e-12)
    x_star = solver(energy, (y, w), energy.init(y, w))
    cold = solver.n_iter_run
    layer = ArgminLayer(energy, solver)
    x_again = layer(y, w, x0=x_star)
    assert solver.n_iter_run <= 2 < cold
    assert rel_err(x_again, x_star) < 1e-10


def test_saved_bytes_grow_only_for_unroll():
    matrix, y, w, c, _ = tikhonov_case()
    saved = {}
    for backward in ("unroll", "implicit", "lagrangian"):
        for n_iter in (10, 40):
            layer = ArgminLayer(Tikhonov(matrix), GradientDescent(n_iter), backward=backward)
            _, saved[backward, n_iter] = count_saved_bytes(layer, y, w)
    assert 3.5 < saved["unroll", 40] / saved["unroll", 10] < 4.5
    flat = (y.numel() + 2 * w.numel()) * 8  # x*, y, w
    assert saved["implicit", 10] == saved["implicit", 40] == flat
    assert saved["lagrangian", 10] == saved["lagrangian", 40] == flat


# ---------------------------------------------------------------- discrete labelling layer
LABELS = [0.5, 1.0, 2.0]


def test_labelling_without_smoothness_is_nearest_label():
    z = torch.tensor([[0.1, 0.74, 0.76, 1.4, 1.6, 3.0]], dtype=DT)
    x = ArgminLayer(LabelEnergy(LABELS), ICM())(z)
    assert torch.equal(x, torch.tensor([[0.5, 0.5, 1.0, 1.0, 2.0, 2.0]], dtype=DT))


def test_labelling_true_derivative_is_zero():
    z = torch.tensor([[0.1, 0.74, 0.9, 1.6]], dtype=DT, requires_grad=True)
    layer = ArgminLayer(LabelEnergy(LABELS), ICM(), backward="unroll")
    (grad,) = torch.autograd.grad((layer(z) * torch.arange(1.0, 5.0, dtype=DT)).sum(), z)
    assert torch.equal(grad, torch.zeros_like(z))


def test_labelling_lagrangian_matches_per_element_perturbed_argmin():
    z = torch.tensor([[0.1, 0.74, 0.9, 1.4, 1.6]], dtype=DT, requires_grad=True)
    g = torch.tensor([[1.0, -1.0, 1.0, -2.0, 0.3]], dtype=DT)
    tau, labels = 0.5, torch.tensor(LABELS, dtype=DT)
    layer = ArgminLayer(LabelEnergy(LABELS), ICM(), backward="lagrangian", tau=tau, side="right")
    x = layer(z)
    (grad,) = torch.autograd.grad(x, z, g)
    x_tau = labels[((labels - z.detach()[..., None]) ** 2 + tau * g[..., None] * labels).argmin(-1)]
    assert torch.allclose(grad, -2 * (x_tau - x.detach()) / tau, atol=0, rtol=1e-12)
    assert int((grad != 0).sum()) == 3  # z = 0.74, 0.9 and 1.4 cross a decision boundary


def test_straight_through_passes_gradient_to_first_input():
    z = torch.tensor([[0.1, 1.9]], dtype=DT, requires_grad=True)
    g = torch.tensor([[0.3, -2.0]], dtype=DT)
    (grad,) = torch.autograd.grad(ArgminLayer(LabelEnergy(LABELS), ICM(), backward="straight_through")(z), z, g)
    assert torch.equal(grad, g)


def train_labelling(backward, steps=15):
    torch.manual_seed(0)
    target = torch.tensor([[0.5, 0.5, 2.0, 2.0, 1.0, 1.0, 2.0, 0.5]], dtype=DT)
    z = nn.Parameter(1.0 + 0.1 * torch.randn(1, 8, dtype=DT))
    layer = ArgminLayer(LabelEnergy(LABELS), ICM(), backward=backward, tau=1.0)
    optimiser = torch.optim.SGD([z], lr=0.3)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = (layer(z) - target).pow(2).sum()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return losses


def test_lagrangian_trains_through_labelling_where_autograd_cannot():
    lagrangian, unroll = train_labelling("lagrangian"), train_labelling("unroll")
    assert unroll[-1] == unroll[0] > 1.0  # zero gradients: nothing moves
    assert lagrangian[-1] < 0.2 * lagrangian[0]


def chain_edges(n):
    return torch.stack([torch.arange(n - 1), torch.arange(1, n)], 1)


def grid_edges(h, w):
    index = torch.arange(h * w).reshape(h, w)
    return torch.cat([torch.stack([index[:, :-1].flatten(), index[:, 1:].flatten()], 1),
                      torch.stack([index[:-1].flatten(), index[1:].flatten()], 1)])


def test_colouring_is_proper():
    edges = grid_edges(5, 7)
    colours = greedy_colouring(edges, 35)
    assert bool((colours >= 0).all())
    assert bool((colours[edges[:, 0]] != colours[edges[:, 1]]).all())


@pytest.mark.parametrize("with_linear", [False, True])
def test_icm_reaches_a_single_element_local_minimum(with_linear):
    gen = torch.Generator().manual_seed(4)
    edges = grid_edges(4, 5)
    energy = LabelEnergy(LABELS, mu=0.3, edges=edges)
    z = 0.5 + 1.5 * torch.rand(2, 20, generator=gen, dtype=DT)
    linear = 0.3 * torch.randn(2, 20, generator=gen, dtype=DT) if with_linear else torch.zeros_like(z)
    x = ICM(n_sweeps=20)(energy, (z,), energy.init(z), linear=linear)

    def total(x):
        return energy(x, z) + (linear * x).sum(1)

    assert bool((total(x) <= total(energy.init(z)) + 1e-12).all())
    best = total(x)
    for element in range(20):
        for label in LABELS:
            moved = x.clone()
            moved[:, element] = label
            assert bool((total(moved) >= best - 1e-12).all())


def test_smooth_labelling_lagrangian_gives_nonzero_gradient():
    z = torch.tensor([[0.6, 0.8, 1.1, 1.2, 1.7, 1.9]], dtype=DT, requires_grad=True)
    layer = ArgminLayer(LabelEnergy(LABELS, mu=0.2, edges=chain_edges(6)), ICM(), backward="lagrangian", tau=0.5)
    (grad,) = torch.autograd.grad(layer(z), z, torch.ones_like(z))
    assert float(grad.abs().sum()) > 0


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("kwargs, field", [({"backward": "foo"}, "backward"), ({"side": "up"}, "side"),
                                           ({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau")])
def test_bad_layer_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArgminLayer(LabelEnergy(LABELS), ICM(), **kwargs)


@pytest.mark.parametrize("build, field", [
    (lambda: GradientDescent(n_iter=0), "n_iter"), (lambda: GradientDescent(step=-1.0), "step"),
    (lambda: ICM(n_sweeps=0), "n_sweeps"), (lambda: HuberTVEnergy(ndim=3), "ndim"),
    (lambda: HuberTVEnergy(delta=0.0), "delta"), (lambda: LabelEnergy([]), "labels"),
    (lambda: LabelEnergy(LABELS, mu=1.0), "edges")])
def test_bad_component_options_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_backwards_list_is_documented():
    assert set(BACKWARDS) == {"unroll", "implicit", "lagrangian", "straight_through"}
