"""Reproduction study of restarted JFB (Davy, Briceno-Arias, Pustelnik 2025) on the toy problem.

Trains the Plug-and-Play forward-backward model (learned step size gamma and regularisation level
sigma around a small CNN denoiser, spectrally normalised) and the weight-tied LPGD under
``full`` at K=10 and K=20, ``jfb``, ``restarted_jfb`` (warm-started) and ``deq``, over several seeds,
as resumable runs of :func:`deepunroll.studies.common.run_one`. Every trained model is scored three
ways on the test split: its own forward pass (cold, as trained), iterated to the depth a training
sample reached, and iterated to its fixed point. Writes results/equilibrium.csv (one row per run),
results/equilibrium.md (mean +- std over seeds) and figures/equilibrium_step_size.png.

    python scripts/reproduce.py study=equilibrium [profile=quick|paper] [workers=2]
    (models, backprop modes and profiles: configs/reproduce/equilibrium.yaml)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from deepunroll import metrics
from deepunroll.pipeline import compose_config
from deepunroll.studies.common import load_best, load_profile, run_one
from deepunroll.tables import write_csv
from deepunroll.train import checkpoint
from deepunroll.train.memory import count_saved_bytes

COLUMNS = ["model", "mode", "seed", "test_mse", "test_psnr", "trained_depth", "mse_trained_depth",
           "psnr_trained_depth", "fp_iterations", "fp_residual", "mse_fixed_point", "psnr_fixed_point",
           "train_seconds", "saved_bytes", "final_step_size", "final_lipschitz", "skipped_steps", "train_steps",
           "git_commit"]
FP_TOL, FP_MAX_ITER = 1e-5, 3000  # fixed point: relative residual ||T(z) - z|| / ||T(z)|| of the test batch


def trained_depth(cfg, epochs: int) -> int:
    """Iterations of T a training sample has seen after ``epochs`` epochs.

    ``full``: n_iter; ``jfb``: at most n_iter + m; ``deq``: at most n_iter + 1; ``restarted_jfb``
    restarts each sample from its last fixed point, so it has been iterated epochs x (R n_iter + m) times.
    """
    from hydra.utils import instantiate

    from deepunroll.pipeline import upgrade_config

    strategy, k = instantiate(upgrade_config(cfg).backprop), int(cfg.net.n_iter)
    if strategy.mode == "restarted_jfb":
        return epochs * (strategy.restarts * k + strategy.m)
    if strategy.mode == "jfb":
        return k + strategy.m
    return {"full": k, "checkpoint": k, "deq": k + 1}[strategy.mode]


@torch.no_grad()
def iterate(net, y: torch.Tensor, x0: torch.Tensor, max_iter: int, tol: float = 0.0
            ) -> tuple[torch.Tensor, int, float]:
    """x after up to ``max_iter`` applications of the weight-tied map T from z0(x0), cold, without a graph.

    With ``tol`` > 0 the loop stops once ||T(z) - z|| / ||T(z)|| <= tol over the whole batch, or once that
    residual is not finite (the iterates diverged): :func:`deepunroll.optim.fixed_point.fixed_point_iteration`.
    Returns (x (B, *in_shape), iterations, last relative residual; inf when tol = 0).
    """
    from deepunroll.nets.data_term import DataTerm
    from deepunroll.optim.fixed_point import FlatState, fixed_point_iteration

    net.eval()
    data = DataTerm(net.operator, y, net.grad_through_operator, net.data_fit)
    z0 = net.initial_state(x0, y)
    flat = FlatState(z0)
    u, iterations, residual = fixed_point_iteration(
        lambda u: flat.flatten(net.iteration(0, flat.unflatten(u), data)), flat.flatten(z0), max_iter, tol)
    return net.step.output(flat.unflatten(u)[0]), iterations, residual


def depth_scores(run_dir: Path) -> dict:
    """Test MSE / PSNR of a finished run at its trained depth and at its fixed point, saved bytes, skipped
    steps, and the last logged step size and Lipschitz estimate; computed once (equilibrium.json)."""
    path = run_dir / "equilibrium.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg, net, test = load_best(run_dir)
    x, y, x0 = test.x, test.y.float(), test.x0.float()
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    history = last["history"]
    depth = trained_depth(cfg, min(history, key=lambda h: h["val_loss"])["epoch"])  # best.pt's epoch
    x_depth, _, _ = iterate(net, y, x0, depth)
    x_fp, iterations, residual = iterate(net, y, x0, FP_MAX_ITER, FP_TOL)
    net.train()
    batch = int(cfg.train.batch_size)  # a training pass (restarted JFB reads the samples' dataset indices)
    _, saved = count_saved_bytes(net, y[:batch], x0[:batch], index=torch.arange(batch))
    steps_per_epoch = -(-int(cfg.data.splits.train) // int(cfg.train.batch_size))
    out = {"trained_depth": depth,
           "mse_trained_depth": float(metrics.mse(x_depth.to(x.dtype), x).mean()),
           "psnr_trained_depth": float(metrics.psnr(x_depth.to(x.dtype), x).mean()),
           "fp_iterations": iterations, "fp_residual": residual,
           "mse_fixed_point": float(metrics.mse(x_fp.to(x.dtype), x).mean()),
           "psnr_fixed_point": float(metrics.psnr(x_fp.to(x.dtype), x).mean()),
           "saved_bytes": saved, "final_step_size": history[-1].get("step_size", ""),
           "final_lipschitz": history[-1].get("lipschitz", ""), "skipped_steps": last["skipped_steps"],
           "train_steps": len(history) * steps_per_epoch}
    path.write_text(json.dumps(out, indent=1))
    return out


def _mean_std(values: list) -> str:
    """'mean ± std' of the finite values; '(k of n)' when only k of the n runs have one; '-' for none."""
    given = [float(v) for v in values if v != ""]
    finite = [v for v in given if math.isfinite(v)]
    if not finite:
        return "-"
    mean = sum(finite) / len(finite)
    std = (sum((v - mean) ** 2 for v in finite) / max(len(finite) - 1, 1)) ** 0.5
    text = f"{mean:.4g}" if len(finite) == 1 else f"{mean:.4g} ± {std:.2g}"
    return text + (f" ({len(finite)} of {len(given)})" if len(finite) < len(given) else "")


def table(rows: list[dict], spec: dict) -> str:
    """Markdown: per (model, mode) of ``spec``, mean ± std over seeds of the test MSE three ways, and the diagnostics."""
    lines = ["| model | mode | test MSE, as trained | trained depth | test MSE at trained depth | "
             f"test MSE at fixed point | iterations to tol {FP_TOL:g} | skipped steps | train time (s) | "
             "saved MiB | step size | Lipschitz |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in spec["models"]:
        for mode in spec["modes"]:
            rs = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if not rs:
                continue
            converged = sum(float(r["fp_residual"]) <= FP_TOL for r in rs)
            diverged = sum(not math.isfinite(float(r["fp_residual"])) for r in rs)
            depths = ", ".join(str(r["trained_depth"]) for r in rs)
            skipped = ", ".join(f"{r['skipped_steps']}/{r['train_steps']}" for r in rs)
            lines.append(
                f"| {model} | {mode} | {_mean_std([r['test_mse'] for r in rs])} | {depths} | "
                f"{_mean_std([r['mse_trained_depth'] for r in rs])} | {_mean_std([r['mse_fixed_point'] for r in rs])} | "
                f"{_mean_std([r['fp_iterations'] for r in rs])} ({converged}/{len(rs)} converged, {diverged} diverged) | {skipped} | "
                f"{_mean_std([r['train_seconds'] for r in rs])} | {rs[0]['saved_bytes'] / 2**20:.2f} | "
                f"{_mean_std([r['final_step_size'] for r in rs])} | {_mean_std([r['final_lipschitz'] for r in rs])} |")
    return "\n".join(lines)


DESCRIPTION = (
    "Test MSE three ways: *as trained* is the model's own forward pass from x0 (cold; what "
    "`scripts/evaluate.py` reports); *at trained depth* iterates the map from x0 as many times as a training "
    "sample was iterated by the best epoch (restarted JFB restarts every sample from its last fixed point, so "
    "its depth grows with the epochs; one depth per seed); *at fixed point* iterates until the relative "
    f"residual of the whole test batch is <= {FP_TOL:g} (at most {FP_MAX_ITER} iterations; *diverged*: the iterates "
    "stopped being finite, and the MSE there is left out). Skipped steps: "
    "training steps whose loss or gradients were not finite (`train.on_nonfinite=skip`), of all steps, per seed. "
    "Saved MiB: tensors autograd keeps for backward at the training batch size. Generated by "
    "`python scripts/reproduce.py study=equilibrium`.")


def plot_step_size(histories: dict, path: Path, initial: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, mode in enumerate(histories):
        for j, history in enumerate(histories.get(mode, [])):
            epochs = [0] + [h["epoch"] for h in history]
            steps = [initial] + [h["step_size"] for h in history]
            ax.plot(epochs, steps, color=f"C{i}", alpha=0.8, label=mode if j == 0 else None)
    ax.set(xlabel="epoch", ylabel="learned step size gamma", title="PnP forward-backward on the toy problem")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(profile: str = "quick", out_dir: str | Path = ".", runs_dir: str | Path | None = None,
        report_only: bool = False) -> list[dict]:
    """Run (or resume) the study; writes out_dir/results/equilibrium.{csv,md} and figures/equilibrium_step_size.png.

    Runs live in ``runs_dir/equilibrium_<profile>/`` (default out_dir/runs/reproduce): each is claimed by one
    process and done when its result.json exists, so the command resumes after an interruption and can be
    started twice (``workers=2``). ``report_only``: train nothing, tabulate the finished runs.
    """
    spec = load_profile("equilibrium", profile)
    out_dir = Path(out_dir)
    runs_dir = (Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce") / f"equilibrium_{profile}"
    rows, pnp_histories, pending = [], {}, 0
    for seed in spec["seeds"]:
        for model in spec["models"]:
            for mode in spec["modes"]:
                run_dir = runs_dir / f"{model}_{mode}_s{seed}"
                overrides = spec["models"][model] + spec["modes"][mode] + spec["overrides"] + [
                    f"seed={seed}", "train.device=cpu", "train.on_nonfinite=skip", f"name=equilibrium_{model}_{mode}",
                    "evaluate=false", f"data.root={out_dir / 'data'}"]
                result = run_one(overrides, run_dir, {"study": "equilibrium", "model": model, "mode": mode}, report_only)
                if result is None:
                    pending += 1
                    continue
                row = {"model": model, "mode": mode, "seed": seed, "test_mse": result["scores"]["mse_mean"],
                       "test_psnr": result["scores"]["psnr_mean"], "train_seconds": result["train_seconds"],
                       "git_commit": result["git_commit"]} | depth_scores(run_dir)
                rows.append(row)
                if model == "pnp":
                    history = checkpoint.load(run_dir / "checkpoints" / "last.pt")["history"]
                    pnp_histories.setdefault(mode, []).append(history)
                print(f"{model} {mode} seed {seed}: test MSE {row['test_mse']:.4g} (at trained depth "
                      f"{row['mse_trained_depth']:.4g}, at fixed point {row['mse_fixed_point']:.4g}), "
                      f"{row['train_seconds']:.1f} s", flush=True)
    print(f"{pending} runs not finished (in other processes, or report_only)" if pending else "all runs finished")
    if not rows:
        return rows
    write_csv(rows, out_dir / "results" / "equilibrium.csv", COLUMNS)
    md = (f"# Restarted JFB vs DEQ on the toy problem ({profile} profile, "
          f"{len(spec['seeds'])} seeds, mean ± std)\n\n{table(rows, spec)}\n\n{DESCRIPTION}\n")
    (out_dir / "results" / "equilibrium.md").write_text(md)
    initial = float(compose_config(spec["models"]["pnp"]).net.step.step_size)
    plot_step_size(pnp_histories, out_dir / "figures" / "equilibrium_step_size.png", initial)
    print(md)
    return rows
