"""Reconstruction metrics, per sample (README, Metrics (ours)).

All take x_hat, x of shape (B, *shape) and return (B,) tensors (ssim: images (B, H, W)).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from skimage.metrics import structural_similarity


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean((x_hat - x)^2) per sample."""
    return (x_hat - x).flatten(1).square().mean(1)


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x_hat - x||_2 / ||x||_2 per sample."""
    return (x_hat - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)


def data_range(x: torch.Tensor) -> torch.Tensor:
    """max(x) - min(x) of each ground-truth sample."""
    flat = x.flatten(1)
    return flat.max(1).values - flat.min(1).values


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """10 log10(R^2 / MSE) with R = that sample's ground-truth range (scikit-image's definition)."""
    return 10 * torch.log10(data_range(x).square() / mse(x_hat, x))


def dynamic_range(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(max x_hat - min x_hat) / (max x - min x) * 100 %."""
    return 100 * data_range(x_hat) / data_range(x)


def ssim(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """scikit-image's structural_similarity (7x7 uniform window, K1 = 0.01, K2 = 0.03) per sample,
    with data_range = that sample's ground-truth range. Images (B, H, W), H and W >= 7; float64 result on x's device.
    """
    truth = x.detach().cpu().double().numpy()
    estimate = x_hat.detach().cpu().double().numpy()
    if truth.ndim != 3 or min(truth.shape[1:]) < 7:
        raise ValueError(f"ssim needs images (B, H, W) of at least 7x7 pixels, got shape {tuple(x.shape)}")
    values = [structural_similarity(t, e, data_range=float(t.max() - t.min())) for t, e in zip(truth, estimate)]
    return torch.tensor(np.asarray(values, dtype=np.float64), device=x.device)


class MeshSSIM:
    """SSIM on a triangle mesh (README, Metrics (ours)), per sample, (B,).

    For element e the window is e and every element sharing a vertex with it; local means,
    (population) variances and covariance over the window give
    SSIM_e = (2 mu_x mu_y + c1)(2 cov + c2) / ((mu_x^2 + mu_y^2 + c1)(var_x + var_y + c2)),
    c1 = (0.01 L)^2, c2 = (0.03 L)^2, L = that sample's ground-truth range; the result is the
    mean over elements. ``elements``: (n_elems, 3) node indices.
    """

    def __init__(self, elements: torch.Tensor) -> None:
        elements = torch.as_tensor(elements, dtype=torch.long).cpu()
        n_elems, n_nodes = elements.shape[0], int(elements.max()) + 1
        incidence = torch.zeros(n_elems, n_nodes, dtype=torch.float64)
        incidence[torch.arange(n_elems).repeat_interleave(3), elements.flatten()] = 1.0
        window = ((incidence @ incidence.T) > 0).to(torch.float64)  # shares >= 1 vertex (incl. itself)
        self.average = window / window.sum(1, keepdim=True)          # (n_elems, n_elems) row-stochastic

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        avg = self.average.to(x.device)
        x_hat, x = x_hat.to(torch.float64), x.to(torch.float64)
        mu_a, mu_b = x_hat @ avg.T, x @ avg.T
        var_a = (x_hat * x_hat) @ avg.T - mu_a**2
        var_b = (x * x) @ avg.T - mu_b**2
        cov = (x_hat * x) @ avg.T - mu_a * mu_b
        L = data_range(x)[:, None]
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return ssim.mean(1)


METRICS = {"mse": mse, "rel_err": relative_error, "psnr": psnr, "ssim": ssim, "dr": dynamic_range}
# metrics built from the operator (mesh connectivity): name -> factory(operator)
OPERATOR_METRICS = {"ssim_mesh": lambda operator: MeshSSIM(operator.elements)}


KTC_SIZE, KTC_RADIUS, KTC_C1, KTC_C2 = 256, 80.0, 1e-4, 9e-4


@functools.lru_cache(maxsize=1)
def _ktc_window_matrix() -> np.ndarray:
    """(256, 256) symmetric Toeplitz C with C[i, j] = exp(-(i - j)^2 / (2 r^2)) for |i - j| <= 2r (r = 80 px), 0
    beyond: C @ image @ C is the zero-padded 'same' convolution of image with the separable truncated window."""
    offsets = np.arange(KTC_SIZE)[:, None] - np.arange(KTC_SIZE)[None, :]
    line = np.exp(-offsets.astype(np.float64) ** 2 / (2 * KTC_RADIUS**2))
    return np.where(np.abs(offsets) <= int(np.ceil(2 * KTC_RADIUS)), line, 0.0)


def ktc_score(truth: np.ndarray, reconstruction: np.ndarray) -> float:
    """The KTC2023 score of a 3-class reconstruction (0 water, 1 resistive, 2 conductive) against the truth.

    score = (SSIM(T_2, R_2) + SSIM(T_1, R_1)) / 2 over the class masks (a pixel is class c when within 0.1 of
    c), each SSIM the plain mean of the SSIM map with a Gaussian window of radius 80 px truncated at 160 px,
    local means renormalised over the part of the window inside the image, c1 = 1e-4, c2 = 9e-4; 0 when the
    reconstruction is not 256 x 256 (the challenge's rule). The window is separable, so each convolution is
    two 256 x 256 matrix products (:func:`_ktc_window_matrix`), all six of a score in one batched product.
    """
    truth = np.asarray(truth, dtype=np.float64)
    reconstruction = np.asarray(reconstruction, dtype=np.float64)
    if truth.shape != (KTC_SIZE, KTC_SIZE):
        raise ValueError(f"ktc_score: the truth must be {KTC_SIZE} x {KTC_SIZE}, got {truth.shape}")
    if reconstruction.shape != truth.shape:
        return 0.0
    window = _ktc_window_matrix()
    weight = window.sum(axis=1)
    weight = np.outer(weight, weight)  # the window's mass inside the image at each pixel
    t = np.stack([(np.abs(truth - c) < 0.1) for c in (1, 2)]).astype(np.float64)
    r = np.stack([(np.abs(reconstruction - c) < 0.1) for c in (1, 2)]).astype(np.float64)
    # the masks are 0/1, so t * t = t: the local mean of t^2 is mu_t
    mu_t, mu_r, tr = window @ np.stack([t, r, t * r]) @ window / weight
    var_t, var_r, cov = mu_t - mu_t**2, mu_r - mu_r**2, tr - mu_t * mu_r
    ssim_map = ((2 * mu_t * mu_r + KTC_C1) * (2 * cov + KTC_C2)
                / ((mu_t**2 + mu_r**2 + KTC_C1) * (var_t + var_r + KTC_C2)))
    return float(ssim_map.mean(axis=(1, 2)).sum()) / 2


def select(names, operator=None) -> dict:
    """{name: fn} for the names in ``data.metrics``; unknown names are an error listing the known ones."""
    known = sorted(METRICS) + sorted(OPERATOR_METRICS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"data.metrics: unknown {unknown}; expected names from {known}")
    return {n: METRICS[n] if n in METRICS else OPERATOR_METRICS[n](operator) for n in names}
