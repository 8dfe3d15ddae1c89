"""Solvers (deepunroll.optim): fixed-point iteration, Anderson acceleration, batched conjugate gradients."""

import math

import pytest
import torch

from deepunroll.optim.fixed_point import FlatState, anderson, fixed_point_iteration, solve_fixed_point
from deepunroll.optim.linear import batched_cg

N = 53
DT = torch.float64


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


def test_anderson_survives_a_degenerate_history():
    """Exactly converged residuals (all zero) made the mixing system singular; float32 as in training."""

    u, _, residual = anderson(lambda u: torch.ones(3), torch.zeros(3), max_iter=10, tol=0.0, memory=2)
    assert torch.equal(u, torch.ones(3)) and residual == 0.0
    u, _, _ = anderson(lambda u: 0.5 * u + 1, torch.zeros(4), max_iter=30, tol=0.0)
    torch.testing.assert_close(u, torch.full((4,), 2.0))


def test_batched_cg_solves_spd_systems():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(4, 7, 7, generator=gen, dtype=DT)
    spd = q @ q.transpose(1, 2) + torch.eye(7, dtype=DT)
    b = torch.randn(4, 7, generator=gen, dtype=DT)
    v = batched_cg(lambda p: (spd @ p[..., None])[..., 0], b, 50, 1e-13)
    exact = torch.linalg.solve(spd, b)
    assert float((v - exact).norm() / exact.norm()) < 1e-10


def test_fixed_point_iteration_stops_when_the_iterates_diverge():
    u, iterations, residual = fixed_point_iteration(lambda u: 10 * u + 1, torch.ones(3), max_iter=1000, tol=1e-8)
    assert iterations < 400 and not math.isfinite(residual)  # float32 overflows to inf after ~38 steps


def test_solve_fixed_point_names_an_unknown_solver():
    with pytest.raises(ValueError, match=r"^solver='broyden': expected one of fixed_point, anderson$"):
        solve_fixed_point(lambda u: u, torch.zeros(2), 5, 1e-6, "broyden")


def test_flat_state_round_trips_nested_states_with_none():
    z = (torch.arange(6.0).view(2, 3), (None, torch.ones(2, 1, 4)))
    flat = FlatState(z)
    u = flat.flatten(z)
    assert u.shape == (14,)
    back = flat.unflatten(u)
    assert torch.equal(back[0], z[0]) and back[1][0] is None and torch.equal(back[1][1], z[1][1])
