"""The complete electrode model (CEM) of EIT: electrodes of finite width with contact impedance.

Model (Somersalo, Cheney and Isaacson, SIAM J. Appl. Math. 52, 1992), on a 2D domain with P1 elements:

    -div(sigma grad u) = 0,   u + z_l sigma du/dn = U_l on electrode e_l,   sigma du/dn = 0 between electrodes,
    integral over e_l of sigma du/dn = I_l,

with conductivity sigma per element (S/m), contact impedances z_l (Ohm m^2, per unit depth in 2D), currents
I (A, per column of the injection matrix, summing to zero) and electrode potentials U (V). The weak form is
the symmetric system A(sigma, z) [u; U] = [0; I] over the N nodes and L electrodes,

    A = [[K(sigma) + sum_l M_l / z_l, -s_l / z_l], [-s_l^T / z_l, |e_l| / z_l]],

with M_l the boundary mass matrix of e_l (integrals of phi_i phi_j), s_l the integrals of phi_i over e_l and
|e_l| its length. Ground: the last electrode's potential is 0 (its row and column replaced by the identity);
since every injection and every measurement pattern sums to zero, the measurements do not depend on that
choice. A measurement of injection i is ``measurements[:, m]^T U^(i)``; outputs are injection-major
(B, n_inj * n_meas), the KTC2023 order.

The stiffness part reuses the point-electrode operator's assembly (:func:`fem.assembly_indices` layout and
:func:`fem.assemble_values`); the solve is the batched sparse Cholesky of :mod:`deepunroll.optim.sparse_cholesky`
with the electrode unknowns eliminated last. One factorisation per sample and one solve for the L - 1 unit-current
electrode fields W = A^{-1} [0; e_l] (the grounded electrode's is 0) serve everything, as the point-electrode
operator's unit-current fields do: the injection fields are W injections, the adjoint fields W measurements, and
with R (L - 1, L - 1) the electrode potentials of W, V = injections^T R measurements and
dR_jl/dsigma_e = -(D_e w_j) . (D_e w_l). ``vjp``, ``misfit_grad``, ``jacobian`` and the backward of ``forward``
use these fields (no autograd graph of the solve); :meth:`CompleteElectrodeModel.voltages` is differentiable
in sigma and z by autograd through the solve.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from deepunroll.operators.base import ForwardOperator
from deepunroll.operators.eit import fem
from deepunroll.operators.eit.mesh import check_triangles, scaled_edges
from deepunroll.operators.eit.operator import _AdjointVoltages
from deepunroll.operators.eit.solver import LEAF_SIZE
from deepunroll.optim.ordering import nested_dissection
from deepunroll.optim.sparse_cholesky import SparseCholesky

_DTYPE = torch.float64
_JACOBIAN_CHUNK_BYTES = 64 << 20


def electrode_plan(nodes: np.ndarray, elements: np.ndarray, faces: list[np.ndarray]):
    """Assembly plan of A(sigma, z) over the parameters p = [sigma (E), 1/z (L), 1]: (entry_slot, entry_owner,
    entry_value, slot_flat) as :func:`fem.assembly_indices` returns them, for the (N + L) x (N + L) matrix
    with the last electrode grounded. faces[l]: (k, 2) node pairs of electrode l's boundary segments."""
    n_nodes, n_elems, n_el = nodes.shape[0], elements.shape[0], len(faces)
    rows, cols, owner, value = ([part] for part in fem.stiffness_entries(nodes, elements))
    for l, pairs in enumerate(faces):
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        length = np.linalg.norm(nodes[pairs[:, 0]] - nodes[pairs[:, 1]], axis=1)
        a, b, el = pairs[:, 0], pairs[:, 1], n_nodes + l
        # boundary mass (h/3 on the diagonal, h/6 off it), coupling -h/2 per end node, |e_l| on the diagonal
        r = np.concatenate([a, b, a, b, a, b, np.full_like(a, el), np.full_like(b, el), [el]])
        c = np.concatenate([a, b, b, a, np.full_like(a, el), np.full_like(b, el), a, b, [el]])
        v = np.concatenate([length / 3, length / 3, length / 6, length / 6] + [-length / 2] * 4 + [[length.sum()]])
        rows.append(r), cols.append(c), value.append(v), owner.append(np.full(r.size, n_elems + l))
    size = n_nodes + n_el
    return fem.grounded_plan(*(np.concatenate(x) for x in (rows, cols, owner, value)), size, size - 1, n_elems + n_el)


class CompleteElectrodeModel(ForwardOperator):
    """CEM forward map sigma (B, E) -> electrode voltages (B, n_inj * n_meas), float64 physics, batched.

    nodes (N, 2) in metres (or any unit: sigma and z scale with it); elements (E, 3) CCW triangles;
    electrode_faces: per electrode, its boundary segments as (k, 2) node pairs; injections (L, n_inj) currents
    (A), each column summing to 0; measurements (L, n_meas) patterns, each column summing to 0 (e.g. +1 at
    electrode m, -1 at m + 1); contact_impedance: z > 0, one value or one per electrode.
    """

    def __init__(self, nodes, elements, electrode_faces, injections, measurements, contact_impedance=1e-6,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        nodes = np.ascontiguousarray(nodes, dtype=np.float64)
        elements = np.ascontiguousarray(elements, dtype=np.int64)
        injections = np.asarray(injections, dtype=np.float64)
        measurements = np.asarray(measurements, dtype=np.float64)
        n_el = len(electrode_faces)
        _check_geometry(nodes, elements, electrode_faces)
        for name, pattern in (("injections", injections), ("measurements", measurements)):
            if pattern.ndim != 2 or pattern.shape[0] != n_el:
                raise ValueError(f"CEM: {name} must be (n_electrodes={n_el}, k), got shape {pattern.shape}")
            if np.abs(pattern.sum(axis=0)).max() > 1e-9 * max(1.0, np.abs(pattern).max()):
                raise ValueError(f"CEM: every column of {name} must sum to 0 (currents are conserved, voltages "
                                 "are differences)")
        z = np.broadcast_to(np.asarray(contact_impedance, dtype=np.float64), (n_el,)).copy()
        if not np.all(np.isfinite(z)) or z.min() <= 0:
            raise ValueError(f"CEM: contact_impedance must be positive and finite, got min {z.min()}")
        self.n_nodes, self.n_electrodes = nodes.shape[0], n_el
        self.n_inj, self.n_meas_per = injections.shape[1], measurements.shape[1]
        self.in_shape, self.out_shape = (elements.shape[0],), (self.n_inj * self.n_meas_per,)
        entry_slot, entry_owner, entry_value, slot_flat = electrode_plan(nodes, elements, electrode_faces)
        size = self.n_nodes + n_el
        rows, cols = slot_flat // size, slot_flat % size
        pattern = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(size, size))
        coords = np.concatenate([nodes, np.zeros((n_el, 2))])
        tree = nested_dissection(pattern, coords, leaf_size=LEAF_SIZE, last=np.arange(self.n_nodes, size))
        self.cholesky = SparseCholesky(rows, cols, size, tree)
        sources = np.zeros((size, n_el - 1))  # unit current into each electrode but the grounded one (U_L = 0)
        sources[self.n_nodes + np.arange(n_el - 1), np.arange(n_el - 1)] = 1.0
        arrays = {
            "elements": elements, "nodes": nodes, "contact_impedance": z,
            "asm_entry_slot": entry_slot, "asm_entry_owner": entry_owner, "asm_entry_value": entry_value,
            "asm_slot_flat": slot_flat, "sources": sources,
            "injections": injections[:-1], "measurements": measurements[:-1],  # the grounded electrode's U is 0
            "gradient_ops": fem.gradient_operators(scaled_edges(nodes, elements), elements, -1),
        }
        for name, array in arrays.items():
            tensor = torch.as_tensor(np.ascontiguousarray(array))
            self.register_buffer(name, tensor.to(_DTYPE) if tensor.is_floating_point() else tensor.long(),
                                 persistent=False)
        self.to(device if device is not None else "cpu")

    def _apply(self, fn, recurse=True):
        """Module.to / .cuda also move the symbolic factorisation."""
        out = super()._apply(fn, recurse)
        self.cholesky.to(self.nodes.device)
        return out

    def element_mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nodes, self.elements

    def metadata(self) -> dict:
        return {"operator": "cem", "n_nodes": self.n_nodes, "n_elems": self.in_shape[0],
                "n_electrodes": self.n_electrodes, "n_inj": self.n_inj, "n_meas": self.n_meas_per,
                "contact_impedance": self.contact_impedance.tolist()}

    def reference_point(self) -> torch.Tensor:
        return torch.ones((1, self.in_shape[0]), dtype=_DTYPE, device=self.nodes.device)

    # ------------------------------------------------------------ physics
    def _inputs(self, sigma: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(sigma, "sigma")
        sigma64 = sigma.to(_DTYPE)
        z64 = (self.contact_impedance if z is None else torch.as_tensor(z, dtype=_DTYPE, device=sigma.device))
        z64 = z64.expand(sigma.shape[0], self.n_electrodes)
        for name, t in (("sigma", sigma64), ("contact impedance", z64)):
            bad = ~(torch.isfinite(t) & (t > 0))
            if bool(bad.any()):
                raise ValueError(f"CEM: {name} must be positive and finite; {int(bad.sum())} entries are not "
                                 f"(min {float(t.detach().min()):.3g})")
        return sigma64, z64

    def _values(self, sigma64: torch.Tensor, z64: torch.Tensor) -> torch.Tensor:
        plan = (self.asm_entry_slot, self.asm_entry_owner, self.asm_entry_value, self.asm_slot_flat)
        return fem.assemble_values(torch.cat([sigma64, 1.0 / z64], dim=1), plan)

    def _solve(self, sigma64: torch.Tensor, z64: torch.Tensor) -> torch.Tensor:
        """The fields W (B, N + L, L - 1) of one chunk (see :meth:`fields`)."""
        values = self._values(sigma64, z64)
        factor = self.cholesky.factor(values)
        if not bool(factor.ok.all()):
            raise ValueError("CEM: the system is not positive definite (check sigma > 0 and z > 0)")
        rhs = self.sources.expand(sigma64.shape[0], -1, -1)
        if torch.is_grad_enabled() and values.requires_grad:
            return self.cholesky.solve(values, rhs, factor)
        return factor.solve(rhs)

    def fields(self, sigma64: torch.Tensor, z64: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-current electrode fields W (B, N + L, L - 1) = A^{-1} [0; e_l], l = 1 .. L - 1, volts per ampere, for
        sigma64 (B, E) float64 and z64 (B, L) (default: the operator's); factored in chunks of
        ``cholesky.chunk_size``, differentiable in both by the adjoint of the solve while autograd records."""
        z64 = self.contact_impedance.expand(sigma64.shape[0], -1) if z64 is None else z64
        size = self.cholesky.chunk_size(sigma64.device)
        return torch.cat([self._solve(s, z) for s, z in zip(sigma64.split(size), z64.split(size))])

    def voltages_from_fields(self, fields: torch.Tensor) -> torch.Tensor:
        """(B, n_inj * n_meas) injection-major: V = (R injections)^T measurements, R = the fields' electrode
        potentials (B, L - 1, L - 1)."""
        return ((fields[:, self.n_nodes:-1] @ self.injections).mT @ self.measurements).flatten(1)

    def vjp_from_fields(self, fields: torch.Tensor, v64: torch.Tensor) -> torch.Tensor:
        """J^T v (B, E) = sum_(j,l) Q_jl dR_jl/dsigma_e, Q = injections v measurements^T, v as (B, n_inj, n_meas)."""
        weights = self.injections @ v64.reshape(-1, self.n_inj, self.n_meas_per) @ self.measurements.T
        return fem.transfer_vjp(fem.field_gradients(fields, self.gradient_ops, self.elements), weights)

    def voltages(self, sigma: torch.Tensor, contact_impedance: torch.Tensor | None = None) -> torch.Tensor:
        """Measured voltages (B, n_inj * n_meas), injection-major, for sigma (B, E) and optionally per-sample
        contact impedances (B, L) or (L,) (default: the operator's); differentiable in both (autograd through
        the solve)."""
        return self.voltages_from_fields(self.fields(*self._inputs(sigma, contact_impedance)))

    def misfit_grad(self, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """J^T (F(sigma) - y) (B, E) from the fields of one factorisation per sample (differentiable in sigma and y
        while autograd records)."""
        self.check_input(y, "y", self.out_shape)
        sigma64, _ = self._inputs(sigma, None)
        size = self.cholesky.chunk_size(sigma64.device)
        parts = []
        for part, target in zip(sigma64.split(size), y.to(_DTYPE).split(size)):
            fields = self.fields(part)
            parts.append(self.vjp_from_fields(fields, self.voltages_from_fields(fields) - target))
        return torch.cat(parts).to(sigma.dtype)

    def _forward(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma64, _ = self._inputs(sigma, None)
        if torch.is_grad_enabled() and sigma64.requires_grad:  # backward: the adjoint from the saved fields
            size = self.cholesky.chunk_size(sigma64.device)
            return torch.cat([_AdjointVoltages.apply(part, self) for part in sigma64.split(size)]).to(sigma.dtype)
        return self.voltages_from_fields(self.fields(sigma64)).to(sigma.dtype)

    def _jacobian(self, sigma: torch.Tensor) -> torch.Tensor:
        per_sample = 8 * self.n_out * self.in_shape[0]
        size = max(1, _JACOBIAN_CHUNK_BYTES // per_sample)
        return torch.cat([self._jacobian_chunk(part) for part in sigma.split(size)]).to(sigma.dtype)

    def _jacobian_chunk(self, sigma: torch.Tensor) -> torch.Tensor:
        """dV_(i,m)/dsigma_e = -(D_e u_i) . (D_e w_m) with u_i = W injections_i, w_m = W measurements_m."""
        sigma64, _ = self._inputs(sigma, None)
        with torch.no_grad():
            grads = fem.field_gradients(self.fields(sigma64), self.gradient_ops, self.elements)  # (B, E, 2, L - 1)
            jac = -torch.einsum("bedi,bedm->bime", grads @ self.injections, grads @ self.measurements)
        return jac.reshape(sigma.shape[0], self.n_out, -1)


def _check_geometry(nodes: np.ndarray, elements: np.ndarray, faces) -> None:
    if nodes.ndim != 2 or nodes.shape[1] != 2:
        raise ValueError(f"CEM: nodes must be (N, 2), got shape {nodes.shape}")
    if elements.ndim != 2 or elements.shape[1] != 3:
        raise ValueError(f"CEM: elements must be (E, 3) node indices, got shape {elements.shape}")
    check_triangles(nodes, elements)
    if len(faces) < 2:
        raise ValueError(f"CEM: at least 2 electrodes are needed, got {len(faces)}")
    for l, pairs in enumerate(faces):
        pairs = np.asarray(pairs).reshape(-1, 2)
        if pairs.size == 0 or pairs.min() < 0 or pairs.max() >= nodes.shape[0]:
            raise ValueError(f"CEM: electrode {l} needs at least one boundary segment of node indices")
