"""Embedded optimisation layers x*(theta) = argmin_x E(x; theta), with a choice of backward.

backward:
  ``unroll``           autograd through every solver iteration (memory grows with iterations).
  ``implicit``         implicit function theorem: solve H v = g (H = d^2E/dx^2 at x*, conjugate
                       gradients on Hessian-vector products), grad_theta = -(d^2E/dtheta dx) v.
                       Needs a smooth, strongly convex E.
  ``lagrangian``       Lagrangian proximal gradient descent of Paulus, Martius, Musil, "LPGD: a
                       general framework for backpropagation through embedded optimization
                       layers", ICML 2024, arXiv:2407.05920 (not this toolkit's learned proximal
                       gradient descent, ``lpgd.py``). Re-solve x_tau = argmin_x E(x; theta) + tau <g, x>
                       (warm-started from x*) and return
                       right:   (grad_theta E(x_+tau) - grad_theta E(x*)) / tau,
                       left:    (grad_theta E(x*) - grad_theta E(x_-tau)) / tau,
                       central: (grad_theta E(x_+tau) - grad_theta E(x_-tau)) / (2 tau).
                       -> (dx*/dtheta)^T g as tau -> 0 on smooth strongly convex E (error O(tau),
                       central O(tau^2)); at finite tau the gradient of a smoothed loss, non-zero
                       where the true derivative vanishes (discrete layers). A solver tolerance
                       is measured against the O(tau) move from x* (``GradientDescent``,
                       ``relative_to_start``), so the gradient error is O(tol) at any tau for
                       central; one-sided variants also divide the forward solve's error by tau
                       (a warning when tol > tau / 100).
  ``straight_through`` identity backward: g goes to theta[0] (which must be shaped like x).
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch import nn
from torch.autograd.function import once_differentiable

BACKWARDS = ("unroll", "implicit", "lagrangian", "straight_through")
SIDES = ("left", "right", "central")


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product: (B, ...) x (B, ...) -> (B,)."""
    return (a * b).flatten(1).sum(1)


def _per_sample(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) or scalar tensor to broadcast against (B, ...)."""
    return s.reshape(-1, *([1] * (like.dim() - 1)))


class GradientDescent:
    """Minimise E(x; theta) + <linear, x> by gradient descent with a fixed step (FISTA if accelerated).

    x_{k+1} = v_k - step grad_x E(v_k), v_{k+1} = x_{k+1} + (t_k - 1) / t_{k+1} (x_{k+1} - x_k), with
    per-sample adaptive restart (t = 1 where <v_k - x_{k+1}, x_{k+1} - x_k> > 0). step = 1 /
    energy.lipschitz(*theta) unless given. Stops after n_iter, or once every sample has
    ||x_{k+1} - x_k|| <= tol ||x_{k+1}|| (tol > 0); with ``relative_to_start=True`` once
    ||x_{k+1} - x_k|| <= tol ||x_{k+1} - x0||, the distance travelled from the warm start. The
    Lagrangian backward uses the latter: its perturbed solve starts at x* and moves O(tau), so a rule
    relative to ||x|| would stop it after one step when tau <~ tol (the gradient then is mostly
    solver error / tau); relative to the displacement, the error stays O(tol) at any tau.
    ``n_iter_run`` records the iterations done.
    """

    def __init__(self, n_iter: int = 100, step: float | None = None, accelerated: bool = True, tol: float = 0.0):
        if int(n_iter) < 1:
            raise ValueError(f"GradientDescent: n_iter must be >= 1, got {n_iter}")
        if step is not None and not step > 0:
            raise ValueError(f"GradientDescent: step must be > 0 or None (1 / energy.lipschitz), got {step}")
        if not tol >= 0:
            raise ValueError(f"GradientDescent: tol must be >= 0, got {tol}")
        self.n_iter, self.step, self.accelerated, self.tol = int(n_iter), step, bool(accelerated), float(tol)
        self.n_iter_run = 0

    def __call__(self, energy, theta, x0, linear=None, create_graph=False, relative_to_start=False):
        """x (B, ...) ~ argmin_x E(x; *theta) + <linear, x>; differentiable in theta iff create_graph."""
        if self.step is not None:
            step = torch.as_tensor(self.step, dtype=x0.dtype, device=x0.device)
        else:
            step = 1.0 / energy.lipschitz(*[t.detach() for t in theta]).to(x0)
        step = _per_sample(step, x0)
        if not create_graph:
            theta, x0 = [t.detach() for t in theta], x0.detach()
        x = v = x0
        t = x0.new_ones((x0.shape[0],))
        for k in range(self.n_iter):
            x_new = v - step * self._grad(energy, v, theta, linear, create_graph)
            if self.accelerated:
                restart = _bdot(v - x_new, x_new - x) > 0
                t = torch.where(restart, torch.ones_like(t), t)
                t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
                v = x_new + _per_sample((t - 1) / t_new, x0) * (x_new - x)
                t = t_new
            else:
                v = x_new
            change = (x_new - x).detach().flatten(1).norm(dim=1)
            x = x_new
            if self.tol > 0:
                scale = (x - x0 if relative_to_start else x).detach().flatten(1).norm(dim=1)
                if bool((change <= self.tol * scale).all()):
                    break
        self.n_iter_run = k + 1
        return x

    @staticmethod
    def _grad(energy, x, theta, linear, create_graph):
        with torch.enable_grad():
            x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_()
            (grad,) = torch.autograd.grad(energy(x_in, *theta).sum(), x_in, create_graph=create_graph)
        return grad if linear is None else grad + linear


class ICM:
    """Iterated conditional modes for :class:`~deepunroll.nets.energies.LabelEnergy` (+ <linear, x>).

    Exact nearest label when mu = 0. Otherwise up to ``n_sweeps`` sweeps from the warm start x0;
    a sweep visits the colour classes of the neighbour graph in turn and moves every element of a
    class to its best label given its neighbours (only on a strict decrease), so E never rises.
    With create_graph the result is returned as x + 0 * z: the true derivative, zero a.e.
    """

    def __init__(self, n_sweeps: int = 5):
        if int(n_sweeps) < 1:
            raise ValueError(f"ICM: n_sweeps must be >= 1, got {n_sweeps}")
        self.n_sweeps = int(n_sweeps)
        self.n_iter_run = 0

    def __call__(self, energy, theta, x0, linear=None, create_graph=False):
        (z,) = theta
        cost = energy.unary(z.detach(), linear)  # (B, n, L)
        labels = energy.labels.to(z)
        self.n_iter_run = 0
        if energy.mu == 0 or energy.edges.numel() == 0:
            index = cost.argmin(-1)
        else:
            index = (x0.detach().flatten(1)[..., None] - labels).abs().argmin(-1)  # snap warm start to labels
            index = self._sweeps(energy, cost, index)
        x = labels[index].reshape(z.shape)
        return x + 0 * z if create_graph else x

    def _sweeps(self, energy, cost, index):
        n_labels = cost.shape[-1]
        src = torch.cat([energy.edges[:, 0], energy.edges[:, 1]]).to(cost.device)
        dst = torch.cat([energy.edges[:, 1], energy.edges[:, 0]]).to(cost.device)
        colours = energy.colours.to(cost.device)
        degree = torch.zeros(cost.shape[1], dtype=cost.dtype, device=cost.device).index_add_(
            0, dst, torch.ones_like(dst, dtype=cost.dtype))
        for sweep in range(self.n_sweeps):
            before = index
            for colour in range(int(colours.max()) + 1):
                agree = torch.zeros_like(cost).index_add_(
                    1, dst, nn.functional.one_hot(index[:, src], n_labels).to(cost.dtype))
                total = cost + energy.mu * (degree[:, None] - agree)
                best_cost, best = total.min(-1)
                better = (best_cost < total.gather(-1, index[..., None])[..., 0]) & (colours == colour)
                index = torch.where(better, best, index)
            self.n_iter_run = sweep + 1
            if torch.equal(index, before):
                break
        return index


class ArgminLayer(nn.Module):
    """x*(theta) = argmin_x E(x; theta): theta = tensors batched over dim 0 -> x (B, ...).

    energy: module with forward(x, *theta) -> (B,) and init(*theta) -> x0 (see ``energies.py``);
    learnable energy parameters (``energy.parameters()``) get gradients too.
    solver: callable(energy, theta, x0, linear=None, create_graph=False) -> x, e.g.
    :class:`GradientDescent` or :class:`ICM`; runs without a graph except for ``unroll``.
    backward: one of ``BACKWARDS`` (module docstring); tau > 0, side in ``SIDES`` for
    ``lagrangian``; cg_iters / cg_tol for ``implicit``.
    """

    def __init__(self, energy: nn.Module, solver, backward: str = "implicit", tau: float = 1e-3,
                 side: str = "central", cg_iters: int = 200, cg_tol: float = 1e-12):
        super().__init__()
        if backward not in BACKWARDS:
            raise ValueError(f"ArgminLayer: backward={backward!r} is not one of {BACKWARDS}")
        if side not in SIDES:
            raise ValueError(f"ArgminLayer: side={side!r} is not one of {SIDES}")
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"ArgminLayer: tau must be a finite number > 0, got {tau}")
        if int(cg_iters) < 1 or not cg_tol >= 0:
            raise ValueError(f"ArgminLayer: need cg_iters >= 1 and cg_tol >= 0, got {cg_iters}, {cg_tol}")
        self.energy, self.solver, self.backward = energy, solver, backward
        self.tau, self.side, self.cg_iters, self.cg_tol = float(tau), side, int(cg_iters), float(cg_tol)
        tol = float(getattr(solver, "tol", 0.0))
        if backward == "lagrangian" and side != "central" and tol > 0.01 * tau:
            warnings.warn(f"ArgminLayer: lagrangian side={side!r} with solver tol={tol:g} > tau/100 (tau={tau:g}): "
                          f"the one-sided difference divides the forward solve's error by tau (relative gradient "
                          f"error of order tol/tau = {tol / tau:.1g}); use side='central', which cancels it, or a "
                          f"solver tol <= tau/100", stacklevel=2)

    def forward(self, *theta: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """x*(theta), solved from the warm start x0 (default energy.init(*theta))."""
        if x0 is None:
            with torch.no_grad():
                x0 = self.energy.init(*theta)
        if self.backward == "unroll":
            return self.solver(self.energy, theta, x0, create_graph=True)
        params = tuple(p for p in self.energy.parameters() if p.requires_grad)
        return _ArgminFunction.apply(self, x0, len(theta), *theta, *params)

    # ------------------------------------------------------------- backwards
    def _grad_theta(self, x, theta, params, needs):
        """grad_theta E(x; theta) for the inputs in ``needs`` (None elsewhere)."""
        with torch.enable_grad():
            theta_in = [t.detach().requires_grad_(n) for t, n in zip(theta, needs)]
            wrt = [t for t, n in zip(theta_in + list(params), needs) if n]
            energy = self.energy(x.detach(), *theta_in).sum()
            grads = iter(torch.autograd.grad(energy, wrt, allow_unused=True, materialize_grads=True))
        return [next(grads) if n else None for n in needs]

    def _lagrangian(self, x, theta, params, g, needs):
        # a solver with a relative stop rule measures it against the O(tau) move from x* (GradientDescent)
        takes = "relative_to_start" in inspect.signature(self.solver).parameters
        extra = {"relative_to_start": True} if takes else {}

        def perturbed(sign):
            x_tau = self.solver(self.energy, theta, x, linear=sign * self.tau * g, **extra)
            return self._grad_theta(x_tau, theta, params, needs)

        plus = perturbed(+1.0) if self.side in ("right", "central") else self._grad_theta(x, theta, params, needs)
        minus = perturbed(-1.0) if self.side in ("left", "central") else self._grad_theta(x, theta, params, needs)
        scale = 2 * self.tau if self.side == "central" else self.tau
        return [None if p is None else (p - m) / scale for p, m in zip(plus, minus)]

    def _implicit(self, x, theta, params, g, needs):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_()
            theta_in = [t.detach().requires_grad_(n) for t, n in zip(theta, needs)]
            (grad_x,) = torch.autograd.grad(self.energy(x_in, *theta_in).sum(), x_in, create_graph=True)

            def hvp(v):
                (hv,) = torch.autograd.grad(grad_x, x_in, v, retain_graph=True, allow_unused=True,
                                            materialize_grads=True)
                return hv

            v = batched_cg(hvp, g, self.cg_iters, self.cg_tol)
            wrt = [t for t, n in zip(theta_in + list(params), needs) if n]
            grads = iter(torch.autograd.grad(grad_x, wrt, -v, allow_unused=True, materialize_grads=True))
        return [next(grads) if n else None for n in needs]


class _ArgminFunction(torch.autograd.Function):
    """Solve without a graph; backward by the layer's ``implicit`` / ``lagrangian`` / ``straight_through``."""

    @staticmethod
    def forward(ctx, layer, x0, n_theta, *inputs):
        theta = inputs[:n_theta]
        x = layer.solver(layer.energy, theta, x0)
        ctx.layer, ctx.n_theta, ctx.params = layer, n_theta, inputs[n_theta:]
        ctx.save_for_backward(x, *theta)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, *theta = ctx.saved_tensors
        layer, needs = ctx.layer, ctx.needs_input_grad[3:]
        if layer.backward == "straight_through":
            if needs[0] and theta[0].shape != g.shape:
                raise ValueError(f"ArgminLayer: straight_through needs theta[0] shaped like x {tuple(g.shape)}, "
                                 f"got {tuple(theta[0].shape)}")
            grads = [g if i == 0 and n else None for i, n in enumerate(needs)]
        elif layer.backward == "implicit":
            grads = layer._implicit(x, theta, ctx.params, g, needs)
        else:
            grads = layer._lagrangian(x, theta, ctx.params, g, needs)
        return (None, None, None, *grads)


def batched_cg(matvec, b: torch.Tensor, n_iter: int, tol: float) -> torch.Tensor:
    """Conjugate gradients per sample for A v = b, A symmetric positive definite: (B, ...) -> (B, ...).

    Stops a sample once ||r|| <= tol ||b||; at most n_iter matrix-vector products.
    """
    v = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = _bdot(r, r)
    threshold = (tol ** 2) * rr
    for _ in range(n_iter):
        active = rr > threshold
        if not bool(active.any()):
            break
        ap = matvec(p)
        alpha = torch.where(active, rr / _bdot(p, ap).clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rr))
        v = v + _per_sample(alpha, b) * p
        r = r - _per_sample(alpha, b) * ap
        rr_new = _bdot(r, r)
        beta = torch.where(active, rr_new / rr.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rr))
        p = r + _per_sample(beta, b) * p
        rr = torch.where(active, rr_new, rr)
    return v
