"""EIT operator: pyEIT 1.2.4 agreement, gradients (adjoint, Jacobian, autograd), limited measurements, errors."""

import json

import numpy as np
import pytest
import pyeit.eit.protocol
import pyeit.mesh
import torch
from pyeit.eit.fem import EITForward
from pyeit.mesh import PyEITMesh

from conftest import rel
from deepunroll.operators.eit import EIT
from deepunroll.operators.eit.mesh import build_disk_mesh


def random_sigma(n_elems, batch=3, seed=0, low=0.2, high=3.0):
    return np.random.default_rng(seed).uniform(low, high, (batch, n_elems))


def pyeit_voltages(mesh, protocol, sigma):
    fwd = EITForward(mesh, protocol)
    return np.stack([fwd.solve_eit(s) for s in sigma])


@pytest.fixture(scope="module")
def small():
    """h0=0.25 disk, 16 electrodes: 75 nodes, 114 elements, 208 rows."""
    return EIT(h0=0.25)


# ------------------------------------------------------------------ mesh, protocol
def test_published_sizes_and_geometry():
    op = EIT()
    assert (op.n_nodes, op.n_elems, op.n_meas) == (376, 686, 208)
    assert op.in_shape == (686,) and op.out_shape == (208,)
    assert op.centroids.shape == (686, 2) and op.nodes.shape == (376, 2) and op.elements.shape == (686, 3)
    assert float(op.centroids.norm(dim=1).max()) < 1.0
    assert op.ref_node == 16 and op.el_pos.tolist() == list(range(16))


def test_mesh_is_deterministic_and_leaves_numpy_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    first = build_disk_mesh(16, 0.2)
    assert np.random.rand() == expected
    np.random.seed(999)
    second = build_disk_mesh(16, 0.2)
    assert np.array_equal(first.node, second.node) and np.array_equal(first.element, second.element)


def test_metadata_describes_the_model():
    meta = EIT(h0=0.2, electrodes=[0, 2, 4, 6, 8, 10, 12, 14], meas_fraction=0.5, meas_seed=3).metadata()
    for key in ("n_electrodes", "h0", "dist_exc", "step_meas", "parser", "electrodes", "meas_fraction", "meas_seed"):
        assert key in meta
    arrays = {k: v for k, v in meta.items() if isinstance(v, np.ndarray)}
    assert {"nodes", "elements", "el_pos", "ex_mat", "meas_mat", "meas_rows"} <= set(arrays)
    json.dumps({k: v for k, v in meta.items() if k not in arrays})  # the rest is plain config data
    assert meta["electrodes"] == [0, 2, 4, 6, 8, 10, 12, 14] and meta["n_meas"] == 20
    assert meta["ex_mat"].max() == 14  # protocol stored in mesh electrode indices


def test_hydra_list_configs_are_accepted():
    from omegaconf import OmegaConf

    op = EIT(h0=0.3, dist_exc=OmegaConf.create([1, 4]), parser=OmegaConf.create(["fmmu", "meas_current"]),
             electrodes=OmegaConf.create([0, 2, 4, 6, 8, 10, 12, 14]))
    meta = op.metadata()
    assert meta["dist_exc"] == [1, 4] and meta["parser"] == ["fmmu", "meas_current"] and op.n_meas == 128
    json.dumps({k: v for k, v in meta.items() if not isinstance(v, np.ndarray)})


# ------------------------------------------------------------------ forward vs pyEIT
PROTOCOLS = [
    dict(dist_exc=1, step_meas=1, parser="std"),
    dict(dist_exc=-1, step_meas=1, parser="meas_current"),  # -1: opposite electrodes, n_el // 2
    dict(dist_exc=[1, 4], step_meas=3, parser="fmmu"),
]


@pytest.mark.parametrize("h0, n_el", [(0.2, 16), (0.25, 8), (0.15, 12)])
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["adjacent", "opposite_meas_current", "stacked_fmmu"])
def test_forward_matches_pyeit(h0, n_el, protocol):
    if protocol["dist_exc"] == -1:
        protocol = {**protocol, "dist_exc": n_el // 2}
    op = EIT(n_electrodes=n_el, h0=h0, **protocol)
    mesh = pyeit.mesh.create(n_el, h0=h0)
    prot = pyeit.eit.protocol.create(n_el, protocol["dist_exc"], protocol["step_meas"], protocol["parser"])
    sigma = random_sigma(mesh.n_elems)
    expected = pyeit_voltages(mesh, prot, sigma)
    assert op.n_meas == expected.shape[1]
    assert rel(op(torch.tensor(sigma)).numpy(), expected) < 5e-13  # measured 1.5e-15 ... 7.7e-15 over the 9 cases


def test_forward_matches_pyeit_published_mesh():
    op = EIT(h0=0.1)
    mesh, prot = pyeit.mesh.create(16, h0=0.1), pyeit.eit.protocol.create(16, 1, 1, "std")
    sigma = random_sigma(686, batch=2, seed=1)
    assert rel(op(torch.tensor(sigma)).numpy(), pyeit_voltages(mesh, prot, sigma)) < 1e-12  # measured 1.6e-14


def test_from_pyeit_objects_with_other_reference_node():
    mesh = pyeit.mesh.create(16, h0=0.2)
    mesh = PyEITMesh(node=mesh.node, element=mesh.element, el_pos=mesh.el_pos, ref_node=40)
    prot = pyeit.eit.protocol.create(16, 3, 2, "std")
    op = EIT.from_pyeit(mesh, prot)
    sigma = random_sigma(mesh.n_elems, seed=2)
    assert op.ref_node == 40
    assert rel(op(torch.tensor(sigma)).numpy(), pyeit_voltages(mesh, prot, sigma)) < 5e-13  # measured 5.8e-15
    assert op.metadata()["parser"] == "custom"


def test_dtype_and_batch_conventions(small):
    sigma = torch.tensor(random_sigma(small.n_elems, batch=4, seed=3))
    v64 = small(sigma)
    v32 = small(sigma.float())
    assert v32.dtype == torch.float32 and v64.dtype == torch.float64
    assert torch.allclose(v32.double(), v64, rtol=5e-6, atol=0)  # measured 8.9e-8 (float32)
    assert torch.allclose(small(sigma[1:2]), v64[1:2], rtol=5e-13, atol=0)  # batching does not mix samples; 8.8e-15
    assert small.misfit_grad(sigma.float(), v32).dtype == torch.float32
    assert small.jacobian(sigma.float()).shape == (4, 208, small.n_elems)
    assert dict(small.named_buffers())["nodes"].dtype == torch.float64
    assert small.state_dict() == {}  # derived buffers are rebuilt from the config, not checkpointed


# ------------------------------------------------------------------ gradients
def test_jacobian_is_minus_pyeit_compute_jac():
    mesh, prot = pyeit.mesh.create(16, h0=0.2), pyeit.eit.protocol.create(16, 1, 1, "std")
    op = EIT.from_pyeit(mesh, prot)
    sigma = random_sigma(mesh.n_elems, batch=2, seed=4)
    ours = op.jacobian(torch.tensor(sigma)).numpy()
    for b in range(2):
        jac, v0 = EITForward(mesh, prot).compute_jac(sigma[b])
        assert rel(ours[b], -jac) < 1e-12  # measured 1.1e-14, 1.7e-14
        assert rel(op(torch.tensor(sigma[b : b + 1]))[0].numpy(), v0) < 5e-13  # measured 5.4e-15, 7.0e-15


def test_jacobian_against_finite_differences_and_autograd(small):
    sigma = torch.tensor(random_sigma(small.n_elems, batch=2, seed=5, low=0.5, high=2.0))
    errors = small.check_jacobian(sigma, eps=1e-6)
    assert errors["autograd"] < 1e-14 and errors["finite_difference"] < 1e-6  # measured 3.1e-16, 3.4e-8


def test_vjp_adjoint_against_autograd_through_cholesky_and_fd(small):
    sigma = torch.tensor(random_sigma(small.n_elems, batch=3, seed=6))
    v = torch.randn(3, small.n_meas, dtype=torch.float64)
    ours = small.vjp(sigma, v)
    # independent reference: plain autograd through the assembly, Cholesky and solve
    x = sigma.clone().requires_grad_()
    plain = small.voltages_from_fields(small.fields(x))
    (reference,) = torch.autograd.grad(plain, x, v)
    assert rel(ours, reference) < 5e-13  # measured 5.2e-15
    assert rel(ours, torch.einsum("bm,bme->be", v, small.jacobian(sigma))) < 5e-13  # measured 9.5e-15
    # random direction: measured 2.9e-9; over 30 directions median 3.9e-9, max 1.9e-8
    assert small.check_vjp(sigma, v)["finite_difference"] < 2e-7


def test_misfit_grad_sign_and_value(small):
    sigma = torch.tensor(random_sigma(small.n_elems, batch=2, seed=7, low=0.5, high=2.0))
    target = small(torch.tensor(random_sigma(small.n_elems, batch=2, seed=8, low=0.5, high=2.0)))
    grad = small.misfit_grad(sigma, target)
    assert rel(grad, small.vjp(sigma, small(sigma) - target)) < 2e-13  # measured 3.2e-15
    direction, eps = torch.randn_like(sigma), 1e-6

    def loss(s):
        return 0.5 * (small(s) - target).square().sum(dim=1)

    fd = (loss(sigma + eps * direction) - loss(sigma - eps * direction)) / (2 * eps)
    # d = J^T (F(x) - y): descent is -d. Measured 1.2e-9; over 30 random directions median 4.3e-9, max 3.4e-8
    assert rel((grad * direction).sum(dim=1), fd) < 3e-7


def test_autograd_gradcheck_and_second_order():
    op = EIT(n_electrodes=8, h0=0.3)
    sigma = torch.tensor(random_sigma(op.n_elems, batch=2, seed=9, low=0.5, high=2.0)).requires_grad_()
    assert torch.autograd.gradcheck(op, (sigma,), eps=1e-6, atol=5e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(op, (sigma,), eps=1e-6, atol=5e-8, rtol=1e-6)
    target = op(sigma.detach() * 1.1)
    assert torch.autograd.gradcheck(lambda s: op.misfit_grad(s, target), (sigma,), eps=1e-6, atol=5e-8, rtol=1e-6)


# ------------------------------------------------------------------ limited measurements
EVERY_OTHER = [0, 2, 4, 6, 8, 10, 12, 14]


def test_electrode_subset_matches_pyeit():
    op = EIT(h0=0.2, electrodes=EVERY_OTHER)
    full = pyeit.mesh.create(16, h0=0.2)
    mesh = PyEITMesh(node=full.node, element=full.element, el_pos=full.el_pos[EVERY_OTHER], ref_node=full.ref_node)
    prot = pyeit.eit.protocol.create(8, 1, 1, "std")
    sigma = random_sigma(full.n_elems, batch=2, seed=10)
    assert op.n_meas == 40 and op.electrodes == EVERY_OTHER
    assert rel(op(torch.tensor(sigma)).numpy(), pyeit_voltages(mesh, prot, sigma)) < 5e-13  # measured 5.4e-15
    jac, _ = EITForward(mesh, prot).compute_jac(sigma[0])
    assert rel(op.jacobian(torch.tensor(sigma[:1]))[0].numpy(), -jac) < 1e-12  # measured 1.3e-14


def test_meas_fraction_is_a_seeded_row_subset_everywhere(small):
    part = EIT(h0=0.25, meas_fraction=0.3, meas_seed=5)
    rows = torch.as_tensor(part.plan.rows)
    assert part.n_meas == round(0.3 * 208) and rows.unique().numel() == part.n_meas
    assert np.array_equal(EIT(h0=0.25, meas_fraction=0.3, meas_seed=5).plan.rows, part.plan.rows)
    assert not np.array_equal(EIT(h0=0.25, meas_fraction=0.3, meas_seed=6).plan.rows, part.plan.rows)
    sigma = torch.tensor(random_sigma(small.n_elems, batch=2, seed=11))
    assert rel(part(sigma), small(sigma)[:, rows]) < 1e-15  # measured 0: the same computation, rows picked
    assert rel(part.jacobian(sigma), small.jacobian(sigma)[:, rows]) < 1e-15
    v = torch.randn(2, part.n_meas, dtype=torch.float64)
    padded = torch.zeros(2, 208, dtype=torch.float64)
    padded[:, rows] = v
    assert rel(part.vjp(sigma, v), small.vjp(sigma, padded)) < 1e-15  # measured 0


def test_electrodes_and_fraction_combine():
    both = EIT(h0=0.25, electrodes=EVERY_OTHER, meas_fraction=0.5, meas_seed=1)
    subset = EIT(h0=0.25, electrodes=EVERY_OTHER)
    sigma = torch.tensor(random_sigma(both.n_elems, batch=1, seed=12))
    assert both.n_meas == 20
    assert rel(both(sigma), subset(sigma)[:, torch.as_tensor(both.plan.rows)]) < 1e-15  # measured 0


# ------------------------------------------------------------------ errors
def test_nonpositive_conductivity_raises_clear_error(small):
    sigma = torch.ones(2, small.n_elems, dtype=torch.float64)
    sigma[0, 3], sigma[1, 7] = 0.0, -0.5
    y = torch.zeros(2, small.n_meas, dtype=torch.float64)
    for call in (lambda: small(sigma), lambda: small.vjp(sigma, y), lambda: small.jacobian(sigma),
                 lambda: small.misfit_grad(sigma, y)):
        with pytest.raises(ValueError, match=r"2 of 228 entries.*min finite value -0\.5"):
            call()
    sigma[1, 7] = float("nan")
    with pytest.raises(ValueError, match="2 of 228"):
        small(sigma)


@pytest.mark.parametrize("kwargs, match", [
    (dict(electrodes=[0, 1, 2]), "at least 4"),
    (dict(electrodes=[0, 2, 2, 4, 6]), "distinct"),
    (dict(electrodes=[0, 2, 4, 16]), r"\[0, 16\)"),
    (dict(meas_fraction=0.0), "meas_fraction"),
    (dict(h0=0.0), "h0"),
    (dict(dist_exc=16), "dist_exc"),
    (dict(dtype=torch.float32), "float64"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EIT(**{"h0": 0.3, **kwargs})


def test_wrong_shape_is_rejected(small):
    with pytest.raises(ValueError, match="shape"):
        small(torch.ones(2, small.n_elems + 1, dtype=torch.float64))


def test_bench_runs_and_reports_agreement(capsys, tmp_path):
    from deepunroll.bench.eit import main

    main(["--h0", "0.3", "--batch", "2", "--repeats", "1", "--pyeit-samples", "1", "--threads", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for kind in ("dense", "sparse"):
        assert f"{kind} misfit_grad, batch 2" in out and f"{kind} floor: one factorisation" in out
        agreement = float(out.split(f"gradient agreement with pyEIT, {kind} (relative):")[1].split()[0])
        assert agreement < 5e-12  # measured 6.1e-14 (dense)
    assert (tmp_path / "results" / "bench_eit.csv").exists() and (tmp_path / "figures" / "bench_eit_scaling.png").exists()


def test_min_conductivity_clamps_instead_of_raising():
    op = EIT(n_electrodes=8, h0=0.3, min_conductivity=0.05)
    sigma = torch.ones(2, op.n_elems, dtype=torch.float64)
    low = sigma.clone()
    low[0, :3] = -1.0
    clamped = low.clone()
    clamped[0, :3] = 0.05
    torch.testing.assert_close(op(low), op(clamped), rtol=0, atol=0)
    low[1, 0] = float("nan")
    with pytest.raises(ValueError, match="positive and finite"):
        op(low)
    with pytest.raises(ValueError, match="operator.min_conductivity=0"):
        EIT(n_electrodes=8, h0=0.3, min_conductivity=0)
