"""EIT forward operator: element conductivities -> boundary voltages, pyEIT 1.2.4 physics."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pyeit.eit.protocol import PyEITProtocol
from pyeit.mesh import PyEITMesh

from deepunroll.operators.base import ForwardOperator
from deepunroll.operators.eit import fem, solver
from deepunroll.operators.eit.mesh import MeshGeometry, build_disk_mesh, scaled_edges
from deepunroll.operators.eit.protocol import MeasurementPlan, build_protocol, check_electrodes, plain
from deepunroll.validation import FRACTION, NON_NEGATIVE_INT, check_all, is_int, is_number, one_of

_PHYSICS_DTYPE = torch.float64


class EIT(ForwardOperator):
    """V = F(sigma): sigma (B, n_elems) element conductivities (S, > 0) -> V (B, n_meas) volts.

    Same model as pyEIT's ``EITForward.solve_eit``: P1 FEM on a disk mesh, point electrodes,
    +-1 A adjacent injection, differential voltages, grounded reference node; rows ordered
    excitation-major as pyEIT's. ``jacobian`` is the true dV/dsigma (pyEIT's ``compute_jac``
    returns its negative). One Cholesky factorisation of K(sigma) per sample with n_act
    right-hand sides serves voltages, ``vjp`` (adjoint: no extra solve), ``jacobian`` and
    ``misfit_grad``. Physics runs in float64; outputs take the input's dtype and device.

    Limited measurements: ``electrodes`` keeps only those mesh electrodes (the protocol is
    rebuilt over them, in increasing index order); ``meas_fraction`` keeps a seeded
    (``meas_seed``) subset of the protocol rows. The mesh is unchanged by either.

    ``solver``: how K(sigma) is factored, ``dense`` | ``sparse`` | ``auto`` (by mesh size and device;
    :mod:`deepunroll.operators.eit.solver`). It changes speed and memory, not the model: it is not part of
    ``metadata()``, so datasets do not depend on it.
    """

    RULES = {"n_electrodes": (lambda v: is_int(v) and v >= 3, "an integer >= 3"),
             "h0": (lambda v: is_number(v) and 0 < v <= 0.5, "a number in (0, 0.5] (mesh size in disk radii)"),
             "meas_fraction": FRACTION, "meas_seed": NON_NEGATIVE_INT,
             "min_conductivity": (lambda v: v is None or (is_number(v) and v > 0), "a positive floor or null"),
             "solver": one_of(*solver.SOLVERS)}

    def __init__(
        self,
        n_electrodes: int = 16,
        h0: float = 0.1,
        dist_exc: int | list[int] = 1,
        step_meas: int = 1,
        parser: str | list[str] = "std",
        electrodes: Sequence[int] | None = None,
        meas_fraction: float = 1.0,
        meas_seed: int = 0,
        min_conductivity: float | None = None,
        solver: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        check_all("operator", self.RULES, {"n_electrodes": n_electrodes, "h0": h0, "meas_fraction": meas_fraction,
                                           "meas_seed": meas_seed, "min_conductivity": min_conductivity,
                                           "solver": solver})
        kept = check_electrodes(electrodes, int(n_electrodes))
        mesh = build_disk_mesh(int(n_electrodes), float(h0))
        protocol = build_protocol(len(kept) if kept else int(n_electrodes), dist_exc, step_meas, parser)
        plan = MeasurementPlan.from_protocol(protocol, kept, meas_fraction, meas_seed)
        config = {
            "mesh_source": "pyeit.mesh.create",
            "n_electrodes": int(n_electrodes),
            "h0": float(h0),
            "dist_exc": [int(d) for d in plain(dist_exc)] if isinstance(plain(dist_exc), list) else int(dist_exc),
            "step_meas": int(step_meas),
            "parser": [str(p) for p in plain(parser)] if isinstance(plain(parser), list) else str(parser),
            "electrodes": kept if kept is not None else list(range(int(n_electrodes))),
            "meas_fraction": float(meas_fraction),
            "meas_seed": int(meas_seed),
        }
        self._build(MeshGeometry.from_pyeit(mesh), plan, config, device, dtype)
        self.min_conductivity = None if min_conductivity is None else float(min_conductivity)
        self.solver = solver

    @classmethod
    def from_pyeit(
        cls,
        mesh: PyEITMesh,
        protocol: PyEITProtocol,
        meas_fraction: float = 1.0,
        meas_seed: int = 0,
        solver: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> "EIT":
        """Operator on pyEIT's own mesh and protocol objects (protocol indices are mesh electrodes).

        Generator fields that do not apply are recorded in ``metadata()`` as h0 = -1.0,
        dist_exc = step_meas = -1, parser = "custom"; the arrays define the model.
        """
        if not isinstance(protocol, PyEITProtocol):
            raise TypeError(f"protocol must be a pyeit.eit.protocol.PyEITProtocol, got {type(protocol).__name__}")
        geometry = MeshGeometry.from_pyeit(mesh)
        if protocol.n_el > geometry.n_el:
            raise ValueError(f"protocol uses {protocol.n_el} electrodes but the mesh has {geometry.n_el} (mesh.el_pos)")
        self = cls.__new__(cls)
        ForwardOperator.__init__(self)
        plan = MeasurementPlan.from_protocol(protocol, None, meas_fraction, meas_seed)
        config = {
            "mesh_source": "custom",
            "n_electrodes": geometry.n_el,
            "h0": -1.0,
            "dist_exc": -1,
            "step_meas": -1,
            "parser": "custom",
            "electrodes": list(range(geometry.n_el)),
            "meas_fraction": float(meas_fraction),
            "meas_seed": int(meas_seed),
        }
        self._build(geometry, plan, config, device, dtype)
        check_all("operator", cls.RULES, {"solver": solver})
        self.solver = solver
        return self

    def _build(self, geometry: MeshGeometry, plan: MeasurementPlan, config: dict, device, dtype) -> None:
        if dtype != torch.float64:
            raise ValueError(f"EIT: dtype is the physics dtype and must be torch.float64, got {dtype}")
        self.geometry, self.plan, self.config = geometry, plan, config
        self.min_conductivity: float | None = None
        self.solver = "auto"
        self._solvers: dict[tuple[str, torch.device], solver.DenseSolver | solver.SparseSolver] = {}
        self.in_shape, self.out_shape = (geometry.n_elems,), (plan.n_meas,)
        self.ref_node = geometry.ref_node
        entry_slot, entry_owner, entry_value, slot_flat = fem.assembly_indices(
            geometry.nodes, geometry.elements, geometry.ref_node
        )
        arrays = {
            "nodes": geometry.nodes,
            "elements": geometry.elements,
            "el_pos": geometry.el_pos,
            "centroids": geometry.centroids(),
            "gradient_ops": fem.gradient_operators(scaled_edges(geometry.nodes, geometry.elements), geometry.elements,
                                                   geometry.ref_node),
            "asm_entry_slot": entry_slot,
            "asm_entry_owner": entry_owner,
            "asm_entry_value": entry_value,
            "asm_slot_flat": slot_flat,
            "el_nodes": geometry.el_pos[plan.active],
            "transfer": plan.transfer_matrix(),
        }
        for name, array in arrays.items():
            tensor = torch.as_tensor(array)
            tensor = tensor.to(_PHYSICS_DTYPE) if tensor.is_floating_point() else tensor.long()
            self.register_buffer(name, tensor.to(device), persistent=False)

    # ------------------------------------------------------------ properties
    @property
    def n_elems(self) -> int:
        return self.geometry.n_elems

    @property
    def n_nodes(self) -> int:
        return self.geometry.n_nodes

    @property
    def n_meas(self) -> int:
        return self.plan.n_meas

    @property
    def electrodes(self) -> list[int]:
        """Mesh electrodes in use (all of them unless ``electrodes`` was given)."""
        return list(self.config["electrodes"])

    @property
    def meas_fraction(self) -> float:
        return self.config["meas_fraction"]

    @property
    def ex_mat(self) -> np.ndarray:
        return self.plan.ex_mat

    @property
    def meas_mat(self) -> np.ndarray:
        return self.plan.meas_mat

    def metadata(self) -> dict:
        meta = super().metadata()
        meta.update(self.config)
        meta.update(
            n_elems=self.n_elems,
            n_nodes=self.n_nodes,
            n_meas=self.n_meas,
            ref_node=int(self.ref_node),
            nodes=self.geometry.nodes.copy(),
            elements=self.geometry.elements.copy(),
            el_pos=self.geometry.el_pos.copy(),
            ex_mat=self.plan.ex_mat.copy(),
            meas_mat=self.plan.meas_mat.copy(),
            meas_rows=self.plan.rows.copy(),
            abmn=self.plan.abmn.copy(),
        )
        return meta

    def extra_repr(self) -> str:
        c = self.config
        return (f"n_electrodes={c['n_electrodes']}, h0={c['h0']}, n_nodes={self.n_nodes}, n_elems={self.n_elems}, "
                f"n_meas={self.n_meas}, electrodes={len(self.electrodes)}, meas_fraction={c['meas_fraction']}")

    # ------------------------------------------------------------- physics
    def physics_input(self, sigma: torch.Tensor, check_positive: bool = True) -> torch.Tensor:
        """sigma cast to float64; raises ValueError if any entry is <= 0 or not finite.

        With ``min_conductivity`` set, finite entries below it are clamped to it instead (what
        unrolled networks use: their iterates may leave the positive cone while training; the
        clamp is documented and only NaN/Inf still raise).
        """
        sigma64 = sigma.to(_PHYSICS_DTYPE)
        if check_positive and self.min_conductivity is not None and bool(torch.isfinite(sigma64).all()):
            return sigma64.clamp_min(self.min_conductivity)
        if check_positive:
            bad = ~(sigma64 > 0) | ~torch.isfinite(sigma64)
            n_bad = int(bad.sum())
            if n_bad:
                finite = sigma64.detach()[torch.isfinite(sigma64.detach())]
                low = float(finite.min()) if finite.numel() else float("nan")
                raise ValueError(
                    f"EIT: conductivity sigma must be positive and finite; {n_bad} of {sigma.numel()} entries "
                    f"are not (min finite value {low:.6g})"
                )
        return sigma64

    def stiffness_values(self, sigma64: torch.Tensor) -> torch.Tensor:
        """The distinct nonzeros of K(sigma) (B, nnz), in the order of ``asm_slot_flat`` (differentiable)."""
        plan = (self.asm_entry_slot, self.asm_entry_owner, self.asm_entry_value, self.asm_slot_flat)
        return fem.assemble_values(sigma64, plan)

    def stiffness(self, sigma64: torch.Tensor) -> torch.Tensor:
        """K(sigma) (B, N, N) with pyEIT's reference-node grounding (dense)."""
        return solver.DenseSolver(self.asm_slot_flat, self.n_nodes).matrix(self.stiffness_values(sigma64))

    def fem_solver(self, device: torch.device | None = None) -> solver.DenseSolver | solver.SparseSolver:
        """The solve path ``solver`` takes on ``device`` (default: the operator's); the sparse symbolic
        factorisation is built on first use and kept per device."""
        device = self.nodes.device if device is None else torch.device(device)
        kind = solver.choose(self.solver, self.n_nodes, device)
        key = (kind, device)
        if key not in self._solvers:
            slot_flat = self.asm_slot_flat.to(device)
            self._solvers[key] = (solver.SparseSolver(slot_flat, self.n_nodes, self.geometry.nodes, device)
                                  if kind == "sparse" else solver.DenseSolver(slot_flat, self.n_nodes))
        return self._solvers[key]

    def fields(self, sigma64: torch.Tensor) -> torch.Tensor:
        """Unit-current fields U (B, N, n_act), volts per ampere."""
        return self.fem_solver(sigma64.device).fields(self.stiffness_values(sigma64), self.el_nodes)

    def voltages_from_fields(self, fields: torch.Tensor) -> torch.Tensor:
        transfer = fields[:, self.el_nodes, :]
        return transfer.flatten(1) @ self.transfer.T

    def vjp_from_fields(self, fields: torch.Tensor, v64: torch.Tensor) -> torch.Tensor:
        """J^T v (B, E) from the fields: the adjoint field of v is U (C^T v) restricted to electrodes."""
        n_act = self.el_nodes.shape[0]
        weights = (v64 @ self.transfer).reshape(-1, n_act, n_act)
        grads = fem.field_gradients(fields, self.gradient_ops, self.elements)
        return fem.transfer_vjp(grads, weights)

    def jacobian_from_fields(self, fields: torch.Tensor) -> torch.Tensor:
        """dV/dsigma (B, n_meas, E) from the fields."""
        grads = fem.field_gradients(fields, self.gradient_ops, self.elements)
        return fem.measurement_jacobian(grads, self.transfer)

    def element_mesh(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nodes, self.elements

    def reference_point(self) -> torch.Tensor:
        """Unit conductivity everywhere (1, n_elems): the phantoms' and Gauss-Newton's background."""
        return torch.ones((1, self.n_elems), dtype=_PHYSICS_DTYPE, device=self.nodes.device)

    def linearize(self, sigma: torch.Tensor, check_positive: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(F(sigma) (B, n_meas), dF/dsigma (B, n_meas, E)) in float64, from one factorisation per sample."""
        sigma64 = self.physics_input(sigma, check_positive)
        parts = []
        for chunk in sigma64.split(self.chunk_size(sigma64.device)):
            fields = self.fields(chunk)
            parts.append((self.voltages_from_fields(fields), self.jacobian_from_fields(fields)))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def chunk_size(self, device: torch.device) -> int:
        """Samples per solve call: the solve path's own (cache-sized on CPU, memory-bounded on accelerators)."""
        return self.fem_solver(device).chunk_size(device)

    def _chunked(self, fn, *tensors: torch.Tensor) -> torch.Tensor:
        size = self.chunk_size(tensors[0].device)
        if tensors[0].shape[0] <= size:
            return fn(*tensors)
        return torch.cat([fn(*parts) for parts in zip(*(t.split(size) for t in tensors))])

    # ---------------------------------------------------- ForwardOperator API
    def _forward(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma64 = self.physics_input(sigma)
        if torch.is_grad_enabled() and sigma64.requires_grad:
            voltages = _AdjointVoltages.apply(sigma64, self)
        else:  # no graph needed: forward-only path (one triangular solve)
            voltages = self._chunked(self._voltages_only, sigma64)
        return voltages.to(sigma.dtype)

    def _voltages_only(self, sigma64: torch.Tensor) -> torch.Tensor:
        transfer = self.fem_solver(sigma64.device).transfer(self.stiffness_values(sigma64), self.el_nodes)
        return transfer.flatten(1) @ self.transfer.T

    def _vjp(self, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def vjp(sigma64, v64):
            return self.vjp_from_fields(self.fields(sigma64), v64)

        return self._chunked(vjp, self.physics_input(sigma), v.to(_PHYSICS_DTYPE)).to(sigma.dtype)

    def _jacobian(self, sigma: torch.Tensor) -> torch.Tensor:
        def jacobian(sigma64):
            return self.jacobian_from_fields(self.fields(sigma64))

        return self._chunked(jacobian, self.physics_input(sigma)).to(sigma.dtype)

    def misfit_grad(self, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """J(sigma)^T (F(sigma) - y) (B, E): gradient of 1/2 ||F(sigma) - y||^2, one factorisation."""
        self.check_input(sigma, "sigma")
        self.check_input(y, "y", self.out_shape)

        def misfit_grad(sigma64, y64):
            fields = self.fields(sigma64)
            return self.vjp_from_fields(fields, self.voltages_from_fields(fields) - y64)

        return self._chunked(misfit_grad, self.physics_input(sigma), y.to(_PHYSICS_DTYPE)).to(sigma.dtype)


class _AdjointVoltages(torch.autograd.Function):
    """V(sigma) whose backward is the adjoint vjp; differentiable again (create_graph) by recomputing U."""

    @staticmethod
    def forward(ctx, sigma64: torch.Tensor, operator: EIT) -> torch.Tensor:
        fields = operator.fields(sigma64)
        ctx.operator = operator
        ctx.save_for_backward(sigma64, fields)
        return operator.voltages_from_fields(fields)

    @staticmethod
    def backward(ctx, grad_voltages: torch.Tensor):
        sigma64, fields = ctx.saved_tensors
        operator = ctx.operator
        if torch.is_grad_enabled():  # create_graph=True: rebuild U as a differentiable function of sigma
            fields = operator.fields(sigma64)
        return operator.vjp_from_fields(fields, grad_voltages), None
