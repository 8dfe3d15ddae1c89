"""Batched regularised Gauss-Newton for EIT: the "GN" baseline and the networks' x0.

x_{k+1} = x_k - (J^T J + lamb_k R)^{-1} J^T (F(x_k) - y), J = dF/dsigma at x_k,
lamb_{k+1} = max(lamb_k * lamb_decay, lamb_min), a fixed number of iterations.

This is pyEIT 1.2.4's ``JAC.gn`` (pyEIT writes it with its negated Jacobian and r = y - F(x),
the same update). R by ``method``: "kotre" diag(diag(J^T J))^p, "lm" diag(diag(J^T J)),
"dgn" the identity. Note: ``JAC.gn`` takes ``method`` as its own argument, default
"kotre"; the ``method="lm"`` given to ``JAC.setup`` is not used by ``gn``. The published
call (``setup(p=0.25, lamb=1.0, method="lm")`` then ``gn(v, lamb_decay=0.1, lamb_min=1e-5,
maxiter=8)``) therefore runs "kotre" with p = 0.25, our default.
"""

from __future__ import annotations

import torch

from deepunroll.operators.eit.operator import EIT

_METHODS = ("kotre", "lm", "dgn")


class GaussNewton:
    """sigma = GN(operator, voltages): voltages (B, n_meas) -> sigma (B, n_elems), batched.

    Iterates are not clamped (as pyEIT): if one turns non-positive the stiffness matrix is
    solved by LU instead of Cholesky. ``chunk_size`` bounds memory (about 3 MB per sample
    at h0=0.1, from the (n_meas, n_elems) Jacobian).
    """

    def __init__(
        self,
        p: float = 0.25,
        lamb: float = 1.0,
        lamb_decay: float = 0.1,
        lamb_min: float = 1e-5,
        n_iter: int = 8,
        background: float = 1.0,
        method: str = "kotre",
        chunk_size: int = 64,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"GaussNewton.method must be one of {_METHODS}, got {method!r}")
        if not lamb > 0 or not lamb_decay > 0 or lamb_min < 0:
            raise ValueError(f"GaussNewton needs lamb > 0, lamb_decay > 0, lamb_min >= 0; got {lamb}, {lamb_decay}, {lamb_min}")
        if int(n_iter) < 0 or int(chunk_size) < 1:
            raise ValueError(f"GaussNewton needs n_iter >= 0 and chunk_size >= 1; got {n_iter}, {chunk_size}")
        if not background > 0:
            raise ValueError(f"GaussNewton.background must be a positive conductivity, got {background}")
        self.p, self.lamb, self.lamb_decay, self.lamb_min = float(p), float(lamb), float(lamb_decay), float(lamb_min)
        self.n_iter, self.background, self.method, self.chunk_size = int(n_iter), float(background), method, int(chunk_size)

    def metadata(self) -> dict:
        return {
            "solver": "GaussNewton", "p": self.p, "lamb": self.lamb, "lamb_decay": self.lamb_decay,
            "lamb_min": self.lamb_min, "n_iter": self.n_iter, "background": self.background, "method": self.method,
        }

    def lambdas(self) -> list[float]:
        """The damping used at each iteration: lamb, then max(lamb * decay^k, lamb_min)."""
        values, lamb = [], self.lamb
        for _ in range(self.n_iter):
            values.append(lamb)
            lamb = max(lamb * self.lamb_decay, self.lamb_min)
        return values

    @torch.no_grad()
    def __call__(self, operator: EIT, voltages: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        operator.check_input(voltages, "voltages", operator.out_shape)
        y64 = voltages.to(torch.float64)
        if x0 is None:
            x = torch.full((y64.shape[0], operator.n_elems), self.background, dtype=torch.float64, device=y64.device)
        else:
            operator.check_input(x0, "x0")
            x = x0.to(torch.float64)
        out = [self._solve(operator, y_chunk, x_chunk) for y_chunk, x_chunk in
               zip(y64.split(self.chunk_size), x.split(self.chunk_size))]
        return torch.cat(out).to(voltages.dtype)

    def _solve(self, operator: EIT, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for lamb in self.lambdas():
            predicted, jac = operator.linearize(x, check_positive=False)
            x = x - self.step(jac, predicted - y, lamb)
        return x

    def step(self, jac: torch.Tensor, residual: torch.Tensor, lamb: float) -> torch.Tensor:
        """(J^T J + lamb R)^{-1} J^T r: jac (B, M, E), residual (B, M) -> (B, E).

        Uses the M x M form R^{-1} J^T (J R^{-1} J^T + lamb I)^{-1} r when M < E and R is
        invertible (same vector, cheaper), else the E x E system.
        """
        col_sq = jac.square().sum(dim=1)  # diag(J^T J), (B, E)
        if self.method == "kotre":
            reg = col_sq.pow(self.p)
        elif self.method == "lm":
            reg = col_sq
        else:
            reg = torch.ones_like(col_sq)
        n_meas, n_elems = jac.shape[1:]
        if n_meas < n_elems and bool((reg > 0).all()):
            scaled = jac / reg[:, None, :]  # J R^{-1}
            system = scaled @ jac.transpose(1, 2)
            system.diagonal(dim1=1, dim2=2).add_(lamb)
            dual = _spd_solve(system, residual.unsqueeze(-1))
            return (scaled.transpose(1, 2) @ dual).squeeze(-1)
        system = jac.transpose(1, 2) @ jac + lamb * torch.diag_embed(reg)
        return _spd_solve(system, (jac.transpose(1, 2) @ residual.unsqueeze(-1))).squeeze(-1)


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.solve(matrix, rhs)
