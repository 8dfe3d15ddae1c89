"""deepunroll operators as deepinv physics (``pip install -e ".[deepinv]"``).

:class:`OperatorPhysics` wraps any :class:`~deepunroll.operators.base.ForwardOperator` (EIT, the complete
electrode model, the Volterra blurs, the toy) as a ``deepinv.physics.Physics``: ``A`` is the operator's
forward map and ``A_vjp`` its exact adjoint (``operator.vjp``: for EIT the adjoint-field formula, not
autograd through the FEM solve), so deepinv's data fidelities (``L2().grad`` calls ``A_vjp``) and its
optimisation and unfolded algorithms run on our problems. deepinv works on images (B, C, H, W): operators
with a 2D ``in_shape`` (H, W) get a channel axis of size 1 on both sides (``channel_axis``); others keep
their shapes (EIT: (B, n_elems) in, (B, n_meas) out). Nonlinear operators have no ``A_adjoint``: give
deepinv's algorithms an ``init`` (e.g. ``physics.reference_point(y)`` or a Gauss-Newton image).
"""

from __future__ import annotations

import torch

try:
    from deepinv.physics import Physics
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("deepunroll.interop.deepinv needs deepinv: pip install -e \".[deepinv]\"") from error

from deepunroll.operators.base import ForwardOperator


class OperatorPhysics(Physics):
    """deepinv physics y = noise(F(x)) of a deepunroll operator F.

    operator: the forward operator; noise_model: a deepinv noise model (default: none);
    channel_axis: add a size-1 channel axis on x and y (default: when ``in_shape`` is 2D).
    """

    def __init__(self, operator: ForwardOperator, noise_model=None, channel_axis: bool | None = None,
                 **kwargs) -> None:
        if not isinstance(operator, ForwardOperator):
            raise TypeError(f"OperatorPhysics needs a deepunroll ForwardOperator, got {type(operator).__name__}")
        super().__init__(noise_model=noise_model, **kwargs)
        self.operator = operator
        self.channel_axis = len(operator.in_shape) == 2 if channel_axis is None else bool(channel_axis)

    def _ours(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if self.channel_axis else t

    def _theirs(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None] if self.channel_axis else t

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """F(x): (B, [1,] *in_shape) -> (B, [1,] *out_shape)."""
        return self._theirs(self.operator(self._ours(x)))

    def A_vjp(self, x: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        """J(x)^T v by the operator's exact adjoint: x (B, [1,] *in_shape), v (B, [1,] *out_shape)."""
        return self._theirs(self.operator.vjp(self._ours(x), self._ours(v)))

    def reference_point(self, y: torch.Tensor) -> torch.Tensor:
        """The operator's typical input (EIT: unit conductivity) for every sample of y, as an ``init``."""
        x_ref = self.operator.reference_point().to(dtype=y.dtype, device=y.device)
        return self._theirs(x_ref.expand(y.shape[0], *self.operator.in_shape).clone())


class PhysicsOperator(ForwardOperator):
    """A deepinv physics as a deepunroll operator on single-channel images: x (B, H, W) -> y (B, *out_shape).

    physics: a ``deepinv.physics.Physics`` (e.g. ``Blur``, ``Inpainting``, ``Tomography``) acting on
    (B, 1, H, W); image_size: H = W or [H, W]; name: a label for the dataset fingerprint (default: the
    physics' class). The output shape is found by one probe; a single output channel is dropped. ``vjp`` is
    deepinv's ``A_vjp`` (its ``A_adjoint`` for linear physics). Parameters and buffers of the physics
    (a blur's filter, an inpainting mask) are part of :meth:`metadata`.
    """

    def __init__(self, physics: Physics, image_size, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(physics, Physics):
            raise TypeError(f"operator.physics must be a deepinv.physics.Physics, got {type(physics).__name__}")
        size = [int(image_size)] * 2 if isinstance(image_size, (int, float)) else [int(s) for s in image_size]
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"operator.image_size must be a positive int or [H, W], got {image_size!r}")
        self.physics, self.name = physics.to(torch.float64), name or type(physics).__name__  # physics in float64
        self.in_shape = tuple(size)
        with torch.no_grad():
            probe = physics.A(torch.zeros(1, 1, *size, dtype=torch.float64))
        self._squeeze = probe.dim() > 1 and probe.shape[1] == 1
        self.out_shape = tuple(probe.shape[2:] if self._squeeze else probe.shape[1:])

    def _theirs(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None] if self._squeeze else t

    def _ours(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, 0] if self._squeeze else t

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ours(self.physics.A(x[:, None].double())).to(x.dtype)

    def _vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.physics.A_vjp(x[:, None].double(), self._theirs(v).double())[:, 0].to(x.dtype)

    def dagger(self, y: torch.Tensor) -> torch.Tensor:
        """deepinv's ``A_dagger`` (pseudo-inverse) of y (B, *out_shape) -> (B, H, W) in y's dtype: an initial
        guess."""
        return self.physics.A_dagger(self._theirs(y).double())[:, 0].to(y.dtype)

    def metadata(self) -> dict:
        tensors = dict(self.physics.named_parameters()) | dict(self.physics.named_buffers())
        return super().metadata() | {"physics": self.name} | {
            f"physics.{key}": value.detach().cpu().double().numpy() for key, value in sorted(tensors.items())
            if value.is_floating_point() and value.numel() > 0}  # a blur's filter, a mask; not RNG states


class PseudoInverse:
    """x0 = A^dagger y of a :class:`PhysicsOperator` (``x0=deepinv_dagger``)."""

    def __call__(self, operator: PhysicsOperator, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(operator, PhysicsOperator):
            raise ValueError(f"x0=deepinv_dagger needs operator=deepinv_*, got {type(operator).__name__}")
        return operator.dagger(y)

    def metadata(self) -> dict:
        return {"initial_guess": "PseudoInverse"}


def gaussian_filter(sigma, angle: float = 0.0) -> torch.Tensor:
    """deepinv's 2D Gaussian blur filter (1, 1, h, w) for sigma = s or [s_row, s_col] pixels (configs give lists;
    deepinv wants a tuple, and a scalar gives a 1D filter)."""
    from deepinv.physics.functional.blur import gaussian_blur

    sigmas = (float(sigma),) * 2 if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    return gaussian_blur(sigma=sigmas, angle=float(angle))


class _DenoiserBlock(torch.nn.Module):
    """deepinv denoiser (in -> in channels) then a 1x1 convolution to ``out`` channels (zero at the start with
    ``zero_init``, so a residual step starts as the identity)."""

    def __init__(self, model: torch.nn.Module, in_channels: int, out_channels: int, zero_init: bool,
                 noise_level: bool) -> None:
        super().__init__()
        self.model, self.noise_level = model, noise_level
        self.head = torch.nn.Conv2d(in_channels, out_channels, kernel_size=1)
        if zero_init:
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model(x, 0.0) if self.noise_level else self.model(x)  # DRUNet: a zero noise-level map
        return self.head(features)


def denoiser_block(kind: str, in_channels: int, out_channels: int, hidden: int = 32, n_conv: int = 4, dim: int = 2,
                   zero_init: bool = False) -> torch.nn.Module:
    """deepinv's DnCNN (``n_conv`` convolutions of ``hidden`` features) or DRUNet (4 scales of hidden, 2, 4, 8
    hidden features, ``n_conv - 2`` (at least 1) residual blocks per scale; H and W divisible by 8) as a learned
    block of an unrolled step, random weights (no download)."""
    from deepinv.models import DRUNet, DnCNN

    if dim != 2:
        raise ValueError(f"net.step.block={kind!r} works on images (2D); this problem's iterate is {dim}D")
    if kind == "dncnn":
        model = DnCNN(in_channels, in_channels, depth=max(n_conv, 2), nf=hidden, pretrained=None)
    elif kind == "drunet":
        widths = (hidden, 2 * hidden, 4 * hidden, 8 * hidden)
        model = DRUNet(in_channels, in_channels, nc=widths, nb=max(n_conv - 2, 1), pretrained=None, device="cpu")
    else:
        raise ValueError(f"denoiser_block: kind must be 'dncnn' or 'drunet', got {kind!r}")
    return _DenoiserBlock(model, in_channels, out_channels, zero_init, noise_level=kind == "drunet")
