"""One EIT training step at published size, data-fit gradients our way vs the authors' way.

python scripts/bench.py train_step [--h0 0.1] [--n-iter 20] [--batch 8] [--epoch-samples 400] [--direction raw]
                                   [--profile-steps 3] [--top 12]

Ours: `EIT.misfit_grad` (one factorisation per sample, adjoint vjp, batched).
Authors' way: pyEIT `compute_jac` per sample per iterate (NumPy), then J^T r — what their
LPGD-RMA scripts did for every iterate of every sample. Both feed the same LPGD-RMA network.
``--direction`` (raw | scaled | gauss_newton) sets the data-fit signal of ours (net.direction); the
authors' way is always their raw gradient, so the ratio compares paths only with ``raw``.
Then (ours): one timed epoch, its physics floor (the epoch's misfit gradients alone, n_iter per sample, at
the same batch) and the ``--top`` entries of a torch.profiler table over ``--profile-steps`` steps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from pyeit.eit.fem import EITForward

from deepunroll.bench.eit import _sync, device_name, seconds
from deepunroll.data.phantoms import EITPhantoms
from deepunroll.nets.build import build_model
from deepunroll.nets.direction import KINDS
from deepunroll.operators.base import ForwardOperator
from deepunroll.operators.eit import EIT
from deepunroll.operators.eit.mesh import build_disk_mesh
from deepunroll.operators.eit.protocol import build_protocol


class PyEITPerSample(ForwardOperator):
    """The authors' data-fit path: pyEIT on NumPy, one sample at a time, a full Jacobian per call."""

    def __init__(self, h0: float) -> None:
        super().__init__()
        self.fwd = EITForward(build_disk_mesh(16, h0), build_protocol(16, 1, 1, "std"))
        n_elems = self.fwd.mesh.n_elems
        self.in_shape, self.out_shape = (n_elems,), (self.fwd.solve_eit(np.ones(n_elems)).size,)

    def _forward(self, sigma: torch.Tensor) -> torch.Tensor:
        rows = [self.fwd.solve_eit(s) for s in sigma.detach().cpu().double().numpy()]
        return torch.as_tensor(np.stack(rows), dtype=sigma.dtype)

    def misfit_grad(self, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grads = []
        for s, target in zip(sigma.detach().cpu().double().numpy(), y.detach().cpu().double().numpy()):
            jac, v0 = self.fwd.compute_jac(s)
            grads.append(-jac.T @ (v0 - target))  # pyEIT's jac is -dV/dsigma
        return torch.as_tensor(np.stack(grads), dtype=sigma.dtype)


NET = {"n_iter": 20, "grad_through_operator": False,
       "step": {"_target_": "deepunroll.nets.lpgd.LPGDStep", "hidden": 32, "n_conv": 4, "share_weights": False}}
ACCEL = {"_target_": "deepunroll.nets.accel.RMA", "cell": "lstm", "hidden": 128, "layers": 1}


def training_step(model, optimizer, y, x0, x) -> None:
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(y, x0), x)
    loss.backward()
    optimizer.step()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--h0", type=float, default=0.1)
    parser.add_argument("--n-iter", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-samples", type=int, default=400, help="samples in the timed epoch (ours); 0 skips it")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ours runs (pyEIT: CPU)")
    parser.add_argument("--direction", default="raw", choices=list(KINDS), help="net.direction of ours")
    parser.add_argument("--damping", type=float, default=1e-3, help="net.direction_damping (gauss_newton)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler (0: no profile)")
    parser.add_argument("--top", type=int, default=12, help="profile rows printed (by self time)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    ours = EIT(h0=args.h0, min_conductivity=0.01)
    net_cfg = OmegaConf.create({**NET, "n_iter": args.n_iter})
    ours_cfg = OmegaConf.create({**NET, "n_iter": args.n_iter, "direction": args.direction,
                                 "direction_damping": args.damping})
    gen = torch.Generator().manual_seed(0)
    x = EITPhantoms(2).sample(ours, max(args.batch, args.epoch_samples), gen).float()
    y = ours(x.double()).float()
    x0 = torch.ones_like(x)
    results = {}
    for label, operator, where in (("ours (adjoint misfit_grad, batched)", ours, device),
                                   ("authors' way (pyEIT compute_jac per sample)", PyEITPerSample(args.h0), "cpu")):
        torch.manual_seed(0)
        model = build_model(ours_cfg if operator is ours else net_cfg, OmegaConf.create(ACCEL), operator).to(where)
        model.step.float(), model.accelerator.float()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        batch = tuple(t[: args.batch].to(where) for t in (y, x0, x))
        results[label] = seconds(lambda: training_step(model, optimizer, *batch), args.repeats)
    ours_s, theirs_s = results.values()
    print(f"EIT h0={args.h0} ({ours.n_elems} elements, {ours.n_meas} measurements), LPGD-RMA, "
          f"{args.n_iter} iterations, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"ours on {device_name(device)} with net.direction={args.direction}")
    for label, value in results.items():
        print(f"  {label:<46} {value:8.3f} s per training step")
    print(f"  ratio (authors' way / ours): {theirs_s / ours_s:.1f}x")
    torch.manual_seed(0)
    model = build_model(ours_cfg, OmegaConf.create(ACCEL), ours).to(device)
    model.step.float(), model.accelerator.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    y, x0, x = y.to(device), x0.to(device), x.to(device)
    if args.epoch_samples:
        start = time.perf_counter()
        for i in range(0, args.epoch_samples, args.batch):
            sl = slice(i, i + args.batch)
            training_step(model, optimizer, y[sl], x0[sl], x[sl])
        _sync()
        epoch = time.perf_counter() - start
        steps = -(-args.epoch_samples // args.batch)
        physics = seconds(lambda: ours.misfit_grad(x[: args.batch], y[: args.batch]), args.repeats)  # ours moved with the model
        floor = physics * args.n_iter * steps
        print(f"  one epoch, {args.epoch_samples} samples at batch {args.batch} (ours): {epoch:.1f} s; "
              f"authors' way extrapolated: {epoch * theirs_s / ours_s / 60:.1f} min")
        print(f"  physics floor of that epoch ({args.n_iter} x {steps} misfit gradients at batch {args.batch}, "
              f"{physics * 1e3:.2f} ms each): {floor:.1f} s ({100 * floor / epoch:.0f} % of the epoch)")
    if args.profile_steps:
        print_profile(lambda: training_step(model, optimizer, y[: args.batch], x0[: args.batch], x[: args.batch]),
                      args.profile_steps, args.top, device)


def print_profile(step, n_steps: int, top: int, device: torch.device) -> None:
    """torch.profiler over ``n_steps`` calls of ``step`` (after one warm-up): the ``top`` operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        _sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"  torch.profiler, {n_steps} training steps (ours), top {top} by self time:")
    print(prof.key_averages().table(sort_by=key, row_limit=top))
