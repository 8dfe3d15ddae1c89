"""Batched linear algebra on (B, ...) tensors: per-sample inner products and conjugate gradients."""

from __future__ import annotations

import torch


def bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product: (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


def per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) or scalar tensor to broadcast against (B, ...)."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


def batched_cg(matvec, b: torch.Tensor, n_iter: int, tol: float) -> torch.Tensor:
    """Conjugate gradients per sample for A v = b, A symmetric positive definite: (B, ...) -> (B, ...).

    Stops a sample once ||r|| <= tol ||b||; at most n_iter matrix-vector products.
    """
    v = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = bdot(r, r)
    threshold = (tol ** 2) * rr
    for _ in range(n_iter):
        active = rr > threshold
        if not bool(active.any()):
            break
        ap = matvec(p)
        alpha = torch.where(active, rr / bdot(p, ap).clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rr))
        v = v + per_sample(alpha, b) * p
        r = r - per_sample(alpha, b) * ap
        rr_new = bdot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rr))
        p = r + per_sample(beta, b) * p
        rr = torch.where(active, rr_new, rr)
    return v
