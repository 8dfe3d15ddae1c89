"""Batched P1 finite elements for -div(sigma grad phi) = 0 on the disk, point electrodes.

Physics as in pyEIT 1.2.4 (``pyeit.eit.fem``): piecewise-constant conductivity sigma (S, per
element), stiffness K(sigma) = sum_e sigma_e K_e, current +-1 A injected at electrode nodes
(Neumann data), Dirichlet grounding by replacing the reference node's row and column of K
with the identity row (K[ref, :] = K[:, ref] = 0, K[ref, ref] = 1). Potentials in V (units:
1 A, 1 S, unit disk radius). Every pyEIT source sits on an electrode node, so the n_act
"unit-current fields" U = K^{-1} E (E: unit vectors at the active electrode nodes) give
every excitation (U[:, a] - U[:, b]) and every adjoint field alike.

Dense batched Cholesky costs N^3 / 3 flops and 8 N^2 bytes per sample: ~1 ms at h0=0.1
(N = 376), ~8 ms at h0=0.07 (N = 758) on one CPU core, growing as h0^-6. Beyond ~1,500-2,000
nodes (h0 < ~0.05) use a sparse factorisation (CHOLMOD via scikit-sparse, cuDSS on GPU) or
preconditioned CG with the same n_act right-hand sides.
"""

from __future__ import annotations

import numpy as np
import torch

from deepunroll.operators.eit.mesh import scaled_edges


def assembly_indices(nodes: np.ndarray, elements: np.ndarray, ref_node: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scatter plan for K(sigma) = sum_e sigma_e K_e with pyEIT's grounding.

    Returns (entry_slot, entry_owner, entry_value, slot_flat): local entry k adds
    [sigma, 1][entry_owner[k]] * entry_value[k] to slot entry_slot[k]; slot s is the flat
    position slot_flat[s] in the (N * N) matrix. Entries touching the reference node are
    dropped; K[ref, ref] = 1 is one extra entry owned by the constant column E.
    """
    n_nodes, n_elems = nodes.shape[0], elements.shape[0]
    edges = scaled_edges(nodes, elements)
    local = edges @ edges.transpose(0, 2, 1)  # (E, 3, 3) element stiffness at sigma = 1
    row = np.repeat(elements[:, :, None], 3, axis=2)
    col = np.repeat(elements[:, None, :], 3, axis=1)
    keep = ((row != ref_node) & (col != ref_node)).reshape(-1)
    flat = (row * n_nodes + col).reshape(-1)[keep]
    owner = np.repeat(np.arange(n_elems), 9)[keep]
    value = local.reshape(-1)[keep]
    flat = np.append(flat, ref_node * n_nodes + ref_node)
    owner = np.append(owner, n_elems)
    value = np.append(value, 1.0)
    slot_flat, slot = np.unique(flat, return_inverse=True)
    return slot.astype(np.int64), owner.astype(np.int64), value, slot_flat.astype(np.int64)


def assemble(sigma: torch.Tensor, plan: tuple[torch.Tensor, ...], n_nodes: int) -> torch.Tensor:
    """K(sigma) (B, N, N) from sigma (B, E): a scatter-add into the distinct nonzeros, then
    one indexed copy into the dense matrix (differentiable)."""
    entry_slot, entry_owner, entry_value, slot_flat = plan
    batch = sigma.shape[0]
    padded = torch.cat([sigma, sigma.new_ones(batch, 1)], dim=1)
    nonzeros = sigma.new_zeros(batch, slot_flat.shape[0]).index_add(1, entry_slot, padded[:, entry_owner] * entry_value)
    stiffness = sigma.new_zeros(batch, n_nodes * n_nodes)
    stiffness[:, slot_flat] = nonzeros
    return stiffness.reshape(batch, n_nodes, n_nodes)


def _unit_sources(stiffness: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
    """E (B, N, n_act): unit current (1 A) at each active electrode node."""
    sources = torch.zeros(stiffness.shape[-1], el_nodes.shape[0], dtype=stiffness.dtype, device=stiffness.device)
    sources[el_nodes, torch.arange(el_nodes.shape[0], device=el_nodes.device)] = 1.0
    return sources.expand(stiffness.shape[0], -1, -1)


def _factor(stiffness: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky; returns (L, ok) where ok (B,) is False where K is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(stiffness)
    return chol, info == 0


def unit_current_fields(stiffness: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
    """U = K^{-1} E: nodal potentials (B, N, n_act) for +1 A into each active electrode node.

    Dense batched Cholesky K = L L^T, then two triangular solves with n_act right-hand sides
    (faster on CPU than ``cholesky_solve``). Samples whose K is not positive definite
    (non-positive conductivity, as a Gauss-Newton iterate may be) fall back to LU.
    """
    sources = _unit_sources(stiffness, el_nodes)
    chol, ok = _factor(stiffness)
    half = torch.linalg.solve_triangular(chol, sources, upper=False)
    fields = torch.linalg.solve_triangular(chol.mT, half, upper=True)
    if not bool(ok.all()):
        fields = torch.where(ok[:, None, None], fields, torch.linalg.solve(stiffness, sources))
    return fields


def electrode_transfer(stiffness: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
    """R = E^T K^{-1} E (B, n_act, n_act): electrode potentials for unit currents (V / A).

    Forward-only fast path: with K = L L^T, R = Y^T Y for Y = L^{-1} E (one triangular solve).
    """
    sources = _unit_sources(stiffness, el_nodes)
    chol, ok = _factor(stiffness)
    half = torch.linalg.solve_triangular(chol, sources, upper=False)
    transfer = half.transpose(1, 2) @ half
    if not bool(ok.all()):
        fallback = torch.linalg.solve(stiffness, sources)[:, el_nodes, :]
        transfer = torch.where(ok[:, None, None], transfer, fallback)
    return transfer


def field_gradients(fields: torch.Tensor, edges: torch.Tensor, elements: torch.Tensor, ref_node: int) -> torch.Tensor:
    """D (B, E, 2, n_act) = S_e^T U[elements[e]]: scaled gradients of the unit-current fields.

    The reference node's potential is pinned, so its row of U is zeroed first (dK/dsigma_e
    has the reference row and column removed). Then u^T (dK/dsigma_e) w = (D_e u) . (D_e w).
    """
    mask = torch.ones(fields.shape[1], 1, dtype=fields.dtype, device=fields.device)
    mask[ref_node] = 0.0
    local = (fields * mask)[:, elements]  # (B, E, 3, n_act)
    return sum(edges[None, :, i, :, None] * local[:, :, i, None, :] for i in range(3))


def transfer_vjp(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_{j,l} Q[j, l] dR[j, l]/dsigma_e = -sum_{j,l} Q[j, l] (D_e[:, j] . D_e[:, l]): (B, E).

    grads D (B, E, 2, n_act); weights Q (B, n_act, n_act). Derivative of R = E^T K^{-1} E:
    dR/dsigma_e = -U^T (dK/dsigma_e) U.
    """
    batch, _, _, n_act = grads.shape
    weighted = (grads.reshape(batch, -1, n_act) @ weights).reshape(grads.shape)
    return -(weighted * grads).sum(dim=(2, 3))


def measurement_jacobian(grads: torch.Tensor, sources: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """dV_r/dsigma_e = -(D_e x_r) . (D_e m_r): (B, n_meas, E).

    grads D (B, E, 2, n_act); sources x (n_act, n_meas) = e_a - e_b (the injected currents);
    probes m (n_act, n_meas) = e_n - e_m (the voltage read-out), per measurement row r.
    """
    batch, n_elems, dim, n_act = grads.shape
    flat = grads.reshape(batch * n_elems * dim, n_act)
    product = (flat @ sources) * (flat @ probes)  # (B*E*2, n_meas)
    return -product.reshape(batch, n_elems, dim, -1).sum(dim=2).transpose(1, 2)
