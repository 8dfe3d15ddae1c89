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

from deepunroll.optim.linear import batched_cg

BACKWARDS = ("unroll", "implicit", "lagrangian", "straight_through")
SIDES = ("left", "right", "central")


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
