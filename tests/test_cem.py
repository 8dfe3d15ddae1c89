"""Complete electrode model: gradients, reciprocity, the homogeneous disk, the point-electrode limit, contact
impedance."""

import numpy as np
import pytest
import torch
from pyeit.mesh import PyEITMesh
from scipy.spatial import Delaunay

from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.operators.eit.mesh import build_electrode_disk_mesh
from deepunroll.operators.eit.operator import EIT
from deepunroll.operators.eit.protocol import build_protocol

N_EL, WIDTH = 16, 0.2  # electrodes of 0.2 rad on the unit disk (32 % coverage)


def adjacent_patterns(n_el: int) -> tuple[np.ndarray, np.ndarray]:
    """(injections (L, L): +1 A at l, -1 A at l + 1; measurements (L, L - 1): U_m - U_(m+1))."""
    inj = np.zeros((n_el, n_el))
    meas = np.zeros((n_el, n_el - 1))
    for l in range(n_el):
        inj[l, l], inj[(l + 1) % n_el, l] = 1.0, -1.0
    for m in range(n_el - 1):
        meas[m, m], meas[m + 1, m] = 1.0, -1.0
    return inj, meas


def cem_operator(h0: float, z: float = 0.05, width: float = WIDTH, patterns=None) -> CompleteElectrodeModel:
    nodes, elements, faces = build_electrode_disk_mesh(N_EL, h0, width)
    inj, meas = adjacent_patterns(N_EL) if patterns is None else patterns
    return CompleteElectrodeModel(nodes, elements, faces, inj, meas, z)


def disk_reference(z: float, width: float, inj: np.ndarray, meas: np.ndarray, modes: int = 256,
                   points: int = 96) -> np.ndarray:
    """Voltages of the CEM on the homogeneous unit disk (sigma = 1) by a Fourier-Galerkin solution:
    u = a_0 + sum_n r^n (a_n cos n theta + b_n sin n theta); the boundary condition
    du/dr = sum_l chi_l (U_l - u) / z is projected onto cos/sin n theta (n <= modes), with the electrode
    equations I_l = (1/z) int_(e_l) (U_l - u) and sum U_l = 0; integrals by Gauss-Legendre on each electrode.
    Returns (n_inj * n_meas,) injection-major."""
    n_el = inj.shape[0]
    n = np.arange(1, modes + 1)
    gl_x, gl_w = np.polynomial.legendre.leggauss(points)
    size = 1 + 2 * modes
    system = np.zeros((size + n_el, size + n_el))
    system[np.arange(1, size), np.arange(1, size)] = np.pi * np.concatenate([n, n])
    for l in range(n_el):
        centre = np.pi / 2 + 2 * np.pi * l / n_el
        theta = centre + width / 2 * gl_x
        w = width / 2 * gl_w
        basis = np.concatenate([np.ones((1, points)), np.cos(np.outer(n, theta)), np.sin(np.outer(n, theta))])
        mass = (basis * w) @ basis.T / z  # int_(e_l) u basis_j / z
        load = basis @ w / z              # int_(e_l) basis_j / z
        system[1:size, :size] += mass[1:]
        system[1:size, size + l] -= load[1:]
        system[size + l, :size] -= load
        system[size + l, size + l] += width / z
    system[0, size:] = 1.0  # gauge: sum U = 0 (replaces the redundant n = 0 projection)
    rhs = np.zeros((size + n_el, inj.shape[1]))
    rhs[size:] = inj
    potentials = np.linalg.solve(system, rhs)[size:]  # (L, n_inj)
    return (potentials.T @ meas).reshape(-1)


def test_vjp_and_jacobian_match_autograd_and_finite_differences():
    """Measured: vjp = autograd exactly (same adjoint), 3e-9 to 8e-9 from central differences (eps 1e-6); J^T v = vjp to
    1e-15; a Jacobian column against a central difference (eps 1e-6, rounding-limited) 5.8e-8."""
    op = cem_operator(0.2)
    gen = torch.Generator().manual_seed(0)
    x = 1 + 0.3 * torch.rand(2, op.in_shape[0], generator=gen, dtype=torch.float64)
    errors = op.check_vjp(x)
    assert errors["autograd"] < 1e-12 and errors["finite_difference"] < 1e-6
    v = torch.randn(2, op.n_out, generator=gen, dtype=torch.float64)
    jac = op.jacobian(x)
    torch.testing.assert_close(torch.einsum("bme,bm->be", jac, v), op.vjp(x, v), rtol=1e-10, atol=1e-14)
    y = op(1.1 * x)
    torch.testing.assert_close(op.misfit_grad(x, y), op.vjp(x, op(x) - y), rtol=1e-12, atol=1e-16)
    e, eps = 7, 1e-6
    step = torch.zeros_like(x)
    step[:, e] = eps
    column = (op(x + step) - op(x - step)) / (2 * eps)
    assert float((jac[:, :, e] - column).norm() / column.norm()) < 3e-7


def test_field_adjoint_matches_autograd_through_the_solve():
    """misfit_grad, vjp (the backward of forward) and their second derivatives, all from the unit-current electrode
    fields, against autograd through the sparse solve (``voltages``). Measured: 1.8e-15, 5.8e-15; Hessian-vector
    products 2.7e-15, 3.6e-15 relative."""
    op = cem_operator(0.2)
    gen = torch.Generator().manual_seed(3)
    x = (1 + 0.3 * torch.rand(2, op.in_shape[0], generator=gen, dtype=torch.float64)).requires_grad_()
    y = op(1.1 * x).detach()
    v = torch.randn(2, op.n_out, generator=gen, dtype=torch.float64)
    u = torch.randn(2, op.in_shape[0], generator=gen, dtype=torch.float64)
    (misfit,) = torch.autograd.grad(0.5 * (op.voltages(x) - y).square().sum(), x, create_graph=True)
    (vjp,) = torch.autograd.grad(op.voltages(x), x, v, create_graph=True)
    for ours, reference in ((op.misfit_grad(x, y), misfit), (op.vjp(x, v), vjp)):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12 * float(reference.detach().abs().max()))
        second, second_ref = (torch.autograd.grad((g * u).sum(), x, retain_graph=True)[0] for g in (ours, reference))
        torch.testing.assert_close(second, second_ref, rtol=1e-12, atol=1e-12 * float(second_ref.abs().max()))


def graded_disk(n_el: int, zone: float = 0.2, rings: int = 13, spacing: float = 0.05, ratio: float = 2 ** 0.5):
    """Unit-disk Delaunay mesh refined towards the electrode centres (angles pi/2 + 2 pi l / n_el, nodes 0 .. n_el - 1):
    around centre P_l, half-rings of radius 2 sin(a/2), which meet the circle at P_l's angle +- a, for
    a = zone / ratio^j (j < rings), with nodes ~ (ratio - 1) times their radius apart; outside those zones, rings
    ``spacing`` apart. Returns (nodes, CCW elements, boundary segments (k, 2), centre angles)."""
    centres = np.pi / 2 + 2 * np.pi * np.arange(n_el) / n_el
    tips = np.stack([np.cos(centres), np.sin(centres)], axis=1)
    points = [tips]
    for c, tip in zip(centres, tips):
        for a in zone / ratio ** np.arange(rings):
            phi = c + np.pi + np.linspace(a - np.pi, np.pi - a, int(np.ceil((np.pi - a) / (ratio - 1))) + 1) / 2
            ring = tip + 2 * np.sin(a / 2) * np.stack([np.cos(phi), np.sin(phi)], axis=1)
            ring[[0, -1]] = np.stack([np.cos([c - a, c + a]), np.sin([c - a, c + a])], axis=1)  # exactly on the circle
            points.append(ring)
    for r in np.arange(1.0, 0.0, -spacing):
        theta = np.linspace(0, 2 * np.pi, int(np.ceil(2 * np.pi * r / spacing)), endpoint=False)
        ring = r * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        outside = np.linalg.norm(ring[:, None] - tips, axis=2).min(axis=1) > 2 * np.sin(zone / 2) + spacing / 2
        points.append(ring[outside])
    nodes = np.concatenate(points + [np.zeros((1, 2))])
    mesh = Delaunay(nodes)
    assert mesh.coplanar.size == 0  # every point is a node
    elements = mesh.simplices.astype(np.int64)
    edges = nodes[elements[:, 1:]] - nodes[elements[:, :1]]
    clockwise = edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0] < 0
    elements[clockwise] = elements[clockwise][:, ::-1]
    return nodes, elements, mesh.convex_hull, centres


def test_point_electrode_limit():
    """As the electrode width w and the contact impedance z go to zero, the CEM tends to the point-electrode model
    (pyEIT's: +-1 A into a node, the potential read at a node) away from the current-carrying electrodes.

    Why this comparison: both models are solved on the same mesh with the same non-homogeneous sigma, the CEM's
    electrodes are arcs of width w centred on the point electrodes' nodes. For the point model, the potential at
    its source is singular (logarithmic in the continuum, mesh-dependent in the FEM), and a CEM electrode carrying
    current is at U = u + z j, so the voltages on current-carrying electrodes have no common limit; the comparison
    is on pyEIT's adjacent protocol, whose 40 rows (8 electrodes) never measure on an injecting electrode
    (checked). There, the CEM differs from point sources by the current density's spread over w (its mean is the
    current, its first moment vanishes to leading order by symmetry, so the far field moves by O(w^2)) and the
    measuring electrodes average the potential over w (O(w^2) for a smooth potential): errors ~ w^2. The mesh is
    graded (rings of radius 0.2 down to 0.003 around the centres, 0.05 apart in the bulk; 1,988 nodes) so the
    electrode widths 0.2 .. 0.025 rad are resolved and one mesh serves every w (each electrode is the boundary
    segments within w/2 of its centre).

    Measured relative errors (2-norm over the 40 rows), w = 0.2, 0.1, 0.05, 0.025 rad: z = w/10: 4.845e-3, 1.073e-3,
    2.361e-4, 5.125e-5 (ratios 4.52, 4.55, 4.61); z = 1e-6 (the shunt limit): 1.370e-2, 3.217e-3, 7.582e-4,
    1.778e-4 (ratios 4.26, 4.24, 4.26): second order. The mesh barely matters: the errors move by <= 0.3 % when
    the bulk rings are rotated or refined to 0.04 or two more rings are added at the centres."""
    n_el, widths = 8, (0.2, 0.1, 0.05, 0.025)
    nodes, elements, boundary, centres = graded_disk(n_el)
    assert nodes.shape[0] == 1988 and elements.shape[0] == 3706  # the mesh measured
    centroids = nodes[elements].mean(axis=1)
    sigma = 1 + 0.8 * np.exp(-((centroids - [0.3, -0.2]) ** 2).sum(axis=1) / 0.1) + 0.3 * centroids[:, 0]
    sigma = torch.as_tensor(sigma)[None]
    mesh = PyEITMesh(node=nodes, element=elements, el_pos=np.arange(n_el), ref_node=nodes.shape[0] - 1)
    point = EIT.from_pyeit(mesh, build_protocol(n_el, 1, 1, "std"))
    reference = point(sigma)[0].numpy()
    a, b, n, m = point.plan.abmn.T
    assert point.n_meas == 40 and np.all(point.plan.abmn[:, 2:, None] != point.plan.abmn[:, None, :2])
    rows = np.arange(point.n_meas)
    inj, meas = np.zeros((2, n_el, point.n_meas))
    np.add.at(inj, (a, rows), 1.0), np.add.at(inj, (b, rows), -1.0)
    np.add.at(meas, (n, rows), 1.0), np.add.at(meas, (m, rows), -1.0)
    offset = np.angle(np.exp(1j * (np.arctan2(nodes[boundary, 1], nodes[boundary, 0])[None] - centres[:, None, None])))
    measured = {"w/10": (4.845e-3, 1.073e-3, 2.361e-4, 5.125e-5), "1e-6": (1.370e-2, 3.217e-3, 7.582e-4, 1.778e-4)}
    ratios = {"w/10": (4.52, 4.55, 4.61), "1e-6": (4.26, 4.24, 4.26)}
    for rule, expected in measured.items():
        errors = []
        for w in widths:
            faces = [boundary[np.all(np.abs(o) <= w / 2 + 1e-9, axis=1)] for o in offset]
            cem = CompleteElectrodeModel(nodes, elements, faces, inj, meas, w / 10 if rule == "w/10" else 1e-6)
            voltages = cem(sigma)[0].reshape(point.n_meas, point.n_meas).diagonal().numpy()  # injection r, pattern r
            errors.append(np.linalg.norm(voltages - reference) / np.linalg.norm(reference))
        assert errors == pytest.approx(expected, rel=1e-2)
        assert [errors[k] / errors[k + 1] for k in range(3)] == pytest.approx(ratios[rule], abs=0.03)


def test_reciprocity():
    """Injecting at pair A and reading pair B equals injecting at B and reading A (A is symmetric): 2.3e-16 measured."""
    inj, _ = adjacent_patterns(N_EL)
    op = cem_operator(0.15, patterns=(inj, inj))
    x = 1 + 0.5 * torch.rand(3, op.in_shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = op(x).reshape(3, N_EL, N_EL)
    torch.testing.assert_close(v, v.transpose(1, 2), rtol=1e-10, atol=1e-13)


def test_homogeneous_disk_matches_the_fourier_solution_and_converges():
    """Relative voltage error against the Fourier-Galerkin disk solution (z = 0.5, electrodes 0.2 rad).
    Measured: the reference moves by 3.5e-5 from 256 to 512 modes; FEM errors 2.29e-2 (h0 0.1, 399 nodes),
    7.41e-3 (h0 0.05), 2.20e-3 (h0 0.025, not run here): rate h^1.6 -> h^1.75, towards the P1 rate h^2
    (electrode edges make the solution singular; the polygon approximates the circle to O(h^2))."""
    inj, meas = adjacent_patterns(N_EL)
    reference = disk_reference(0.5, WIDTH, inj, meas, modes=512)
    coarse = disk_reference(0.5, WIDTH, inj, meas, modes=256)
    assert np.linalg.norm(coarse - reference) / np.linalg.norm(reference) < 1e-4
    errors = []
    for h0 in (0.1, 0.05):
        op = cem_operator(h0, z=0.5)
        v = op(torch.ones(1, op.in_shape[0], dtype=torch.float64))[0].numpy()
        errors.append(np.linalg.norm(v - reference) / np.linalg.norm(reference))
    assert errors[0] < 2.6e-2 and errors[1] < 8.5e-3
    assert errors[0] / errors[1] > 2.8


def test_contact_impedance_gradient_and_bad_input():
    """voltages() is differentiable in z: d/dz of a voltage sum against a central difference (measured 8.8e-10)."""
    op = cem_operator(0.2)
    sigma = torch.ones(1, op.in_shape[0], dtype=torch.float64)
    z = torch.full((1, N_EL), 0.05, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(op.n_out, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (grad,) = torch.autograd.grad((op.voltages(sigma, z) * weights).sum(), z)
    eps, step = 1e-7, torch.zeros_like(z)
    step[0, 3] = eps
    with torch.no_grad():
        fd = ((op.voltages(sigma, z + step) - op.voltages(sigma, z - step)) * weights).sum() / (2 * eps)
    assert float(grad[0, 3]) == pytest.approx(float(fd), rel=1e-6)
    with pytest.raises(ValueError, match="sigma must be positive"):
        op(-sigma)
    with pytest.raises(ValueError, match="sum to 0"):
        inj, meas = adjacent_patterns(N_EL)
        inj[0, 0] = 2.0
        cem_operator(0.3, patterns=(inj, meas))
