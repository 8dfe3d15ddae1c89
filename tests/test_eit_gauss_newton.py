"""Batched Gauss-Newton against pyEIT's JAC.gn (gtol=0: every iteration runs)."""

import numpy as np
import pytest
import pyeit.eit.protocol
import pyeit.mesh
import torch
from pyeit.eit.fem import EITForward
from pyeit.eit.jac import JAC
from pyeit.mesh import PyEITMesh

from deepunroll.data.phantoms import EITPhantoms
from conftest import rel
from deepunroll.operators.eit import EIT, GaussNewton

PUBLISHED_GN = dict(lamb_decay=0.1, lamb_min=1e-5, maxiter=8, gtol=0)


def phantoms(op, n, seed, n_inclusions=2):
    return EITPhantoms(n_inclusions).sample(op, n, torch.Generator().manual_seed(seed))


def pyeit_gn(mesh, protocol, voltages, **kwargs):
    solver = JAC(mesh, protocol)
    solver.setup(p=0.25, lamb=1.0, method="lm")  # the published call; gn uses its own `method`
    return np.stack([solver.gn(v, **PUBLISHED_GN, **kwargs) for v in voltages])


@pytest.fixture(scope="module")
def setup_small():
    mesh, prot = pyeit.mesh.create(16, h0=0.3), pyeit.eit.protocol.create(16, 1, 1, "std")
    op = EIT.from_pyeit(mesh, prot)
    sigma = phantoms(op, 2, seed=0, n_inclusions=3)
    return mesh, prot, op, sigma, op(sigma)


def test_matches_pyeit_published_call(setup_small):
    mesh, prot, op, sigma, voltages = setup_small
    ours = GaussNewton()(op, voltages).numpy()
    assert rel(ours, pyeit_gn(mesh, prot, voltages.numpy())) < 5e-12  # measured 7.4e-14
    assert rel(ours, sigma.numpy()) < rel(np.ones_like(ours), sigma.numpy())  # it reconstructs something


@pytest.mark.parametrize("method", ["lm", "dgn"])
def test_matches_pyeit_other_regularisers(setup_small, method):
    mesh, prot, op, _, voltages = setup_small
    ours = GaussNewton(method=method)(op, voltages[:1]).numpy()
    assert rel(ours, pyeit_gn(mesh, prot, voltages[:1].numpy(), method=method)) < 5e-11  # measured lm 2.5e-14, dgn 7.4e-13


@pytest.mark.slow
def test_matches_pyeit_published_mesh():
    mesh, prot = pyeit.mesh.create(16, h0=0.1), pyeit.eit.protocol.create(16, 1, 1, "std")
    op = EIT.from_pyeit(mesh, prot)
    voltages = op(phantoms(op, 1, seed=1, n_inclusions=4))
    assert rel(GaussNewton()(op, voltages).numpy(), pyeit_gn(mesh, prot, voltages.numpy())) < 1e-11  # measured 1.3e-13


def test_electrode_subset_matches_pyeit():
    electrodes = [0, 2, 4, 6, 8, 10, 12, 14]
    op = EIT(h0=0.3, electrodes=electrodes)
    full = pyeit.mesh.create(16, h0=0.3)
    mesh = PyEITMesh(node=full.node, element=full.element, el_pos=full.el_pos[electrodes], ref_node=full.ref_node)
    prot = pyeit.eit.protocol.create(8, 1, 1, "std")
    voltages = op(phantoms(op, 1, seed=2))
    assert rel(GaussNewton()(op, voltages).numpy(), pyeit_gn(mesh, prot, voltages.numpy())) < 3e-12  # measured 3.7e-14


def test_meas_fraction_matches_numpy_gn_on_pyeit_jacobian_rows():
    """pyEIT cannot drop arbitrary rows, so the reference is the same update written in NumPy on
    pyEIT's own voltages and (negated) Jacobian, restricted to the kept rows."""
    mesh, prot = pyeit.mesh.create(16, h0=0.3), pyeit.eit.protocol.create(16, 1, 1, "std")
    op = EIT.from_pyeit(mesh, prot, meas_fraction=0.5, meas_seed=4)
    rows = op.plan.rows
    voltages = op(phantoms(op, 1, seed=3))
    fwd, x, lamb = EITForward(mesh, prot), np.ones(mesh.n_elems), 1.0
    for _ in range(8):
        jac, v0 = fwd.compute_jac(x)
        jac, r0 = jac[rows], voltages[0].numpy() - v0[rows]
        j_w_j = jac.T @ jac
        x = x - np.linalg.solve(j_w_j + lamb * np.diag(np.diag(j_w_j) ** 0.25), jac.T @ r0)
        lamb = max(lamb * 0.1, 1e-5)
    assert rel(GaussNewton()(op, voltages)[0].numpy(), x) < 5e-12  # measured 5.6e-14


def test_batched_equals_per_sample_and_chunking_is_invisible():
    op = EIT(h0=0.3)
    voltages = op(phantoms(op, 3, seed=5))
    batched = GaussNewton()(op, voltages)
    chunked = GaussNewton(chunk_size=1)(op, voltages)
    single = torch.cat([GaussNewton()(op, voltages[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, chunked, rtol=1e-12, atol=0) and torch.allclose(batched, single, rtol=1e-12, atol=0)
    assert GaussNewton()(op, voltages.float()).dtype == torch.float32


def test_schedule_and_zero_iterations():
    assert GaussNewton().lambdas() == pytest.approx([1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-5, 1e-5])
    op = EIT(h0=0.3)
    out = GaussNewton(n_iter=0, background=1.5)(op, torch.zeros(2, op.n_meas, dtype=torch.float64))
    assert torch.equal(out, torch.full((2, op.n_elems), 1.5, dtype=torch.float64))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="newton"), "method"), (dict(lamb=0.0), "lamb"), (dict(n_iter=-1), "n_iter"), (dict(background=0.0), "background"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussNewton(**kwargs)
