"""EIT speed benchmark: pyEIT 1.2.4 (NumPy, one sample at a time) against our batched operator, dense and sparse.

Usage: python scripts/bench.py eit [--h0 0.1 0.05 0.025] [--batch 32] [--repeats 5] [--threads 1]
                                   [--solvers dense sparse] [--memory-h0 0.018] [--out .]

Measured in one run on the same mesh and protocol, per sample:
  forward         pyEIT ``EITForward.solve_eit``      vs ``EIT.forward`` at batch 1 and --batch, per solve path
  misfit gradient pyEIT ``compute_jac`` then J^T r     vs ``EIT.misfit_grad`` at batch 1 and --batch
  factorisation   one batched factorisation of K(sigma) at --batch (the floor of each path)
``--memory-h0``: peak memory of ``misfit_grad`` at --batch on that mesh (sparse path), in a fresh process.
``--out``: writes results/bench_eit.csv and figures/bench_eit_scaling.png (cost against mesh size, log-log).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import pyeit.eit.protocol
import pyeit.mesh
import torch
from pyeit.eit.fem import EITForward

from deepunroll.data.phantoms import EITPhantoms
from deepunroll.operators.eit import EIT
from deepunroll.operators.eit.mesh import build_disk_mesh
from deepunroll.tables import write_csv

DENSE_MAX_NODES = 3000   # beyond: 8 N^2 bytes per sample (72 MB at 3,000 nodes) and N^3 / 3 flops; skipped
PYEIT_JAC_MAX_NODES = 3000  # pyEIT's compute_jac inverts the dense K: seconds per sample beyond


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


def bench_mesh(h0: float, batch: int, repeats: int, pyeit_samples: int, device: torch.device = torch.device("cpu"),
               solvers: tuple[str, ...] = ("dense", "sparse")) -> dict:
    """Per-sample seconds of every measured path on one mesh (ours on ``device``, pyEIT on the CPU), plus the
    gradient agreement of each path with pyEIT. Paths beyond their size limits are left out (None)."""
    mesh = build_disk_mesh(16, h0)
    protocol = pyeit.eit.protocol.create(16, 1, 1, "std")
    generator = torch.Generator().manual_seed(0)
    probe = EIT.from_pyeit(mesh, protocol)
    sigma = EITPhantoms(3).sample(probe, batch, generator)
    target = probe(EITPhantoms(3).sample(probe, batch, generator))
    sigma_np, target_np = sigma.numpy(), target.numpy()
    fwd = EITForward(mesh, protocol)
    n_py = min(pyeit_samples, batch)

    def pyeit_gradient():
        out = []
        for b in range(n_py):
            jac, v0 = fwd.compute_jac(sigma_np[b])
            out.append(-jac.T @ (v0 - target_np[b]))  # pyEIT's jac is -dV/dsigma
        return np.stack(out)

    times = {"pyeit_forward": seconds(lambda: [fwd.solve_eit(sigma_np[b]) for b in range(n_py)], repeats) / n_py}
    reference = None
    if mesh.n_nodes <= PYEIT_JAC_MAX_NODES:
        reference = pyeit_gradient()
        times["pyeit_gradient"] = seconds(pyeit_gradient, max(1, repeats // 2)) / n_py
    agreement = {}
    sigma, target = sigma.to(device), target.to(device)
    for kind in solvers:
        if kind == "dense" and mesh.n_nodes > DENSE_MAX_NODES:
            continue
        op = EIT.from_pyeit(mesh, protocol, solver=kind).to(device)
        if reference is not None:
            ours = op.misfit_grad(sigma[:n_py], target[:n_py]).cpu().numpy()
            agreement[kind] = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
        with torch.no_grad():
            values = op.stiffness_values(sigma)
            path = op.fem_solver(device)
            factor = path.cholesky.factor if kind == "sparse" else (lambda v: torch.linalg.cholesky(path.matrix(v)))
            times.update({
                f"{kind}_forward_b1": seconds(lambda: op(sigma[:1]), repeats),
                f"{kind}_forward_bN": seconds(lambda: op(sigma), repeats) / batch,
                f"{kind}_gradient_b1": seconds(lambda: op.misfit_grad(sigma[:1], target[:1]), repeats),
                f"{kind}_gradient_bN": seconds(lambda: op.misfit_grad(sigma, target), repeats) / batch,
                f"{kind}_factor_bN": seconds(lambda: factor(values), repeats) / batch,
            })
    return {"h0": h0, "nodes": mesh.n_nodes, "elems": mesh.n_elems, "meas": probe.n_meas, "times": times,
            "agreement": agreement, "device": device_name(device)}


def format_table(result: dict, batch: int) -> str:
    t = result["times"]
    lines = [
        f"mesh h0={result['h0']}: {result['nodes']} nodes, {result['elems']} elements, {result['meas']} measurements; "
        f"ours on {result['device']}, pyEIT on the CPU",
        f"{'path':<46}{'per sample':>12}{'pyEIT / ours':>14}{'ours / floor':>14}",
    ]

    def row(label: str, key: str, baseline: str | None = None, floor: str | None = None) -> None:
        if key not in t:
            return
        ratio = f"{t[baseline] / t[key]:>13.1f}x" if baseline in t else f"{'':>14}"
        over = f"{t[key] / t[floor]:>13.2f}x" if floor in t else ""
        lines.append(f"{label:<46}{t[key] * 1e3:>9.3f} ms{ratio}{over}")

    row("pyEIT solve_eit (forward)", "pyeit_forward")
    row("pyEIT compute_jac + J^T r (misfit gradient)", "pyeit_gradient")
    for kind in ("dense", "sparse"):
        floor = f"{kind}_factor_bN"
        row(f"{kind} forward, batch 1", f"{kind}_forward_b1", "pyeit_forward")
        row(f"{kind} forward, batch {batch}", f"{kind}_forward_bN", "pyeit_forward", floor)
        row(f"{kind} misfit_grad, batch 1", f"{kind}_gradient_b1", "pyeit_gradient")
        row(f"{kind} misfit_grad, batch {batch}", f"{kind}_gradient_bN", "pyeit_gradient", floor)
        row(f"{kind} floor: one factorisation of K, batch {batch}", floor)
    for kind, value in result["agreement"].items():
        lines.append(f"gradient agreement with pyEIT, {kind} (relative): {value:.1e}")
    return "\n".join(lines)


def peak_memory(h0: float, batch: int) -> dict:
    """Peak resident memory (Linux VmHWM: this process's own high-water mark, not inherited) of one sparse
    ``misfit_grad`` at ``batch`` on the mesh h0, measured in a fresh process: after building the operator, its
    symbolic factorisation and the data, and after the call."""
    code = (
        "import json, torch\n"
        "from deepunroll.operators.eit import EIT\n"
        "from deepunroll.data.phantoms import EITPhantoms\n"
        "def peak():\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "torch.set_num_threads(1)\n"
        f"op = EIT(h0={h0}, solver='sparse')\n"
        f"x = EITPhantoms(3).sample(op, {batch}, torch.Generator().manual_seed(0))\n"
        "y = op(x[:1]).expand(x.shape[0], -1).contiguous()\n"
        "before = peak()\n"
        "g = op.misfit_grad(x, y)\n"
        "print(json.dumps({'nodes': op.n_nodes, 'before_mb': before, 'after_mb': peak(),\n"
        "                  'factor_mb_per_sample': 8 * op.fem_solver().cholesky.factor_entries / 2**20}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_outputs(results: list[dict], out: Path, batch: int) -> None:
    """results/bench_eit.csv (one row per mesh and path) and figures/bench_eit_scaling.png (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for r in results:
        for key, value in r["times"].items():
            rows.append({"h0": r["h0"], "nodes": r["nodes"], "elems": r["elems"], "path": key,
                         "ms_per_sample": round(value * 1e3, 4), "device": r["device"], "batch": batch,
                         "torch_threads": torch.get_num_threads()})
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results" / "bench_eit.csv", list(rows[0]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"pyeit_forward": ("pyEIT solve_eit", "k", "--"), "pyeit_gradient": ("pyEIT compute_jac + J^T r", "k", "-"),
              "dense_forward_bN": ("dense forward", "C0", "--"), "dense_gradient_bN": ("dense misfit_grad", "C0", "-"),
              "sparse_forward_bN": ("sparse forward", "C3", "--"), "sparse_gradient_bN": ("sparse misfit_grad", "C3", "-")}
    for key, (label, color, line) in styles.items():
        points = [(r["nodes"], r["times"][key] * 1e3) for r in results if key in r["times"]]
        if points:
            ax.loglog(*zip(*points), color=color, linestyle=line, marker="o", label=label)
    ax.set_xlabel("mesh nodes")
    ax.set_ylabel(f"ms per sample (ours at batch {batch})")
    ax.set_title(f"EIT cost vs mesh size ({results[0]['device']}, {torch.get_num_threads()} thread(s))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "figures" / "bench_eit_scaling.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/bench.py eit", description=__doc__.splitlines()[0])
    parser.add_argument("--h0", type=float, nargs="+", default=[0.1], help="pyEIT mesh sizes (0.1: 686 elements)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per path (median reported)")
    parser.add_argument("--pyeit-samples", type=int, default=3, help="samples per pyEIT timing (it loops over them)")
    parser.add_argument("--solvers", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ours runs (pyEIT: CPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 0 keeps torch's default. Default 1: pyEIT's per-sample path "
                             "is single-threaded Python, and one thread avoids OpenMP oversubscription on shared cores")
    parser.add_argument("--memory-h0", type=float, default=None, help="also measure peak memory at this mesh size")
    parser.add_argument("--out", type=Path, default=None, help="write results/bench_eit.csv and the figure under it")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    print(f"EIT benchmark: 16 electrodes, adjacent/std protocol, float64, pyEIT {version('pyeit')}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), 3-inclusion phantoms")
    print(f"per-sample wall time, median of {args.repeats} repeats; ratios > 1 mean ours is faster; dense skipped "
          f"beyond {DENSE_MAX_NODES} nodes, pyEIT's gradient beyond {PYEIT_JAC_MAX_NODES}\n")
    results = []
    for h0 in args.h0:
        results.append(bench_mesh(h0, args.batch, args.repeats, args.pyeit_samples, device, tuple(args.solvers)))
        print(format_table(results[-1], args.batch))
        print()
    if args.memory_h0 is not None:
        memory = peak_memory(args.memory_h0, args.batch)
        print(f"memory, sparse misfit_grad at batch {args.batch} on h0={args.memory_h0} ({memory['nodes']} nodes): "
              f"peak RSS {memory['after_mb']:.0f} MB, {memory['after_mb'] - memory['before_mb']:.0f} MB of it for the "
              f"call (operator, data and torch: {memory['before_mb']:.0f} MB; factor "
              f"{memory['factor_mb_per_sample']:.1f} MB per sample)")
    if args.out is not None:
        write_outputs(results, args.out, args.batch)
        print(f"wrote {args.out / 'results' / 'bench_eit.csv'} and {args.out / 'figures' / 'bench_eit_scaling.png'}")
