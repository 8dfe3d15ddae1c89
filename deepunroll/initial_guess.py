"""Initial guesses x0 = x0(operator, y) (the ``x0`` config group): zeros, and the 2D blur's constant-image inverse.

EIT's Gauss-Newton reconstruction is :class:`deepunroll.operators.eit.GaussNewton` (``x0=gauss_newton``).
Every initial guess maps y (B, *operator.out_shape) to x0 (B, *operator.in_shape) in y's dtype and device
and describes itself by ``metadata()`` (part of a dataset's fingerprint: the stored x0 depends on it).
"""

from __future__ import annotations

import torch


class Zeros:
    """x0 = 0 (the toy problem's published initial guess)."""

    def __call__(self, operator, y: torch.Tensor) -> torch.Tensor:
        return y.new_zeros((y.shape[0], *operator.in_shape))

    def metadata(self) -> dict:
        return {"initial_guess": "Zeros"}


class ConstantImageInverse:
    """x0 for :class:`deepunroll.operators.blur.VolterraBlur2d`: y interpolated back to the image grid, then
    the constant-image response inverted pointwise."""

    def __call__(self, operator, y: torch.Tensor) -> torch.Tensor:
        """x0: y linearly interpolated back to the image grid, then the constant-image response inverted.

        A constant image c gives y = S_w c + a S_W c^2 (S_w, S_W: sums of w and W, both 1 here), so
        x0 = 2 y / (S_w + sqrt(S_w^2 + 4 a S_W y)), with the square root's argument clamped at 0
        (a = 0: x0 = y / S_w). y (B, H', W') -> x0 (B, H, W), y's dtype and device.
        """
        height, width = operator.in_shape
        stride = operator.stride
        rows = _interpolation_matrix(height, y.shape[-2], stride).to(dtype=y.dtype, device=y.device)
        cols = _interpolation_matrix(width, y.shape[-1], stride).to(dtype=y.dtype, device=y.device)
        upsampled = rows @ y @ cols.T
        sum_w = float(operator.linear_kernel.sum())
        sum_quad = float(operator.quadratic_kernel.sum())
        root = torch.sqrt((sum_w**2 + 4 * operator.a * sum_quad * upsampled).clamp_min(0))
        return 2 * upsampled / (sum_w + root)

    def metadata(self) -> dict:
        return {"initial_guess": "ConstantImageInverse"}


def _interpolation_matrix(n: int, n_samples: int, stride: int) -> torch.Tensor:
    """(n, n_samples) matrix: linear interpolation from samples at 0, s, 2s, ... to 0 .. n-1, constant past the last."""
    position = (torch.arange(n, dtype=torch.float64) / stride).clamp(max=n_samples - 1)
    lower = position.floor().long().clamp(max=n_samples - 1)
    upper = (lower + 1).clamp(max=n_samples - 1)
    frac = position - lower
    matrix = torch.zeros(n, n_samples, dtype=torch.float64)
    matrix[torch.arange(n), lower] += 1 - frac
    matrix[torch.arange(n), upper] += frac
    return matrix
