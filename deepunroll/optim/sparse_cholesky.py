"""Batched sparse Cholesky for many symmetric positive definite matrices that share one sparsity pattern.

The multifrontal method (Duff and Reid 1983; Liu, SIAM Review 1992) on a nested-dissection separator tree
(:mod:`deepunroll.optim.ordering`): each supernode s owns a dense *front* over its pivots P_s and the later
variables they couple to, B_s (its structure). Factoring a front is three dense kernels,

    L11 = chol(F11),   L21 = F21 L11^{-T},   U_s = F22 - L21 L21^T,

and the update matrix U_s is added into the parent's front ("extend-add"). Fronts of one tree level are
independent: they are padded to one size and factored by one batched kernel call together with every
sample of the batch, so a factorisation is a few dozen tensor operations whatever the mesh size and batch,
on CPU or GPU, and no Python loop runs over samples or fronts. The symbolic work (structures, padding,
scatter indices) is done once per pattern by :class:`SparseCholesky`.

Values are given per stored entry of the pattern (``rows[k], cols[k]``, both triangles). Factorisation and
substitution run without autograd; :meth:`SparseCholesky.solve` attaches exact derivatives by the adjoint
method (x = K^{-1} b: grad b = K^{-1} grad x, grad K_ij = -(grad b)_i x_j), differentiable again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from deepunroll.optim.ordering import SeparatorTree


@dataclass
class _Level:
    """Index plans of the fronts of one tree level, padded to p pivots and b structure rows (torch, long).

    A front is kept as three blocks, F11 (fronts, p, p), F21 (fronts, b, p) and F22 (fronts, b, b), of which only
    the lower triangles are written and read. ``entries[block]`` = (src, dst): stored entries (positions in the
    values vector) and their flat positions in that block; ``extend[block]`` = [(child level, src, dst)]: entries
    of the children's update matrices and their flat positions in that block.
    """

    n_fronts: int
    p: int
    b: int
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    extend: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]
    pad_diag: torch.Tensor         # flat positions in F11 of padded pivots' diagonals (set to 1)
    pivot_index: torch.Tensor      # (n_fronts, p) variables (padding: n, a scratch row)
    structure_index: torch.Tensor  # (n_fronts, b) variables (padding: n)

    def to(self, device: torch.device) -> "_Level":
        return _Level(
            n_fronts=self.n_fronts, p=self.p, b=self.b,
            entries={k: (s.to(device), d.to(device)) for k, (s, d) in self.entries.items()},
            extend={k: [(lv, s.to(device), d.to(device)) for lv, s, d in v] for k, v in self.extend.items()},
            pad_diag=self.pad_diag.to(device), pivot_index=self.pivot_index.to(device),
            structure_index=self.structure_index.to(device))


class SparseCholesky:
    """The symbolic factorisation of one pattern: build once, then :meth:`factor` batches of values.

    rows, cols (nnz,): the stored entries of the n x n matrices (both triangles, diagonal included, no
    duplicates); tree: the elimination order (:func:`deepunroll.optim.ordering.nested_dissection`).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n: int, tree: SeparatorTree,
                 device: torch.device | str | None = None) -> None:
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if tree.n_vars != n or np.unique(tree.order).size != n:
            raise ValueError(f"SparseCholesky: the tree must order each of the {n} variables once")
        self.n, self.nnz = int(n), int(rows.size)
        self.rows, self.cols = torch.as_tensor(rows), torch.as_tensor(cols)
        self.levels = _plan(rows, cols, int(n), tree)
        self.device = torch.device("cpu")
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> "SparseCholesky":
        device = torch.device(device)
        if device != self.device:
            self.levels = [level.to(device) for level in self.levels]
            self.rows, self.cols, self.device = self.rows.to(device), self.cols.to(device), device
        return self

    @property
    def factor_entries(self) -> int:
        """Stored entries of one sample's factor (padded fronts' L11^{-1} and L21 L11^{-1}): 8x this in bytes."""
        return sum(lv.n_fronts * (lv.p * lv.p + lv.b * lv.p) for lv in self.levels)

    def chunk_size(self, device: torch.device) -> int:
        """Samples per factorisation call that keep the factor cache-sized: ~6 MB on CPU (>= 2 samples),
        ~256 MB on accelerators (bounds memory, keeps the batch parallel)."""
        per_sample = 8 * self.factor_entries
        if device.type == "cpu":
            return max(2, (6 << 20) // per_sample)
        return max(1, (256 << 20) // per_sample)

    def factor(self, values: torch.Tensor) -> "Factor":
        """Numeric factorisation of a batch: values (B, nnz) -> :class:`Factor` (no autograd)."""
        if values.dim() != 2 or values.shape[1] != self.nnz:
            raise ValueError(f"SparseCholesky.factor: values must be (B, {self.nnz}), got {tuple(values.shape)}")
        values = values.detach()
        batch = values.shape[0]
        ok = torch.ones(batch, dtype=torch.bool, device=values.device)
        pivots, couplings, updates = [], [], []
        with torch.no_grad():
            for level in self.levels:
                nf, p, b = level.n_fronts, level.p, level.b
                sizes = (nf * p * p, nf * b * p, nf * b * b)
                front = values.new_zeros(batch * sum(sizes))  # F11, F21, F22 one after the other: one allocation
                blocks = {name: part.view(batch, -1) for name, part in
                          zip(("11", "21", "22"), front.split([batch * size for size in sizes]))}
                for name, block in blocks.items():
                    if name in level.entries:
                        src, dst = level.entries[name]
                        block.index_copy_(1, dst, values.index_select(1, src))
                    for child_level, src, dst in level.extend.get(name, ()):
                        block.index_add_(1, dst, updates[child_level].reshape(batch, -1).index_select(1, src))
                blocks["11"][:, level.pad_diag] = 1.0
                l11, info = torch.linalg.cholesky_ex(blocks["11"].view(batch, nf, p, p))
                ok &= (info == 0).all(dim=1)
                eye = torch.eye(p, dtype=values.dtype, device=values.device).expand(batch, nf, p, p)
                l11_inv = torch.linalg.solve_triangular(l11, eye, upper=False)
                l21 = blocks["21"].view(batch, nf, b, p) @ l11_inv.mT  # F21 L11^{-T}
                flat = l21.reshape(batch * nf, b, p)
                updates.append(torch.baddbmm(blocks["22"].view(batch * nf, b, b), flat, flat.mT, alpha=-1.0))
                pivots.append(l11_inv)
                couplings.append(l21 @ l11_inv)
        return Factor(self, pivots, couplings, ok)

    def solve(self, values: torch.Tensor, rhs: torch.Tensor, factor: "Factor | None" = None) -> torch.Tensor:
        """x = K^{-1} rhs: values (B, nnz), rhs (B, n, k) -> (B, n, k), differentiable in values and rhs.

        ``factor``: a :class:`Factor` of these values (computed here if None).
        """
        factor = self.factor(values) if factor is None else factor
        return _Solve.apply(values, rhs, factor)


class Factor:
    """The factor of K = L L^T for a batch: per level the front operators L11^{-1} (B, fronts, p, p) and
    L21 L11^{-1} (B, fronts, b, p), so each substitution step is two batched products; ``ok`` (B,) is False
    where a sample's matrix is not positive definite (its solves are then meaningless)."""

    def __init__(self, symbolic: SparseCholesky, pivots: list, couplings: list, ok: torch.Tensor) -> None:
        self.symbolic, self.pivots, self.couplings, self.ok = symbolic, pivots, couplings, ok

    def _padded(self, rhs: torch.Tensor) -> torch.Tensor:
        batch, n, k = rhs.shape
        if n != self.symbolic.n or batch != self.ok.shape[0]:
            raise ValueError(f"Factor: rhs must be ({self.ok.shape[0]}, {self.symbolic.n}, k), got {tuple(rhs.shape)}")
        return torch.cat([rhs.detach(), rhs.new_zeros(batch, 1, k)], dim=1)  # row n: scratch for padding

    def _forward_sweep(self, x: torch.Tensor) -> torch.Tensor:
        """In place: x <- L^{-1} x (leaves to root), on the padded (B, n + 1, k) work array."""
        batch, _, k = x.shape
        for level, pivot, coupling in zip(self.symbolic.levels, self.pivots, self.couplings):
            rows = level.pivot_index.reshape(-1)
            known = x.index_select(1, rows).view(batch, level.n_fronts, level.p, k)
            x.index_copy_(1, rows, (pivot @ known).view(batch, -1, k))  # y_P = L11^{-1} x_P
            x.index_add_(1, level.structure_index.reshape(-1), (coupling @ known).view(batch, -1, k), alpha=-1.0)
        return x

    def half_solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Y = L^{-1} rhs (B, n, k) in elimination-permuted rows (a sum over rows such as Y^T Y = rhs^T K^{-1} rhs
        does not depend on the permutation); no autograd."""
        with torch.no_grad():
            return self._forward_sweep(self._padded(rhs))[:, :-1]

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """K^{-1} rhs: (B, n, k) -> (B, n, k), no autograd (see :meth:`SparseCholesky.solve`)."""
        with torch.no_grad():
            x = self._forward_sweep(self._padded(rhs))
            batch, _, k = x.shape
            for level, pivot, coupling in zip(*(reversed(v) for v in (self.symbolic.levels, self.pivots,
                                                                      self.couplings))):
                rows, shape = level.pivot_index.reshape(-1), (batch, level.n_fronts, -1, k)
                solved = pivot.mT @ x.index_select(1, rows).view(shape)
                if level.b:  # L11^{-T} (y_P - L21^T x_B)
                    solved -= coupling.mT @ x.index_select(1, level.structure_index.reshape(-1)).view(shape)
                x.index_copy_(1, rows, solved.view(batch, -1, k))
            return x[:, :-1]


class _Solve(torch.autograd.Function):
    """x = K(values)^{-1} rhs with the adjoint backward (K symmetric); twice differentiable."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, rhs: torch.Tensor, factor: Factor) -> torch.Tensor:
        x = factor.solve(rhs)
        ctx.factor = factor
        ctx.save_for_backward(values, x)
        return x

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        values, x = ctx.saved_tensors
        symbolic = ctx.factor.symbolic
        grad_rhs = _Solve.apply(values, grad_x, ctx.factor)
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = -(grad_rhs[:, symbolic.rows] * x[:, symbolic.cols]).sum(-1)
        return grad_values, grad_rhs, None


def _plan(rows: np.ndarray, cols: np.ndarray, n: int, tree: SeparatorTree) -> list[_Level]:
    """Structures, levels, padding and every scatter index of the multifrontal factorisation."""
    n_super = len(tree.pivots)
    owner = np.empty(n, dtype=np.int64)
    position = np.empty(n, dtype=np.int64)
    position[tree.order] = np.arange(n)
    for s, piv in enumerate(tree.pivots):
        owner[piv] = s
    children: list[list[int]] = [[] for _ in range(n_super)]
    for s, p in enumerate(tree.parent):
        if p >= 0:
            children[p].append(s)
    pattern = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    # structure of s: later variables coupled to its pivots directly or through its children's fronts
    structure: list[np.ndarray] = []
    height = np.zeros(n_super, dtype=np.int64)
    for s, piv in enumerate(tree.pivots):  # postorder: children are done before s
        end = position[piv].max() + 1
        cand = np.unique(np.concatenate([pattern[piv].indices] + [structure[c] for c in children[s]]))
        cand = cand[position[cand] >= end]
        structure.append(cand[np.argsort(position[cand])])
        height[s] = 1 + max((height[c] for c in children[s]), default=-1)
    pivots = [piv[np.argsort(position[piv])] for piv in tree.pivots]
    levels_of = [np.flatnonzero(height == h) for h in range(int(height.max()) + 1)]
    slot = np.empty(n_super, dtype=np.int64)  # index of s among its level's fronts
    for members in levels_of:
        slot[members] = np.arange(members.size)
    p_pad = [max(pivots[s].size for s in m) for m in levels_of]
    b_pad = [max(structure[s].size for s in m) for m in levels_of]
    # local index of a variable in the front of s: pivots 0.., structure p_pad.. (monotone in elimination
    # position, so lower triangles map to lower triangles)
    local = np.full(n, -1, dtype=np.int64)
    first = np.where(position[rows] <= position[cols], rows, cols)  # an entry belongs to the front that
    entry_front = owner[first]                                      # eliminates its first variable
    by_front = np.argsort(entry_front, kind="stable")
    bounds = np.searchsorted(entry_front[by_front], np.arange(n_super + 1))
    plans = [dict(n_fronts=int(m.size), p=int(p_pad[h]), b=int(b_pad[h]), entries={}, extend={}, pad=[], piv=[], str=[])
             for h, m in enumerate(levels_of)]
    collected = [{"entries": {}, "extend": {}} for _ in levels_of]
    for s in range(n_super):
        h, f = height[s], slot[s]
        p, b = p_pad[h], b_pad[h]
        local[pivots[s]] = np.arange(pivots[s].size)
        local[structure[s]] = p + np.arange(structure[s].size)
        ks = by_front[bounds[s]:bounds[s + 1]]
        li, lj = local[rows[ks]], local[cols[ks]]
        keep = li >= lj
        _add_block(collected[h]["entries"], None, ks[keep], f, li[keep], lj[keep], p, b)
        for c in children[s]:
            hc, bc, size = height[c], b_pad[height[c]], structure[c].size
            a, z = np.tril_indices(size)
            src = slot[c] * bc * bc + a * bc + z
            lc = local[structure[c]]
            _add_block(collected[h]["extend"], int(hc), src, f, lc[a], lc[z], p, b)
        plans[h]["pad"].append(f * p * p + np.arange(pivots[s].size, p) * (p + 1))
        plans[h]["piv"].append((f, pivots[s]))
        plans[h]["str"].append((f, structure[s]))
        local[pivots[s]] = -1
        local[structure[s]] = -1
    levels = []
    for plan, coll in zip(plans, collected):
        nf, p, b = plan["n_fronts"], plan["p"], plan["b"]
        pivot_index = np.full((nf, p), n, dtype=np.int64)
        structure_index = np.full((nf, b), n, dtype=np.int64)
        for f, piv in plan["piv"]:
            pivot_index[f, :piv.size] = piv
        for f, st in plan["str"]:
            structure_index[f, :st.size] = st
        as_tensor = lambda parts: torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
        levels.append(_Level(
            n_fronts=nf, p=p, b=b,
            entries={k: (as_tensor(v[0]), as_tensor(v[1])) for k, v in coll["entries"].items()},
            extend={k: [(hc, as_tensor(sd[0]), as_tensor(sd[1])) for hc, sd in sorted(v.items())]
                    for k, v in coll["extend"].items()},
            pad_diag=as_tensor(plan["pad"]), pivot_index=torch.as_tensor(pivot_index),
            structure_index=torch.as_tensor(structure_index)))
    return levels


def _add_block(store: dict, child_level: int | None, src: np.ndarray, front: int, li: np.ndarray, lj: np.ndarray,
               p: int, b: int) -> None:
    """Route lower-triangle entries (li >= lj, local indices of one front) to the block they fall in: append
    (src, flat destination) to ``store[block]`` (``store[block][child_level]`` for extend-add plans)."""
    for name, mask, dst in (
        ("11", (li < p), front * p * p + li * p + lj),
        ("21", (li >= p) & (lj < p), front * b * p + (li - p) * p + lj),
        ("22", (lj >= p), front * b * b + (li - p) * b + (lj - p)),
    ):
        if not mask.any():
            continue
        target = store.setdefault(name, ([], [])) if child_level is None else \
            store.setdefault(name, {}).setdefault(child_level, ([], []))
        target[0].append(src[mask])
        target[1].append(dst[mask])
