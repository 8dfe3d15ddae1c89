"""The FEM solve K(sigma) U = E behind every EIT quantity, dense or sparse (``operator.solver``).

Both paths take the stiffness matrix as its stored entries, values (B, nnz) in the order of the assembly
plan (``fem.assembly_indices``), and return the unit-current fields U = K^{-1} E (B, N, n_act) or the
electrode transfer matrix R = E^T K^{-1} E (B, n_act, n_act); both are exact to rounding and differentiable
(the dense path through torch's linear algebra, the sparse path by the adjoint of the solve).

- ``dense``: one batched dense Cholesky per sample, N^3 / 3 flops and 8 N^2 bytes.
- ``sparse``: the batched multifrontal Cholesky of :mod:`deepunroll.optim.sparse_cholesky` on a nested
  dissection of the mesh (O(N^1.5) flops, O(N log N) memory), the symbolic part built once per mesh and
  device.
- ``auto``: sparse from ``AUTO_SPARSE_NODES[device type]`` nodes on, dense below (docs/eit.md: where each wins).

Samples whose K is not positive definite (a non-positive conductivity, as a Gauss-Newton iterate may have)
are solved by LU on the dense matrix, or by SciPy's SuperLU beyond ``DENSE_FALLBACK_NODES`` nodes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from deepunroll.optim.ordering import nested_dissection
from deepunroll.optim.sparse_cholesky import SparseCholesky

SOLVERS = ("auto", "dense", "sparse")
AUTO_SPARSE_NODES = {"cpu": 200, "cuda": 1500}  # CPU: measured (docs/eit.md); CUDA: by memory, not measured
DENSE_FALLBACK_NODES = 3000
LEAF_SIZE = 16  # nested-dissection leaves (measured fastest of 8-64 at h0 = 0.1 and 0.025)


def unit_sources(n_nodes: int, el_nodes: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """E (B, N, n_act): unit current (1 A) at each active electrode node."""
    sources = torch.zeros(n_nodes, el_nodes.shape[0], dtype=dtype, device=el_nodes.device)
    sources[el_nodes, torch.arange(el_nodes.shape[0], device=el_nodes.device)] = 1.0
    return sources.expand(batch, -1, -1)


class DenseSolver:
    """Dense batched Cholesky of K (B, N, N) built from its stored entries at flat positions ``slot_flat``."""

    name = "dense"

    def __init__(self, slot_flat: torch.Tensor, n_nodes: int) -> None:
        self.slot_flat, self.n_nodes = slot_flat, int(n_nodes)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """K (B, N, N) from values (B, nnz) (differentiable)."""
        stiffness = values.new_zeros(values.shape[0], self.n_nodes * self.n_nodes)
        stiffness[:, self.slot_flat] = values
        return stiffness.reshape(-1, self.n_nodes, self.n_nodes)

    def fields(self, values: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
        """U = K^{-1} E (B, N, n_act): Cholesky, then two triangular solves (faster on CPU than
        ``cholesky_solve``); LU where K is not positive definite."""
        stiffness = self.matrix(values)
        sources = unit_sources(self.n_nodes, el_nodes, values.shape[0], values.dtype)
        chol, info = torch.linalg.cholesky_ex(stiffness)
        half = torch.linalg.solve_triangular(chol, sources, upper=False)
        fields = torch.linalg.solve_triangular(chol.mT, half, upper=True)
        ok = info == 0
        if not bool(ok.all()):
            fields = torch.where(ok[:, None, None], fields, torch.linalg.solve(stiffness, sources))
        return fields

    def transfer(self, values: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
        """R = E^T K^{-1} E (B, n_act, n_act) = Y^T Y for Y = L^{-1} E (one triangular solve; forward only)."""
        stiffness = self.matrix(values)
        sources = unit_sources(self.n_nodes, el_nodes, values.shape[0], values.dtype)
        chol, info = torch.linalg.cholesky_ex(stiffness)
        half = torch.linalg.solve_triangular(chol, sources, upper=False)
        transfer = half.mT @ half
        ok = info == 0
        if not bool(ok.all()):
            transfer = torch.where(ok[:, None, None], transfer, torch.linalg.solve(stiffness, sources)[:, el_nodes, :])
        return transfer

    def chunk_size(self, device: torch.device) -> int:
        """Samples per call: K chunks of ~4 MB (>= 2 samples) on CPU, cache-sized, which measured up to 1.8x
        faster per sample than one batch of 32; ~256 MB on accelerators (bounds memory, keeps the batch parallel)."""
        per_sample = 8 * self.n_nodes**2
        if device.type == "cpu":
            return max(2, (4 << 20) // per_sample)
        return max(1, (256 << 20) // per_sample)


class SparseSolver:
    """Batched multifrontal Cholesky of K on a nested dissection of the mesh nodes (``coords`` (N, 2))."""

    name = "sparse"

    def __init__(self, slot_flat: torch.Tensor, n_nodes: int, coords: np.ndarray, device: torch.device) -> None:
        flat = slot_flat.cpu().numpy()
        rows, cols = flat // n_nodes, flat % n_nodes
        pattern = sp.csr_matrix((np.ones(flat.size), (rows, cols)), shape=(n_nodes, n_nodes))
        tree = nested_dissection(pattern, coords, leaf_size=LEAF_SIZE)
        self.cholesky = SparseCholesky(rows, cols, n_nodes, tree, device=device)
        self.dense = DenseSolver(slot_flat, n_nodes)
        self.n_nodes, self.rows, self.cols = int(n_nodes), rows, cols

    def fields(self, values: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
        """U = K^{-1} E (B, N, n_act), with the adjoint backward when ``values`` needs a graph."""
        sources = unit_sources(self.n_nodes, el_nodes, values.shape[0], values.dtype)
        factor = self.cholesky.factor(values)
        if torch.is_grad_enabled() and values.requires_grad:
            fields = self.cholesky.solve(values, sources, factor)
        else:
            fields = factor.solve(sources)
        return self._fallback(fields, factor.ok, values, sources, lambda u: u)

    def transfer(self, values: torch.Tensor, el_nodes: torch.Tensor) -> torch.Tensor:
        """R = E^T K^{-1} E = Y^T Y for Y = L^{-1} E (forward substitution only; forward only)."""
        sources = unit_sources(self.n_nodes, el_nodes, values.shape[0], values.dtype)
        factor = self.cholesky.factor(values)
        half = factor.half_solve(sources)
        return self._fallback(half.mT @ half, factor.ok, values, sources, lambda u: u[:, el_nodes, :])

    def _fallback(self, result, ok, values, sources, pick):
        """Replace the rows of samples whose K is not positive definite by an LU solve of those samples."""
        if bool(ok.all()):
            return result
        bad = torch.nonzero(~ok).flatten()
        if self.n_nodes <= DENSE_FALLBACK_NODES:
            solved = torch.linalg.solve(self.dense.matrix(values[bad]), sources[bad])
        else:
            if torch.is_grad_enabled() and values.requires_grad:
                raise ValueError(f"EIT: K(sigma) is not positive definite for {bad.numel()} sample(s) of a "
                                 f"{self.n_nodes}-node mesh and a gradient is needed; keep sigma > 0 "
                                 "(operator.min_conductivity clamps it)")
            solved = torch.stack([self._superlu(v, s) for v, s in zip(values[bad], sources[bad])])
        return result.index_copy(0, bad, pick(solved).to(result.dtype))

    def _superlu(self, values: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        matrix = sp.csc_matrix((values.detach().cpu().numpy(), (self.rows, self.cols)), shape=(self.n_nodes,) * 2)
        solved = spla.splu(matrix).solve(sources.cpu().numpy())
        return torch.as_tensor(solved, dtype=values.dtype, device=values.device)

    def chunk_size(self, device: torch.device) -> int:
        """Samples per call (:meth:`SparseCholesky.chunk_size`; on CPU, per sample, chunks of 8-16 measured fastest
        at h0 = 0.05, where 32 was 1.7x slower, and 32 at h0 = 0.1)."""
        return self.cholesky.chunk_size(device)


def choose(kind: str, n_nodes: int, device: torch.device) -> str:
    """The path ``operator.solver=kind`` takes on this device: ``dense`` or ``sparse``."""
    if kind != "auto":
        return kind
    return "sparse" if n_nodes >= AUTO_SPARSE_NODES.get(device.type, AUTO_SPARSE_NODES["cuda"]) else "dense"
