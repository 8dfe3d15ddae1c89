"""Memory and time of one training step per backprop mode and depth K on a weight-tied LPGD network.

Bytes saved for backward are counted exactly with ``saved_tensors_hooks`` (deepunroll.train.memory),
so they are the same on any device; on a GPU ``torch.cuda.max_memory_allocated`` is recorded too.
Baseline: ``full`` at the same K. ``checkpoint`` stores each iteration's input state through its own
saved-tensor hooks, which hide them from ours: they are added explicitly (``Checkpointed.kept_bytes``). Every mode runs exactly K forward iterations (tolerances 0;
restarted_jfb: 1 restart block of K (warm-started from the second step), then m=1 differentiated step; deq: K forward iterations, then an
adjoint solve to 1e-6 or 50 iterations).

    python scripts/bench.py backprop [--depths 10 20 50 100] [--problems toy eit] [--out results/bench_backprop.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from deepunroll.nets.backprop import BACKPROP, backprop_overrides
from deepunroll.pipeline import build_problem, compose_config, initial_guess
from deepunroll.tables import write_csv
from deepunroll.train.memory import count_saved_bytes

# per problem: the experiment and, for EIT, the published 1D CNN blocks the committed table was measured with
EXPERIMENTS = {"toy": ["+experiment=toy_lpgd_tied"], "eit": ["+experiment=eit_lpgd", "net=lpgd"]}
COLUMNS = ["problem", "mode", "K", "saved_bytes", "step_seconds", "cuda_max_bytes"]
# every mode runs exactly K forward iterations and one differentiated step; each mode takes the settings it has
SETTINGS = {"tol": 0, "restarts": 1, "m": 1, "backward_tol": 1e-6, "backward_max_iter": 50}


def measure(problem: str, mode: str, depth: int, batch: int, device: torch.device, repeats: int) -> dict:
    """One training step (forward, backward, Adam) of the weight-tied LPGD at depth K under ``mode``."""
    overrides = [*EXPERIMENTS[problem], "net.direction=raw", "net.step.share_weights=true",
                 f"net.n_iter={depth}", *backprop_overrides(mode, **SETTINGS)]
    torch.manual_seed(0)
    cfg = compose_config(overrides)
    operator, generator, model = build_problem(cfg, device)
    x = generator.sample(operator, batch, torch.Generator().manual_seed(0)).to(device)
    y = operator(x)
    x0 = initial_guess(cfg)(operator, y)
    dtype = next(model.parameters()).dtype
    x, y, x0 = x.to(dtype), y.to(dtype), x0.to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    seconds, saved = [], 0
    for _ in range(repeats + 1):  # the first step warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        x_hat, saved = count_saved_bytes(model, y, x0, index=torch.arange(batch))  # restarted_jfb: warm from step 2
        saved += getattr(model.backprop, "kept_bytes", 0)  # checkpoint's own hooks hide its kept inputs from ours
        loss = torch.nn.functional.mse_loss(x_hat, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    cuda_bytes = torch.cuda.max_memory_allocated() if device.type == "cuda" else ""
    return {"problem": problem, "mode": mode, "K": depth, "saved_bytes": saved,
            "step_seconds": sorted(seconds[1:])[len(seconds[1:]) // 2], "cuda_max_bytes": cuda_bytes}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(len(problems), 2, figsize=(9, 3.4 * len(problems)), squeeze=False)
    for row_axes, problem in zip(axes, problems):
        for mode in BACKPROP:
            pts = [r for r in rows if r["problem"] == problem and r["mode"] == mode]
            if not pts:
                continue
            ks = [r["K"] for r in pts]
            row_axes[0].plot(ks, [r["saved_bytes"] / 2**20 for r in pts], "o-", label=mode)
            row_axes[1].plot(ks, [r["step_seconds"] for r in pts], "o-", label=mode)
        row_axes[0].set(xscale="log", yscale="log", xlabel="depth K", ylabel="MiB saved for backward", title=problem)
        row_axes[1].set(xscale="log", yscale="log", xlabel="depth K", ylabel="seconds per training step", title=problem)
        row_axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py backprop", description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--modes", nargs="+", default=list(BACKPROP), choices=list(BACKPROP))
    parser.add_argument("--problems", nargs="+", default=["toy"], choices=sorted(EXPERIMENTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_backprop.csv"))
    parser.add_argument("--figure", type=Path, default=Path("figures/bench_backprop.png"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for problem in args.problems:
        for depth in args.depths:
            for mode in args.modes:
                row = measure(problem, mode, depth, args.batch, device, args.repeats)
                rows.append(row)
                print(f"{problem:>4} {mode:>14} K={depth:>4}  saved {row['saved_bytes'] / 2**20:9.2f} MiB  "
                      f"step {row['step_seconds']:.3f} s", flush=True)
    write_csv(rows, args.out, COLUMNS)
    plot(rows, args.figure)
    print(f"wrote {args.out} and {args.figure}")
    for problem in args.problems:
        lo, hi = min(args.depths), max(args.depths)
        for mode in args.modes:
            at = {r["K"]: r for r in rows if r["problem"] == problem and r["mode"] == mode}
            full = {r["K"]: r for r in rows if r["problem"] == problem and r["mode"] == "full"}
            ratio = at[hi]["saved_bytes"] / max(at[lo]["saved_bytes"], 1)
            vs_full = at[hi]["saved_bytes"] / max(full[hi]["saved_bytes"], 1) if hi in full else float("nan")
            print(f"{problem} {mode:>14}: saved bytes K={hi} / K={lo} = {ratio:.2f}x; vs full at K={hi}: {vs_full:.3f}x")
