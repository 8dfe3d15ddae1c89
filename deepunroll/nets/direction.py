"""How the data-fit signal is presented to the learned blocks (``net.direction``).

On EIT the raw gradient d = J^T (F(x) - y) is about 1e-8 at the Gauss-Newton x0 while x is of
order one, and the voltages F(x), y (about 0.03) differ by about 1e-5: convolutions and an LSTM
initialised with weights of order 0.1 cannot see such inputs. The kinds below present the same
information at order one. With c = ||J(x_ref)||_2 (spectral norm at the operator's reference point,
:meth:`ForwardOperator.reference_point`) and y_ref = F(x_ref), every kind but ``raw`` works with the
normalised operator F~(x) = (F(x) - y_ref) / c, whose Jacobian J / c has norm one at x_ref:

============ ===================================== ======================== ============================
kind         misfit direction (LPGD, MA, RMA, PnP) LPD dual inputs F(x), y  LPD primal input from h
============ ===================================== ======================== ============================
raw          J^T r  (published; r = F(x) - y)      F(x), y                  J^T h
scaled       J^T r / c^2                           F~(x), y~                J^T h / c
gauss_newton J^T (J J^T + lam I)^{-1} r            F~(x), y~                c J^T (J J^T + lam I)^{-1} h
frozen_gn    G r, G = J0^T (J0 J0^T + lam0 I)^{-1}   F~(x), y~                c G h
none         0 (no data term: post-processing)     F(x), y                  0
============ ===================================== ======================== ============================

``normalize`` (scaled, gauss_newton): the misfit direction d is divided by its per-sample rms, and
log10 rms(d) goes to LPGD's blocks as an extra constant channel, so its magnitude is not lost.
``frozen_gn``: gauss_newton with the Jacobian frozen at x_ref, J0 = J(x_ref): G (n_in, n_out) is built once
per operator (one M x M Cholesky), so an iterate costs one forward F(x) and one product, where
``gauss_newton`` costs a Jacobian and a factorisation per sample (about 1 s per sample on the KTC2023 tank).
G is not saved in checkpoints: it is rebuilt from the operator (:meth:`DataFit.linearise_at_reference`,
also after the operator is swapped, e.g. for another level of missing electrodes).
``none`` trains the same network with every data-fit direction zero: the post-processing baseline of
equal size (it never calls the operator's derivatives; LPD's dual blocks still read F(x) and y).
``gauss_newton``: lam = ``damping`` x mean(diag(J J^T)) per sample (scale-free); the M x M system
(M measurements) is solved by one batched Cholesky per iterate, J from ``operator.linearize``.
Missing measurements (:meth:`ForwardOperator.observed`, e.g. a KTC2023 sample's removed electrodes): r and
the rows of J are zeroed where a sample has no data, and ``frozen_gn`` uses G built from J0 with those rows
zeroed (one G per pattern of observed rows, cached), so one network serves data with different rows missing.
``raw`` / ``scaled`` rely on the operator's ``misfit_grad`` doing the same; LPD's dual blocks see the zeros as data.
"""

from __future__ import annotations

import torch
from torch import nn

from deepunroll.operators.base import ForwardOperator, product_per_pattern

KINDS = ("raw", "scaled", "gauss_newton", "frozen_gn", "none")
MAX_PATTERNS = 16  # frozen_gn: patterns of observed rows kept (one (n_in, n_out) G each)


class DataFit(nn.Module):
    """The presentation of F, J and y chosen by ``net.direction``; buffers ``scale`` (c) and ``y_ref``
    (F(x_ref), (*out_shape)) are float64 and saved in checkpoints, so a trained model keeps the scale it
    was trained with. ``raw`` holds no buffers (checkpoints written before this module load unchanged).
    """

    def __init__(self, operator: ForwardOperator, kind: str = "raw", damping: float = 0.01, normalize: bool = False,
                 power_iters: int = 100) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"net.direction={kind!r}; expected one of {list(KINDS)}")
        if not damping > 0:
            raise ValueError(f"net.direction_damping={damping}; expected > 0 (fraction of mean diag(J J^T))")
        if normalize and kind in ("raw", "none"):
            raise ValueError(f"net.direction_normalize=true needs net.direction=scaled or gauss_newton, not {kind}")
        self.kind, self.damping, self.normalize = kind, float(damping), bool(normalize)
        # every direction returns zeros: always with ``none``, within deepunroll.ablation.data_term_removed
        self.disabled = kind == "none"
        if kind not in ("raw", "none"):
            x_ref = operator.reference_point().to(torch.float64)
            with torch.no_grad():
                y_ref = operator(x_ref)[0].to(torch.float64)
            self.register_buffer("scale", torch.tensor(operator_norm(operator, x_ref, power_iters), dtype=torch.float64))
            self.register_buffer("y_ref", y_ref)
        if kind == "frozen_gn":
            self.linearise_at_reference(operator)

    def linearise_at_reference(self, operator: ForwardOperator) -> None:
        """``frozen_gn``: (re)build G = J0^T (J0 J0^T + lam0 I)^{-1} (n_in, n_out) float64 at the operator's
        reference point (non-persistent buffers ``gain`` and ``reference_jacobian`` J0 (n_out, n_in); the
        gains of other patterns of observed rows are rebuilt from J0 when first needed)."""
        jac = operator.jacobian(operator.reference_point().to(torch.float64))[0].to(torch.float64)  # (M, N)
        self.register_buffer("reference_jacobian", jac, persistent=False)
        self.register_buffer("gain", self._pseudo_inverse(jac), persistent=False)
        self._pattern_gains: dict[tuple[str, bytes], torch.Tensor] = {}

    def _pseudo_inverse(self, jac: torch.Tensor) -> torch.Tensor:
        """J^T (J J^T + lam I)^{-1} (N, M), lam = damping * mean(diag(J J^T)) over all M rows (zero rows included);
        zeros when J is zero (no rows observed)."""
        gram = jac @ jac.T
        if not bool(gram.diagonal().any()):
            return torch.zeros_like(jac.T).contiguous()
        gram.diagonal().add_(self.damping * gram.diagonal().mean())
        return torch.cholesky_solve(jac, torch.linalg.cholesky(gram)).T.contiguous()

    def _pattern_gain(self, observed: torch.Tensor) -> torch.Tensor:
        """G for the observed rows (n_out,) bool: J0 with the other rows zeroed (built once per pattern)."""
        key = (str(self.reference_jacobian.device), observed.cpu().numpy().tobytes())  # a moved module rebuilds
        if key not in self._pattern_gains:
            if len(self._pattern_gains) >= MAX_PATTERNS:
                raise ValueError(f"net.direction=frozen_gn: more than {MAX_PATTERNS} patterns of missing "
                                 "measurements (each needs its own G); expected a few (the KTC2023 levels)")
            jac = self.reference_jacobian * observed.to(self.reference_jacobian.dtype)[:, None]
            self._pattern_gains[key] = self._pseudo_inverse(jac)
        return self._pattern_gains[key]

    @property
    def aux_channels(self) -> int:
        """Extra per-sample channels the direction hands to LPGD's blocks (1 with ``normalize``)."""
        return 1 if self.normalize else 0

    def extra_repr(self) -> str:
        scale = "" if self.kind in ("raw", "none") else f", scale={float(self.scale):.4g}"
        damping = f", damping={self.damping}" if self.kind == "gauss_newton" else ""
        return f"kind={self.kind}{scale}{damping}" + (", normalize=True" if self.normalize else "")

    # --------------------------------------------------- measurement space
    def measurements(self, v: torch.Tensor) -> torch.Tensor:
        """Voltages/measurements as the blocks see them: v (raw) or (v - y_ref) / c, float64 in, float64 out."""
        if self.kind in ("raw", "none"):
            return v
        return (v - self.y_ref) / self.scale

    # ---------------------------------------------------------- directions
    def misfit_direction(self, operator: ForwardOperator, x: torch.Tensor, y: torch.Tensor):
        """(d, aux): the data-fit direction (B, *in_shape) at x (float64) for measurements y (float64);
        aux (B,) with ``normalize`` (log10 of d's rms before normalisation), else None."""
        observed = operator.observed(y)
        if self.kind == "gauss_newton":
            predicted, jac = operator.linearize(x)
            residual = predicted - y
            if observed is not None:
                rows = observed.to(jac.dtype)
                residual, jac = residual * rows.reshape(residual.shape), jac * rows[:, :, None]
            d = _regularised_pseudo_inverse(jac, residual, self.damping, x.shape)
        elif self.kind == "frozen_gn":
            d = self._frozen(operator(x) - y, x.shape, observed)
        else:
            d = operator.misfit_grad(x, y)
            if self.kind == "raw":
                return d, None
            d = d / self.scale**2
        if not self.normalize:
            return d, None
        rms = d.flatten(1).square().mean(1).sqrt().clamp_min(torch.finfo(d.dtype).tiny)
        return d / rms.view(-1, *[1] * (d.dim() - 1)), rms.log10()

    def adjoint_direction(self, operator: ForwardOperator, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The primal direction LPD builds from a measurement-space variable h (B, *out_shape)."""
        if self.kind == "gauss_newton":
            _, jac = operator.linearize(x)
            return self.scale * _regularised_pseudo_inverse(jac, h.to(jac.dtype), self.damping, x.shape)
        if self.kind == "frozen_gn":
            return self.scale * self._frozen(h, x.shape)
        grad = operator.vjp(x, h)
        return grad if self.kind == "raw" else grad / self.scale

    def _frozen(self, r: torch.Tensor, x_shape, observed: torch.Tensor | None = None) -> torch.Tensor:
        """G r: r (B, *out) -> (B, *x_shape); with ``observed`` (B, n_out) bool each sample's r is zeroed off its
        rows and multiplied by the G of its pattern (one product per pattern in the batch)."""
        r = r.reshape(r.shape[0], -1).to(self.gain.dtype)
        if observed is None:
            return (r @ self.gain.T).reshape(x_shape)
        d = product_per_pattern(observed, r * observed.to(r.dtype), self._pattern_gain, self.gain.shape[0])
        return d.reshape(x_shape)


def _regularised_pseudo_inverse(jac: torch.Tensor, r: torch.Tensor, damping: float, x_shape) -> torch.Tensor:
    """J^T (J J^T + lam I)^{-1} r, lam = damping * mean(diag(J J^T)): jac (B, M, N), r (B, *out) -> (B, *x)."""
    gram = jac @ jac.transpose(1, 2)
    lam = damping * gram.diagonal(dim1=1, dim2=2).mean(-1)
    gram = gram + lam[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram)
    dual = torch.cholesky_solve(r.reshape(r.shape[0], -1, 1), chol)
    return (jac.transpose(1, 2) @ dual).reshape(x_shape)


DENSE_NORM_ENTRIES = 1 << 22  # Jacobians up to 4M entries (32 MB) get an exact SVD norm


def operator_norm(operator: ForwardOperator, x: torch.Tensor, n_iter: int = 50) -> float:
    """||J(x)||_2 at one point x (1, *in_shape), float64: the exact largest singular value of the dense
    Jacobian when it has at most ``DENSE_NORM_ENTRIES`` entries, else :func:`power_norm`."""
    if operator.n_in * operator.n_out <= DENSE_NORM_ENTRIES:
        return float(torch.linalg.matrix_norm(operator.jacobian(x)[0].to(torch.float64), 2))
    return power_norm(operator, x, n_iter)


def power_norm(operator: ForwardOperator, x: torch.Tensor, n_iter: int = 50, seed: int = 0) -> float:
    """||J(x)||_2 by power iteration on J^T J from a seeded start (a lower bound that converges from below).

    J u is the derivative in v of <J^T v, u> (``vjp`` is linear and differentiable in v), so only
    ``forward`` and ``vjp`` are needed.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    u = u / u.norm()
    probe = torch.zeros((1, *operator.out_shape), dtype=torch.float64, device=x.device)
    value = 0.0
    for _ in range(n_iter):
        with torch.enable_grad():
            v = probe.clone().requires_grad_()
            (ju,) = torch.autograd.grad((operator.vjp(x, v) * u).sum(), v)
        jtju = operator.vjp(x, ju.detach())
        value = float(jtju.norm().sqrt())  # ||J^T J u|| -> sigma_max^2 for unit u
        u = jtju / jtju.norm()
    return value
