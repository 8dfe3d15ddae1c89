"""The forward-operator contract every measurement model in deepunroll follows.

y = F(x), batched over a leading dimension: x (B, *in_shape) -> y (B, *out_shape).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ForwardOperator(nn.Module):
    """A differentiable, batched forward model y = F(x).

    Subclasses set ``in_shape`` / ``out_shape`` (per-sample shapes, without the
    batch dimension) and implement :meth:`_forward`. ``vjp`` and ``jacobian``
    default to autograd; subclasses override ``_vjp`` / ``_jacobian`` /
    ``misfit_grad`` with faster exact versions. Public methods validate their
    inputs and keep the input's device and dtype.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def n_in(self) -> int:
        """Number of unknowns per sample (prod of ``in_shape``)."""
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        """Number of measurements per sample (prod of ``out_shape``)."""
        return math.prod(self.out_shape)

    def metadata(self) -> dict:
        """Everything that defines the measurement model, stored with datasets and checked on load.

        Values are str / int / float / bool / lists / numpy arrays. Subclasses extend it.
        """
        return {"operator": type(self).__name__, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape)}

    # ----------------------------------------------------------- validation
    def check_input(self, x: torch.Tensor, name: str = "x", shape: tuple[int, ...] | None = None) -> None:
        """Raise ``ValueError``/``TypeError`` unless ``x`` is a floating (B, *shape) tensor."""
        shape = self.in_shape if shape is None else tuple(shape)
        cls = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{cls}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{cls}: {name} must be float32 or float64, got dtype {x.dtype}")
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"{cls}: {name} must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}"
            )

    def reference_point(self) -> torch.Tensor:
        """A typical input x_ref (1, *in_shape), float64, at which data-fit scales are measured
        (:mod:`deepunroll.nets.direction`); zeros unless a subclass knows better (EIT: unit conductivity)."""
        return torch.zeros((1, *self.in_shape), dtype=torch.float64, device=self._device())

    def observed(self, y: torch.Tensor) -> torch.Tensor | None:
        """(B, n_out) bool: the entries of measurements y (B, *out_shape) that carry data, or None when all do
        (the default). Operators whose data may miss rows per sample (the KTC2023 tank's removed electrodes)
        say which, and leave the rest out of their ``misfit_grad``; the data-fit directions and initial guesses
        then ignore the rest."""
        return None

    def element_mesh(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(nodes (N, 2), elements (E, 3)) when x holds one value per triangle of a mesh (EIT, CEM), else None;
        mesh convolutions (``net.step.block=mesh``) read it."""
        return None

    def _device(self) -> torch.device:
        buffer = next(iter(self.buffers()), None)
        return buffer.device if buffer is not None else torch.device("cpu")

    # ------------------------------------------------------------ interface
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): (B, *in_shape) -> (B, *out_shape)."""
        self.check_input(x)
        return self._forward(x)

    def vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """J(x)^T v: x (B, *in_shape), v (B, *out_shape) -> (B, *in_shape)."""
        self.check_input(x)
        self.check_input(v, "v", self.out_shape)
        return self._vjp(x, v)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """Dense Jacobian dF/dx: (B, *in_shape) -> (B, n_out, n_in)."""
        self.check_input(x)
        return self._jacobian(x)

    def misfit_grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of 1/2 ||F(x) - y||^2, i.e. J(x)^T (F(x) - y): (B, *in_shape)."""
        self.check_input(y, "y", self.out_shape)
        return self.vjp(x, self.forward(x) - y)

    def linearize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F(x) (B, *out_shape), dense Jacobian (B, n_out, n_in)); subclasses share one solve between them."""
        return self.forward(x), self.jacobian(x)

    # ------------------------------------------------------- autograd defaults
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keep_graph = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self._forward(x_in), x_in, v, create_graph=keep_graph)
        return grad

    def _jacobian(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            y = self._forward(x_in).reshape(batch, self.n_out)
            basis = torch.eye(self.n_out, dtype=y.dtype, device=y.device)
            basis = basis[:, None, :].expand(self.n_out, batch, self.n_out)
            (rows,) = torch.autograd.grad(y, x_in, basis, is_grads_batched=True)
        return rows.reshape(self.n_out, batch, self.n_in).transpose(0, 1)

    # ----------------------------------------------------------- self-checks
    def check_vjp(self, x: torch.Tensor, v: torch.Tensor | None = None, eps: float = 1e-6) -> dict[str, float]:
        """Relative errors of ``vjp`` against autograd and against central finite differences.

        Returns ``{"autograd": e1, "finite_difference": e2}``; use float64 inputs.
        The finite-difference check compares <J^T v, u> with <v, (F(x+eps u) - F(x-eps u)) / 2 eps>
        for a random direction u.
        """
        if v is None:
            v = torch.randn((x.shape[0], *self.out_shape), dtype=x.dtype, device=x.device)
        ours = self.vjp(x, v)
        reference = ForwardOperator._vjp(self, x, v)
        u = torch.randn_like(x)
        with torch.no_grad():
            fd = (self.forward(x + eps * u) - self.forward(x - eps * u)) / (2 * eps)
        lhs = (ours * u).flatten(1).sum(1)
        rhs = (v * fd).flatten(1).sum(1)
        return {
            "autograd": _rel_err(ours, reference),
            "finite_difference": _rel_err(lhs, rhs),
        }

    def check_jacobian(self, x: torch.Tensor, eps: float = 1e-6) -> dict[str, float]:
        """Relative errors of ``jacobian`` against autograd and central finite differences (float64)."""
        ours = self.jacobian(x)
        reference = ForwardOperator._jacobian(self, x)
        flat = x.reshape(x.shape[0], self.n_in)
        columns = []
        with torch.no_grad():
            for j in range(self.n_in):
                step = torch.zeros_like(flat)
                step[:, j] = eps
                plus = self.forward((flat + step).reshape(x.shape)).reshape(x.shape[0], self.n_out)
                minus = self.forward((flat - step).reshape(x.shape)).reshape(x.shape[0], self.n_out)
                columns.append((plus - minus) / (2 * eps))
        fd = torch.stack(columns, dim=-1)
        return {"autograd": _rel_err(ours, reference), "finite_difference": _rel_err(ours, fd)}


def product_per_pattern(observed: torch.Tensor, r: torch.Tensor, matrix_of, n: int) -> torch.Tensor:
    """Each row of r (B, M) times ``matrix_of(pattern)`` (n, M) transposed, where pattern (M,) bool is that row's
    row of ``observed`` (B, M) (:meth:`ForwardOperator.observed`): one product per distinct pattern in the batch,
    not per sample. Returns (B, n)."""
    patterns, which = torch.unique(observed, dim=0, return_inverse=True)
    out = r.new_empty((r.shape[0], n))
    for index, pattern in enumerate(patterns):
        rows = which == index
        out[rows] = r[rows] @ matrix_of(pattern).T
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
