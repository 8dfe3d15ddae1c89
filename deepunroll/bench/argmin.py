"""Backward modes of ArgminLayer on the smooth Huber-TV layer: gradient error, backward time, saved memory.

Problem: Huber-TV denoising of B piecewise-constant size x size images with learned per-pixel
weights, loss ||x*(y, w) - x_true||^2. Baseline and reference: ``implicit``; the reference
gradient is the implicit one at a solve converged to tol 1e-14. For each solver iteration
count, every mode solves from the same start with exactly that many iterations (``--tol 0``).

    python scripts/bench.py argmin [--iters 10 30 100 300 1000] [--taus 1e-2 1e-5] [--out results/bench_argmin.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deepunroll.nets.argmin import ArgminLayer
from deepunroll.optim.descent import GradientDescent
from deepunroll.nets.energies import HuberTVEnergy
from deepunroll.tables import write_csv
from deepunroll.train.memory import count_saved_bytes

COLUMNS = ["mode", "tau", "solver_iters", "grad_rel_err", "backward_seconds", "saved_bytes"]


def make_problem(batch: int, size: int, seed: int):
    """(y, w, x_true): noisy blocky images (B, size, size), per-pixel weights, ground truth."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(batch, 1, 4, 4, generator=gen, dtype=torch.float64)
    x_true = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")[:, 0]
    y = x_true + 0.1 * torch.randn(x_true.shape, generator=gen, dtype=torch.float64)
    w = 0.02 + 0.08 * torch.rand(x_true.shape, generator=gen, dtype=torch.float64)
    return y, w, x_true


def gradient(layer: ArgminLayer, y, w, x_true):
    """(d loss / d(y, w) flattened, backward seconds, saved bytes) for one forward + backward."""
    y, w = y.clone().requires_grad_(), w.clone().requires_grad_()
    x, n_bytes = count_saved_bytes(layer, y, w)
    loss = (x - x_true).pow(2).sum()
    start = time.perf_counter()
    grads = torch.autograd.grad(loss, (y, w))
    seconds = time.perf_counter() - start
    return torch.cat([g.flatten() for g in grads]), seconds, n_bytes


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py argmin", description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--taus", type=float, nargs="+", default=[1e-2, 1e-5])
    parser.add_argument("--sides", nargs="+", default=["right", "central"], choices=["left", "right", "central"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=0.0,
                        help="solver tolerance (0: always run --iters; > 0: warm-started perturbed solves stop early)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_argmin.csv"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    energy = HuberTVEnergy(ndim=2, delta=0.05)
    y, w, x_true = make_problem(args.batch, args.size, args.seed)
    reference_solver = GradientDescent(20000, tol=1e-14)
    reference, _, _ = gradient(ArgminLayer(energy, reference_solver, backward="implicit"), y, w, x_true)
    print(f"reference: implicit gradient after {reference_solver.n_iter_run} solver iterations (tol 1e-14)")

    modes = [("implicit", None, "central"), ("unroll", None, "central")]
    modes += [(f"lagrangian_{side}", tau, side) for side in args.sides for tau in args.taus]
    rows = []
    for n_iter in args.iters:
        for mode, tau, side in modes:
            backward = mode.split("_")[0]
            solver = GradientDescent(n_iter, tol=args.tol)
            layer = ArgminLayer(energy, solver, backward=backward, tau=tau or 1.0, side=side)
            grad, seconds, n_bytes = gradient(layer, y, w, x_true)
            error = float((grad - reference).norm() / reference.norm())
            rows.append({"mode": mode, "tau": "" if tau is None else f"{tau:g}", "solver_iters": n_iter,
                         "grad_rel_err": f"{error:.3e}", "backward_seconds": f"{seconds:.4f}", "saved_bytes": n_bytes})

    write_csv(rows, args.out, COLUMNS)
    print_table(rows)
    print(f"wrote {args.out}")


def print_table(rows: list[dict]) -> None:
    """The CSV rows plus time and memory as ratios to ``implicit`` at the same iteration count."""
    baseline = {r["solver_iters"]: r for r in rows if r["mode"] == "implicit"}
    header = f"{'mode':<20}{'tau':>7}{'iters':>7}{'rel err':>12}{'bwd s':>9}{'x impl':>8}{'saved B':>11}{'x impl':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        base = baseline[r["solver_iters"]]
        time_ratio = float(r["backward_seconds"]) / max(float(base["backward_seconds"]), 1e-9)
        byte_ratio = r["saved_bytes"] / max(base["saved_bytes"], 1)
        print(f"{r['mode']:<20}{r['tau']:>7}{r['solver_iters']:>7}{r['grad_rel_err']:>12}"
              f"{r['backward_seconds']:>9}{time_ratio:>8.2f}{r['saved_bytes']:>11}{byte_ratio:>8.2f}")
