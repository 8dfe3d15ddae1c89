"""EIT speed benchmark: pyEIT 1.2.4 (NumPy, one sample at a time) against our batched torch operator.

Usage: python scripts/bench.py eit [--h0 0.1 0.07] [--batch 32] [--repeats 5] [--threads 1]

Measured in one run on the same mesh and protocol, per sample:
  forward         pyEIT ``EITForward.solve_eit``      vs ``EIT.forward`` at batch 1 and --batch
  misfit gradient pyEIT ``compute_jac`` then J^T r     vs ``EIT.misfit_grad`` at batch 1 and --batch
  floor           one batched dense Cholesky of K(sigma) at --batch (the cost no dense method avoids)
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib.metadata import version
from typing import Callable

import numpy as np
import pyeit.eit.protocol
import pyeit.mesh
import torch
from pyeit.eit.fem import EITForward

from deepunroll.data.phantoms import EITPhantoms
from deepunroll.operators.eit import EIT


def _sync() -> None:
    """Wait for queued CUDA work, so wall times include it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up call (CUDA work included)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """'cpu' or the CUDA card's name, written with every result."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bench_mesh(h0: float, batch: int, repeats: int, pyeit_samples: int, device: torch.device = torch.device("cpu")
               ) -> dict:
    """Per-sample seconds of every measured path on one mesh (ours on ``device``, pyEIT on the CPU),
    plus a gradient agreement check."""
    mesh = pyeit.mesh.create(16, h0=h0)
    protocol = pyeit.eit.protocol.create(16, 1, 1, "std")
    op = EIT.from_pyeit(mesh, protocol)
    generator = torch.Generator().manual_seed(0)
    sigma = EITPhantoms(3).sample(op, batch, generator)
    target = op(EITPhantoms(3).sample(op, batch, generator))
    sigma_np, target_np = sigma.numpy(), target.numpy()
    op, sigma, target = op.to(device), sigma.to(device), target.to(device)
    fwd = EITForward(mesh, protocol)
    n_py = min(pyeit_samples, batch)

    def pyeit_forward():
        for b in range(n_py):
            fwd.solve_eit(sigma_np[b])

    def pyeit_gradient():
        out = []
        for b in range(n_py):
            jac, v0 = fwd.compute_jac(sigma_np[b])
            out.append(-jac.T @ (v0 - target_np[b]))  # pyEIT's jac is -dV/dsigma
        return np.stack(out)

    agreement = float(np.linalg.norm(op.misfit_grad(sigma[:n_py], target[:n_py]).cpu().numpy() - pyeit_gradient())
                      / np.linalg.norm(pyeit_gradient()))
    with torch.no_grad():
        stiffness = op.stiffness(sigma)
        rows = {
            "pyeit_forward": seconds(pyeit_forward, repeats) / n_py,
            "ours_forward_b1": seconds(lambda: op(sigma[:1]), repeats),
            "ours_forward_bN": seconds(lambda: op(sigma), repeats) / batch,
            "pyeit_gradient": seconds(pyeit_gradient, max(1, repeats // 2)) / n_py,
            "ours_gradient_b1": seconds(lambda: op.misfit_grad(sigma[:1], target[:1]), repeats),
            "ours_gradient_bN": seconds(lambda: op.misfit_grad(sigma, target), repeats) / batch,
            "cholesky_bN": seconds(lambda: torch.linalg.cholesky(stiffness), repeats) / batch,
        }
    return {"h0": h0, "nodes": op.n_nodes, "elems": op.n_elems, "meas": op.n_meas, "times": rows, "agreement": agreement,
            "device": device_name(device)}


def format_table(result: dict, batch: int) -> str:
    t = result["times"]
    lines = [
        f"mesh h0={result['h0']}: {result['nodes']} nodes, {result['elems']} elements, {result['meas']} measurements; "
        f"ours on {result['device']}, pyEIT on the CPU",
        f"{'path':<44}{'per sample':>12}{'pyEIT / ours':>14}{'ours / floor':>14}",
    ]

    def row(label: str, value: float, baseline: float | None = None, floor: bool = False) -> None:
        ratio = f"{baseline / value:>13.1f}x" if baseline else f"{'':>14}"
        over = f"{value / t['cholesky_bN']:>13.2f}x" if floor else ""
        lines.append(f"{label:<44}{value * 1e3:>9.2f} ms{ratio}{over}")

    row("pyEIT solve_eit (forward)", t["pyeit_forward"])
    row("ours forward, batch 1", t["ours_forward_b1"], t["pyeit_forward"])
    row(f"ours forward, batch {batch}", t["ours_forward_bN"], t["pyeit_forward"], floor=True)
    row("pyEIT compute_jac + J^T r (misfit gradient)", t["pyeit_gradient"])
    row("ours misfit_grad, batch 1", t["ours_gradient_b1"], t["pyeit_gradient"])
    row(f"ours misfit_grad, batch {batch}", t["ours_gradient_bN"], t["pyeit_gradient"], floor=True)
    row(f"floor: one Cholesky of K, batch {batch}", t["cholesky_bN"])
    lines.append(f"gradient agreement with pyEIT (relative): {result['agreement']:.1e}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/bench.py eit", description=__doc__.splitlines()[0])
    parser.add_argument("--h0", type=float, nargs="+", default=[0.1], help="pyEIT mesh sizes (0.1: 686 elements)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per path (median reported)")
    parser.add_argument("--pyeit-samples", type=int, default=3, help="samples per pyEIT timing (it loops over them)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ours runs (pyEIT: CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 0 keeps torch's default. Default 1: pyEIT's per-sample path "
                             "is single-threaded Python, and one thread avoids OpenMP oversubscription on shared cores")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    print(f"EIT benchmark: 16 electrodes, adjacent/std protocol, float64, pyEIT {version('pyeit')}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), 3-inclusion phantoms")
    print(f"per-sample wall time, median of {args.repeats} repeats; ratios > 1 mean ours is faster\n")
    for h0 in args.h0:
        print(format_table(bench_mesh(h0, args.batch, args.repeats, args.pyeit_samples, device), args.batch))
        print()
