"""Nested dissection and the batched multifrontal Cholesky (deepunroll.optim.ordering / sparse_cholesky)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import rel
from deepunroll.optim.ordering import nested_dissection
from deepunroll.optim.sparse_cholesky import SparseCholesky


def grid_laplacian(side: int):
    """5-point Laplacian + identity on a side x side grid: (pattern rows, cols, coords)."""
    n = side * side
    ij = np.arange(n).reshape(side, side)
    pairs = [(ij[:, :-1].ravel(), ij[:, 1:].ravel()), (ij[:-1, :].ravel(), ij[1:, :].ravel())]
    rows = np.concatenate([np.arange(n)] + [a for a, b in pairs] + [b for a, b in pairs])
    cols = np.concatenate([np.arange(n)] + [b for a, b in pairs] + [a for a, b in pairs])
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(n, 2).astype(float)
    return rows, cols, coords


def random_spd_values(rows, cols, n, batch, seed=0):
    """Values (B, nnz) of random SPD matrices with the pattern: weighted graph Laplacians plus a diagonal shift."""
    gen = torch.Generator().manual_seed(seed)
    off = rows != cols
    weight = torch.rand(batch, int(off.sum()) // 2, generator=gen, dtype=torch.float64) + 0.1
    # one weight per undirected edge: index the edge (min, max) consistently
    key = np.minimum(rows, cols) * n + np.maximum(rows, cols)
    _, edge = np.unique(key[off], return_inverse=True)
    values = torch.zeros(batch, rows.size, dtype=torch.float64)
    values[:, np.flatnonzero(off)] = -weight[:, edge]
    degree = torch.zeros(batch, n, dtype=torch.float64).index_add(1, torch.as_tensor(rows[off]), weight[:, edge])
    values[:, np.flatnonzero(~off)] = degree[:, rows[~off]] + 0.05 + torch.rand(batch, n, generator=gen, dtype=torch.float64)
    return values


def dense(values, rows, cols, n):
    out = torch.zeros(values.shape[0], n, n, dtype=values.dtype)
    out[:, rows, cols] = values
    return out


def symbolic(rows, cols, coords, leaf=8, last=None):
    n = coords.shape[0]
    pattern = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    return SparseCholesky(rows, cols, n, nested_dissection(pattern, coords, leaf_size=leaf, last=last))


# ------------------------------------------------------------------ ordering
def test_nested_dissection_orders_each_variable_once_and_separates():
    rows, cols, coords = grid_laplacian(20)
    pattern = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(400, 400))
    tree = nested_dissection(pattern, coords, leaf_size=10)
    assert np.array_equal(np.sort(tree.order), np.arange(400))
    assert all(p.size for p in tree.pivots) and (tree.parent[:-1] > np.arange(len(tree.pivots) - 1)).all()
    # separator property: the two ends of every edge lie on one root path (ancestor and descendant)
    owner = np.empty(400, dtype=int)
    for s, piv in enumerate(tree.pivots):
        owner[piv] = s

    def ancestors(s):
        out = {s}
        while tree.parent[s] >= 0:
            s = tree.parent[s]
            out.add(s)
        return out

    lines = {s: ancestors(s) for s in range(len(tree.pivots))}
    assert all(owner[j] in lines[owner[i]] or owner[i] in lines[owner[j]] for i, j in zip(rows, cols))


def test_variables_listed_last_form_the_root():
    rows, cols, coords = grid_laplacian(6)
    pattern = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(36, 36))
    tree = nested_dissection(pattern, coords, leaf_size=4, last=[35, 3])
    assert tree.pivots[-1].tolist() == [3, 35] and tree.parent[-1] == -1


# ------------------------------------------------------------------ factorisation
@pytest.mark.parametrize("side,leaf", [(1, 8), (5, 1), (12, 8), (20, 30)])
def test_solve_matches_dense_solve(side, leaf):
    rows, cols, coords = grid_laplacian(side)
    n = side * side
    chol = symbolic(rows, cols, coords, leaf)
    values = random_spd_values(rows, cols, n, 4)
    rhs = torch.randn(4, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    factor = chol.factor(values)
    expected = torch.linalg.solve(dense(values, rows, cols, n), rhs)
    assert bool(factor.ok.all())
    assert rel(factor.solve(rhs), expected) < 1e-13
    half = factor.half_solve(rhs)  # Y = L^{-1} rhs: Y^T Y = rhs^T K^{-1} rhs
    assert rel(half.mT @ half, rhs.mT @ expected) < 1e-13


def test_factor_is_sparse_on_a_large_grid():
    rows, cols, coords = grid_laplacian(60)  # 3,600 unknowns
    chol = symbolic(rows, cols, coords, leaf=16)
    assert chol.factor_entries < 0.02 * 3600**2  # measured 208,748 (1.6 %) with padding; dense: 100 %


def test_indefinite_samples_are_flagged():
    rows, cols, coords = grid_laplacian(6)
    values = random_spd_values(rows, cols, 36, 3)
    values[1, rows == cols] = -1.0
    assert symbolic(rows, cols, coords).factor(values).ok.tolist() == [True, False, True]


def test_solve_is_twice_differentiable_by_the_adjoint():
    rows, cols, coords = grid_laplacian(4)
    chol = symbolic(rows, cols, coords, leaf=3)
    sym_values = random_spd_values(rows, cols, 16, 2).requires_grad_()
    rhs = torch.randn(2, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    transpose = _transpose_index(rows, cols)

    def solve(v, b):  # perturbations must keep K symmetric: differentiate through a symmetrisation
        return chol.solve(0.5 * (v + v[:, transpose]), b)

    assert torch.autograd.gradcheck(solve, (sym_values, rhs))
    assert torch.autograd.gradgradcheck(solve, (sym_values, rhs))


def _transpose_index(rows, cols):
    key = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(rows, cols))}
    return torch.as_tensor([key[(int(j), int(i))] for i, j in zip(rows, cols)])


def test_bad_shapes_are_refused():
    rows, cols, coords = grid_laplacian(3)
    chol = symbolic(rows, cols, coords)
    with pytest.raises(ValueError, match="values must be"):
        chol.factor(torch.ones(2, rows.size + 1, dtype=torch.float64))
    factor = chol.factor(random_spd_values(rows, cols, 9, 2))
    with pytest.raises(ValueError, match="rhs must be"):
        factor.solve(torch.ones(2, 8, 1, dtype=torch.float64))
