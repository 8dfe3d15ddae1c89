"""Energies for :class:`deepunroll.nets.argmin.ArgminLayer`: E(x; *theta) -> (B,) per-sample values.

An energy is an ``nn.Module`` whose ``forward(x, *theta)`` returns one value per sample and
whose ``init(*theta)`` gives a starting point. Smooth energies add ``lipschitz(*theta)`` (a
bound on the Lipschitz constant of grad_x E, per sample) for the gradient solver; the
labelling energy adds ``unary`` and a graph colouring for the ICM solver.
"""

from __future__ import annotations

import torch
from torch import nn


def huber(d: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber function: d^2 / (2 delta) for |d| <= delta, |d| - delta / 2 otherwise."""
    a = d.abs()
    return torch.where(a <= delta, d * d / (2 * delta), a - delta / 2)


def forward_differences(x: torch.Tensor, ndim: int) -> list[torch.Tensor]:
    """(D_d x) for each of the last ``ndim`` axes: x[i+1] - x[i], zero at the last index (Neumann)."""
    diffs = []
    for axis in range(x.dim() - ndim, x.dim()):
        d = torch.diff(x, dim=axis)
        pad_shape = list(d.shape)
        pad_shape[axis] = 1
        diffs.append(torch.cat([d, d.new_zeros(pad_shape)], dim=axis))
    return diffs


class HuberTVEnergy(nn.Module):
    """E(x; y, w) = 1/2 ||A x - y||^2 + sum_i w_i sum_d huber_delta((D_d x)_i) + ridge/2 ||x||^2.

    x (B, *in_shape) with ``ndim`` spatial axes (1: signals / per-element vectors, 2: images);
    y (B, *out_shape); w (B, *in_shape) non-negative per-pixel (per-element) weights, e.g. the
    output of a network. A is a *linear* operator (a ``ForwardOperator`` such as the toy or blur
    model at a=0, or any module with ``in_shape``), or None for the identity (denoising).
    Strongly convex when A has trivial null space or ridge > 0.
    """

    def __init__(self, operator: nn.Module | None = None, ndim: int = 1, delta: float = 0.05, ridge: float = 0.0):
        super().__init__()
        if ndim not in (1, 2):
            raise ValueError(f"HuberTVEnergy: ndim must be 1 or 2, got {ndim}")
        if not delta > 0:
            raise ValueError(f"HuberTVEnergy: delta must be > 0, got {delta}")
        if not ridge >= 0:
            raise ValueError(f"HuberTVEnergy: ridge must be >= 0, got {ridge}")
        self.operator, self.ndim, self.delta, self.ridge = operator, ndim, float(delta), float(ridge)
        self._op_norm2: float | None = None

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """E(x; y, w): (B,)."""
        residual = (x if self.operator is None else self.operator(x)) - y
        energy = 0.5 * residual.flatten(1).pow(2).sum(1)
        for d in forward_differences(x, self.ndim):
            energy = energy + (w * huber(d, self.delta)).flatten(1).sum(1)
        if self.ridge:
            energy = energy + 0.5 * self.ridge * x.flatten(1).pow(2).sum(1)
        return energy

    def init(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Starting point: y for the identity, zeros otherwise."""
        if self.operator is None:
            return y.detach().clone()
        return y.new_zeros((y.shape[0], *self.operator.in_shape))

    def lipschitz(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-sample bound ||A||^2 + 4 ndim max(w) / delta + ridge on the Lipschitz constant of grad_x E."""
        w = w.detach().clamp_min(0)
        w_max = w.flatten(1).amax(1) if w.dim() > 1 else w.reshape(-1)  # (B,), (1,) or a scalar's (1,)
        return self.operator_norm2(y) + 4 * self.ndim * w_max / self.delta + self.ridge

    def operator_norm2(self, like: torch.Tensor) -> float:
        """||A||^2 by 50 power iterations on A^T A (cached; +2 % safety), 1 for the identity."""
        if self.operator is None:
            return 1.0
        if self._op_norm2 is None:
            gen = torch.Generator().manual_seed(0)
            v = torch.randn((1, *self.operator.in_shape), generator=gen, dtype=torch.float64).to(like.device)
            estimate = 0.0
            for _ in range(50):
                with torch.enable_grad():
                    v_in = (v / v.norm()).requires_grad_()
                    out = self.operator(v_in.to(like.dtype))
                    (v,) = torch.autograd.grad(out, v_in, out)
                estimate = float(v.norm())
            self._op_norm2 = 1.02 * estimate
        return self._op_norm2


class LabelEnergy(nn.Module):
    """E(x; z) = sum_e (x_e - z_e)^2 + mu * sum_{(e,f) in edges} [x_e != x_f],  x_e in ``labels``.

    z (B, n) (or (B, *shape), flattened): e.g. a conductivity per EIT element; labels: the known
    values (e.g. tissue conductivities); edges (n_edges, 2): neighbour pairs (element indices
    into the flattened z), required when mu > 0. Minimised by :class:`deepunroll.nets.argmin.ICM`;
    exactly (nearest label) when mu = 0. x* is piecewise constant in z: its derivative is zero
    almost everywhere.
    """

    def __init__(self, labels: list[float], mu: float = 0.0, edges=None, colouring_seed: int = 0):
        super().__init__()
        labels = torch.as_tensor(labels, dtype=torch.float64).flatten()
        if labels.numel() == 0:
            raise ValueError("LabelEnergy: labels must hold at least one value, got []")
        if not mu >= 0:
            raise ValueError(f"LabelEnergy: mu must be >= 0, got {mu}")
        edges = torch.zeros((0, 2), dtype=torch.long) if edges is None else torch.as_tensor(edges, dtype=torch.long)
        if edges.dim() != 2 or edges.shape[1] != 2:
            raise ValueError(f"LabelEnergy: edges must have shape (n_edges, 2), got {tuple(edges.shape)}")
        if mu > 0 and edges.numel() == 0:
            raise ValueError("LabelEnergy: mu > 0 needs edges (the neighbour pairs)")
        self.mu = float(mu)
        self.register_buffer("labels", labels)
        self.register_buffer("edges", edges)
        n_nodes = int(edges.max()) + 1 if edges.numel() else 0
        self.register_buffer("colours", greedy_colouring(edges, n_nodes, colouring_seed))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """E(x; z): (B,). The Potts term does not depend on z (and carries no gradient)."""
        x, z = x.flatten(1), z.flatten(1)
        energy = (x - z).pow(2).sum(1)
        if self.mu and self.edges.numel():
            energy = energy + self.mu * (x[:, self.edges[:, 0]] != x[:, self.edges[:, 1]]).sum(1).to(z.dtype)
        return energy

    def unary(self, z: torch.Tensor, linear: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element, per-label cost (l - z_e)^2 + linear_e * l: (B, n, n_labels)."""
        labels = self.labels.to(z)
        cost = (labels - z.flatten(1)[..., None]).pow(2)
        if linear is not None:
            cost = cost + linear.flatten(1)[..., None] * labels
        return cost

    def init(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest label per element, shaped like z."""
        return self.labels.to(z)[self.unary(z).argmin(-1)].reshape(z.shape)


def greedy_colouring(edges: torch.Tensor, n_nodes: int, seed: int = 0) -> torch.Tensor:
    """Proper colouring of a graph (Jones-Plassmann rounds, vectorised): (n_nodes,) colour ids.

    Each round colours the uncoloured nodes whose random priority beats every uncoloured
    neighbour, so every colour class is an independent set.
    """
    colours = torch.full((n_nodes,), -1, dtype=torch.long)
    if n_nodes == 0:
        return colours
    priority = torch.randperm(n_nodes, generator=torch.Generator().manual_seed(seed))
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    for colour in range(n_nodes):
        uncoloured = colours < 0
        if not uncoloured.any():
            break
        live = torch.where(uncoloured, priority, -1)
        best_neighbour = torch.full((n_nodes,), -1, dtype=torch.long).scatter_reduce(0, dst, live[src], "amax")
        colours[uncoloured & (priority > best_neighbour)] = colour
    return colours

