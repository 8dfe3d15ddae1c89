"""Solvers of x* = argmin_x E(x; theta) + <linear, x> for :class:`deepunroll.nets.argmin.ArgminLayer`.

Each is called as ``solver(energy, theta, x0, linear=None, create_graph=False) -> x`` (B, ...) and
records ``n_iter_run``, the iterations its last call made (read by the tests and ``bench.py argmin``).
"""

from __future__ import annotations

import torch
from torch import nn

from deepunroll.optim.linear import bdot, per_sample


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
        step = per_sample(step, x0)
        if not create_graph:
            theta, x0 = [t.detach() for t in theta], x0.detach()
        x = v = x0
        t = x0.new_ones((x0.shape[0],))
        for k in range(self.n_iter):
            x_new = v - step * self._grad(energy, v, theta, linear, create_graph)
            if self.accelerated:
                restart = bdot(v - x_new, x_new - x) > 0
                t = torch.where(restart, torch.ones_like(t), t)
                t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
                v = x_new + per_sample((t - 1) / t_new, x0) * (x_new - x)
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
