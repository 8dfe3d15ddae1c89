"""EIT's two solve paths (operator.solver=dense|sparse|auto): the same model to rounding, pyEIT agreement, gradients."""

import numpy as np
import pytest
import pyeit.eit.protocol
import pyeit.mesh
import torch
from pyeit.eit.fem import EITForward
from pyeit.mesh import PyEITMesh

from conftest import rel
from deepunroll.operators.eit import EIT, GaussNewton
from deepunroll.operators.eit import solver as fem_solver
from deepunroll.validation import ConfigError

SOLVERS = ["dense", "sparse"]


def random_sigma(n_elems, batch=3, seed=0, low=0.2, high=3.0):
    return torch.tensor(np.random.default_rng(seed).uniform(low, high, (batch, n_elems)))


def pyeit_voltages(mesh, protocol, sigma):
    fwd = EITForward(mesh, protocol)
    return np.stack([fwd.solve_eit(s) for s in sigma.numpy()])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("h0", [0.1, 0.2])
def test_forward_and_jacobian_match_pyeit(solver, h0):
    mesh, prot = pyeit.mesh.create(16, h0=h0), pyeit.eit.protocol.create(16, 1, 1, "std")
    op = EIT.from_pyeit(mesh, prot, solver=solver)
    sigma = random_sigma(mesh.n_elems, batch=2, seed=1)
    assert rel(op(sigma).numpy(), pyeit_voltages(mesh, prot, sigma)) < 1e-12  # measured 7.2e-15 .. 2.0e-14 (both paths, both meshes)
    jac, _ = EITForward(mesh, prot).compute_jac(sigma[0].numpy())
    assert rel(op.jacobian(sigma[:1])[0].numpy(), -jac) < 1e-12  # measured 1.8e-14 .. 3.0e-14


@pytest.mark.parametrize("solver", SOLVERS)
def test_other_reference_node_and_protocol(solver):
    mesh = pyeit.mesh.create(16, h0=0.12)
    mesh = PyEITMesh(node=mesh.node, element=mesh.element, el_pos=mesh.el_pos, ref_node=40)
    prot = pyeit.eit.protocol.create(16, 3, 2, "std")
    op = EIT.from_pyeit(mesh, prot, solver=solver)
    sigma = random_sigma(mesh.n_elems, seed=2)
    assert rel(op(sigma).numpy(), pyeit_voltages(mesh, prot, sigma)) < 1e-12  # measured 6.1e-15 (dense), 9.5e-15 (sparse)


def test_sparse_equals_dense_everywhere():
    dense, sparse = EIT(h0=0.1, solver="dense"), EIT(h0=0.1, solver="sparse")
    sigma = random_sigma(dense.n_elems, batch=5, seed=3)
    y = dense(random_sigma(dense.n_elems, batch=5, seed=4))
    v = torch.randn(5, dense.n_meas, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for name, fn in {"forward": lambda op: op(sigma), "jacobian": lambda op: op.jacobian(sigma),
                     "vjp": lambda op: op.vjp(sigma, v), "misfit_grad": lambda op: op.misfit_grad(sigma, y),
                     "fields": lambda op: op.fields(sigma)}.items():
        assert rel(fn(sparse), fn(dense)) < 1e-12, name  # measured 1.4e-14 .. 3.3e-14
    assert sparse.metadata().keys() == dense.metadata().keys()  # the solver is not part of the model
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(sparse.metadata().values(), dense.metadata().values()))


def test_sparse_vjp_against_autograd_through_the_solve():
    op = EIT(h0=0.1, solver="sparse")
    sigma = random_sigma(op.n_elems, batch=2, seed=6)
    v = torch.randn(2, op.n_meas, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = sigma.clone().requires_grad_()
    (reference,) = torch.autograd.grad(op.voltages_from_fields(op.fields(x)), x, v)  # adjoint of the sparse solve
    assert rel(op.vjp(sigma, v), reference) < 1e-12  # measured 1.0e-13


def test_sparse_gradcheck_and_second_order():
    op = EIT(n_electrodes=8, h0=0.3, solver="sparse")
    sigma = random_sigma(op.n_elems, batch=2, seed=9, low=0.5, high=2.0).requires_grad_()
    assert torch.autograd.gradcheck(op, (sigma,), eps=1e-6, atol=5e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(op, (sigma,), eps=1e-6, atol=5e-8, rtol=1e-6)
    target = op(sigma.detach() * 1.1)
    assert torch.autograd.gradcheck(lambda s: op.misfit_grad(s, target), (sigma,), eps=1e-6, atol=5e-8, rtol=1e-6)


def test_indefinite_samples_fall_back_to_lu():
    dense, sparse = EIT(h0=0.1, solver="dense"), EIT(h0=0.1, solver="sparse")
    sigma = random_sigma(dense.n_elems, batch=3, seed=10)
    sigma[1, :200] = -0.5  # K(sigma) indefinite for sample 1
    assert sparse.fem_solver().cholesky.factor(sparse.stiffness_values(sigma)).ok.tolist() == [True, False, True]
    assert rel(sparse.fields(sigma), dense.fields(sigma)) < 1e-12  # measured 6.7e-15
    assert rel(sparse._voltages_only(sigma), dense._voltages_only(sigma)) < 1e-12  # measured 6.0e-14


def test_gauss_newton_same_on_both_paths():
    dense, sparse = EIT(h0=0.1, solver="dense"), EIT(h0=0.1, solver="sparse")
    voltages = dense(random_sigma(dense.n_elems, batch=2, seed=11, low=0.5, high=2.0))
    assert rel(GaussNewton()(sparse, voltages), GaussNewton()(dense, voltages)) < 1e-11  # measured 1.0e-13


def test_auto_choice_and_bad_value():
    assert fem_solver.choose("auto", 376, torch.device("cpu")) == "sparse"
    assert fem_solver.choose("auto", 150, torch.device("cpu")) == "dense"
    assert fem_solver.choose("dense", 10_000, torch.device("cpu")) == "dense"
    assert EIT(h0=0.1).fem_solver().name == "sparse" and EIT(h0=0.3).fem_solver().name == "dense"
    with pytest.raises(ConfigError, match=r"operator.solver='lu': expected one of auto, dense, sparse"):
        EIT(h0=0.3, solver="lu")


def test_chunking_is_invisible():
    op = EIT(h0=0.1, solver="sparse")
    sigma = random_sigma(op.n_elems, batch=op.chunk_size(torch.device("cpu")) + 3, seed=12)
    y = op(random_sigma(op.n_elems, batch=sigma.shape[0], seed=13))
    whole = op.misfit_grad(sigma, y)
    assert rel(whole[-2:], op.misfit_grad(sigma[-2:], y[-2:])) < 1e-13  # measured 0 (bit for bit)
