"""2D nonlinear blur: a second-order Volterra filter on images, optionally strided.

y(p) = sum_i w(i) x(s p + i) + a sum_{i,j} W(i,j) x(s p + i) x(s p + j), i, j over a k x k window;
x (B, H, W) -> y (B, ceil(H/s), ceil(W/s)). The 2D generalisation of the 1D toy (the 1D problem of Zhou et al., Inverse Problems 2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from deepunroll.operators.base import ForwardOperator

#: Boundary modes, with scipy.ndimage's names and meanings (torch's padding name in brackets).
BOUNDARY_MODES = {
    "reflect": "d c b a | a b c d | d c b a  (half-sample symmetric; torch has no such padding)",
    "mirror": "d c b | a b c d | c b a  (whole-sample symmetric; torch's 'reflect')",
    "constant": "0 0 0 | a b c d | 0 0 0  (zeros; torch's 'constant')",
    "wrap": "a b c d | a b c d | a b c d  (periodic; torch's 'circular')",
    "nearest": "a a a | a b c d | d d d  (edge; torch's 'replicate')",
}
KERNELS = ("gaussian", "motion", "random")
MAX_JACOBIAN_PIXELS = 32 * 32


def boundary_index(n: int, r: int, mode: str) -> torch.Tensor:
    """Source index in [0, n) of each of the n + 2r padded positions (-1 = zero), scipy.ndimage's rule."""
    i = torch.arange(-r, n + r)
    if mode == "constant":
        return torch.where((i >= 0) & (i < n), i, torch.full_like(i, -1))
    if mode == "wrap":
        return i % n
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        m = i % (2 * n)
        return torch.where(m < n, m, 2 * n - 1 - m)
    if mode == "mirror":
        if n == 1:
            return torch.zeros_like(i)
        m = i % (2 * n - 2)
        return torch.where(m < n, m, 2 * n - 2 - m)
    raise ValueError(f"unknown boundary mode {mode!r}")


def linear_kernel(kind: str, size: int, width: float, angle: float, generator: torch.Generator) -> torch.Tensor:
    """k x k linear kernel w, summing to 1 (float64); see :class:`VolterraBlur2d` for ``width``/``angle``."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    if kind == "gaussian":
        kernel = torch.exp(-(dx**2 + dy**2) / (2 * width**2))
    elif kind == "motion":
        # anti-aliased segment of the given length through the centre: weight max(0, 1 - distance)
        theta = math.radians(angle)
        ux, uy = math.cos(theta), -math.sin(theta)  # angle counter-clockwise from the +column axis, rows point down
        half = min(width, size) / 2
        along = (dx * ux + dy * uy).clamp(-half, half)
        dist = torch.hypot(dx - along * ux, dy - along * uy)
        kernel = (1 - dist).clamp_min(0)
    elif kind == "random":
        kernel = torch.randn(size, size, generator=generator, dtype=torch.float64).abs()
    else:
        raise ValueError(f"operator.kernel={kind!r} is not one of {', '.join(map(repr, KERNELS))}")
    return kernel / kernel.sum()


def quadratic_kernel(size: int, generator: torch.Generator) -> torch.Tensor:
    """k^2 x k^2 matrix W: uniform [0, 1), strictly lower triangle zeroed, normalised to sum 1 (float64)."""
    draw = torch.rand(size * size, size * size, generator=generator, dtype=torch.float64)
    upper = torch.triu(draw)
    return upper / upper.sum()


class VolterraBlur2d(ForwardOperator):
    """Second-order Volterra blur with stride and scipy boundary handling.

    y(p) = w . x_p + a x_p^T W x_p, x_p = k*k window (row-major) of the padded image at s*p;
    x (B, H, W) -> y (B, ceil(H/s), ceil(W/s)). With a = 0 and stride 1 this is
    ``scipy.ndimage.correlate(x, w, mode=boundary)``.

    Parameters (all ``operator.*`` config fields):
        image_size: H = W (int) or [H, W]; in_shape = (H, W), no channel dimension.
        kernel_size: k, odd; window offsets -k//2 .. k//2.
        a: strength of the quadratic term (0 = linear blur).
        kernel: linear kernel w: "gaussian" (sigma = kernel_width), "motion" (a line of length
            kernel_width pixels at motion_angle degrees, counter-clockwise from the +column axis)
            or "random" (|N(0, 1)| draws, seeded). Always normalised to sum 1.
        stride: subsampling s of the output.
        boundary: "reflect" | "mirror" | "constant" (zeros) | "wrap" | "nearest", scipy.ndimage's meanings.
        seed: seeds W (drawn first) and the random w.
    Buffers: ``linear_kernel`` (k, k) and ``quadratic_kernel`` (k^2, k^2), float64.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 64,
        kernel_size: int = 5,
        a: float = 1.0,
        kernel: str = "gaussian",
        kernel_width: float = 1.0,
        motion_angle: float = 0.0,
        stride: int = 1,
        boundary: str = "reflect",
        seed: int = 0,
    ) -> None:
        super().__init__()
        height, width = _image_size(image_size)
        if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"operator.kernel_size={kernel_size!r} must be an odd positive integer (3, 5, 7, ...)")
        if isinstance(stride, bool) or int(stride) != stride or stride < 1:
            raise ValueError(f"operator.stride={stride!r} must be a positive integer")
        if boundary not in BOUNDARY_MODES:
            raise ValueError(
                f"operator.boundary={boundary!r} is not one of {', '.join(map(repr, BOUNDARY_MODES))} "
                "(scipy.ndimage names; torch's 'reflect' padding is 'mirror' here)"
            )
        if kernel not in KERNELS:
            raise ValueError(f"operator.kernel={kernel!r} is not one of {', '.join(map(repr, KERNELS))}")
        if not kernel_width > 0:
            raise ValueError(f"operator.kernel_width={kernel_width!r} must be positive")
        if not math.isfinite(a):
            raise ValueError(f"operator.a={a!r} must be a finite number")
        self.kernel_size, self.stride, self.boundary = int(kernel_size), int(stride), boundary
        self.a, self.kernel, self.kernel_width = float(a), kernel, float(kernel_width)
        self.motion_angle, self.seed = float(motion_angle), int(seed)
        self.in_shape = (height, width)
        self.out_shape = (-(-height // self.stride), -(-width // self.stride))

        generator = torch.Generator().manual_seed(self.seed)
        self.register_buffer("quadratic_kernel", quadratic_kernel(self.kernel_size, generator))
        w = linear_kernel(kernel, self.kernel_size, self.kernel_width, self.motion_angle, generator)
        self.register_buffer("linear_kernel", w)
        r = self.kernel_size // 2
        self.register_buffer("pad_rows", boundary_index(height, r, boundary), persistent=False)
        self.register_buffer("pad_cols", boundary_index(width, r, boundary), persistent=False)

    def metadata(self) -> dict:
        """Base metadata plus every parameter and both kernels (numpy float64)."""
        meta = super().metadata()
        meta.update(
            image_size=list(self.in_shape),
            kernel_size=self.kernel_size,
            a=self.a,
            kernel=self.kernel,
            kernel_width=self.kernel_width,
            motion_angle=self.motion_angle,
            stride=self.stride,
            boundary=self.boundary,
            seed=self.seed,
            linear_kernel=self.linear_kernel.detach().cpu().numpy().astype(np.float64),
            quadratic_kernel=self.quadratic_kernel.detach().cpu().numpy().astype(np.float64),
        )
        return meta

    def reference_point(self) -> torch.Tensor:
        """A mid-grey image (1, H, W) = 0.5: the middle of the patches' [0, 1] range."""
        return torch.full((1, *self.in_shape), 0.5, dtype=torch.float64, device=self.linear_kernel.device)

    # ------------------------------------------------------------- internals
    def _kernels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w flattened (k^2,) and W (k^2, k^2) in x's dtype and device."""
        w = self.linear_kernel.to(dtype=x.dtype, device=x.device).reshape(-1)
        return w, self.quadratic_kernel.to(dtype=x.dtype, device=x.device)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, H + 2r, W + 2r) by the boundary rule (copies only, no arithmetic)."""
        r = self.kernel_size // 2
        if self.boundary == "constant":
            return F.pad(x, (r, r, r, r))
        rows, cols = self.pad_rows.to(x.device), self.pad_cols.to(x.device)
        return x.index_select(1, rows).index_select(2, cols)

    def _pad_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """Exact adjoint of :meth:`_pad`: (B, H + 2r, W + 2r) -> (B, H, W), summing every copy back."""
        (height, width), r = self.in_shape, self.kernel_size // 2
        if self.boundary == "constant":
            return g[:, r : r + height, r : r + width]
        rows, cols = self.pad_rows.to(g.device), self.pad_cols.to(g.device)
        summed_rows = g.new_zeros(g.shape[0], height, g.shape[2]).index_add(1, rows, g)
        return g.new_zeros(g.shape[0], height, width).index_add(2, cols, summed_rows)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """Windows x_p of the padded image at the strided positions: (B, k^2, n_out)."""
        return F.unfold(self._pad(x)[:, None], self.kernel_size, stride=self.stride)

    def _window_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows, d y_p / d x_p = w + a (W + W^T) x_p), both (B, k^2, n_out)."""
        w, quad = self._kernels(x)
        windows = self._windows(x)
        if self.a == 0:
            return windows, w[None, :, None].expand_as(windows)
        return windows, w[None, :, None] + self.a * (quad + quad.T) @ windows

    # ------------------------------------------------------------- interface
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        w, quad = self._kernels(x)
        windows = self._windows(x)
        y = torch.einsum("i,bip->bp", w, windows)
        if self.a != 0:
            y = y + self.a * (windows * (quad @ windows)).sum(1)
        return y.reshape(x.shape[0], *self.out_shape)

    def _vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """J^T v = pad^T fold(v_p (w + a (W + W^T) x_p)); exact, differentiable."""
        _, grad = self._window_grad(x)
        padded = (x.shape[1] + self.kernel_size - 1, x.shape[2] + self.kernel_size - 1)
        weighted = grad * v.reshape(v.shape[0], 1, -1)
        folded = F.fold(weighted, padded, self.kernel_size, stride=self.stride)[:, 0]
        return self._pad_adjoint(folded)

    def _jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """Dense (B, n_out, n_in) for images of at most 32x32 pixels; use ``vjp`` beyond."""
        height, width = self.in_shape
        if height * width > MAX_JACOBIAN_PIXELS:
            raise ValueError(
                f"VolterraBlur2d.jacobian: a dense Jacobian is built only for images of at most 32x32 "
                f"({MAX_JACOBIAN_PIXELS} pixels), got {height}x{width}; use vjp(x, v) for J(x)^T v instead"
            )
        k, r = self.kernel_size, self.kernel_size // 2
        padded_w = width + 2 * r
        _, grad = self._window_grad(x)  # (B, k^2, n_out)
        # flat padded index of window element i at output p: top-left (s*row, s*col) + offset
        out_rows = torch.arange(self.out_shape[0], device=x.device) * self.stride
        out_cols = torch.arange(self.out_shape[1], device=x.device) * self.stride
        corner = (out_rows[:, None] * padded_w + out_cols[None, :]).reshape(-1)
        offset = (torch.arange(k, device=x.device)[:, None] * padded_w + torch.arange(k, device=x.device)).reshape(-1)
        index = (corner[:, None] + offset[None, :]).expand(x.shape[0], -1, -1)  # (B, n_out, k^2)
        rows = x.new_zeros(x.shape[0], self.n_out, (height + 2 * r) * padded_w)
        rows.scatter_(2, index, grad.transpose(1, 2))  # one window never repeats a padded pixel
        rows = self._pad_adjoint(rows.reshape(-1, height + 2 * r, padded_w))
        return rows.reshape(x.shape[0], self.n_out, self.n_in)


def _image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``operator.image_size`` (int or [H, W]) to (H, W), with a clear error."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    else:
        try:
            size = tuple(int(s) for s in image_size if int(s) == s)
            valid = len(size) == 2 and len(size) == len(image_size)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"operator.image_size={image_size!r} must be an int or a pair [H, W]")
    if min(size) < 1:
        raise ValueError(f"operator.image_size={image_size!r} must be positive")
    return size
