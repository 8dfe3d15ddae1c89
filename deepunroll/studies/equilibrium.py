"""Reproduction study of restarted JFB (Davy, Briceno-Arias, Pustelnik 2025) on the toy problem.

Trains the Plug-and-Play forward-backward model (learned step size gamma and regularisation level
sigma around a small CNN denoiser, spectrally normalised) and the weight-tied LPGD under
``full`` at K=10 and K=20, ``jfb``, ``restarted_jfb`` (warm-started) and ``deq``, over several seeds,
as ordinary runs of :func:`deepunroll.pipeline.train`. Writes results/equilibrium.csv (one row per
run), results/equilibrium.md (mean +- std over seeds) and figures/equilibrium_step_size.png.

    python -m deepunroll.studies.equilibrium --profile quick|paper [--out-dir .]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

from deepunroll import metrics
from deepunroll.pipeline import compose_config, load_datasets, load_model, train
from deepunroll.tables import write_csv
from deepunroll.train import checkpoint
from deepunroll.train.memory import count_saved_bytes

MODELS = {"pnp": ["+experiment=toy_pnp", "net.spectral_norm=0.5"], "lpgd_tied": ["+experiment=toy_lpgd_tied"]}
# (label, overrides): depth K of `full`, forward budget of jfb / deq, restart block of restarted_jfb
MODES = {
    "full_K10": ["net.backprop=full", "net.n_iter=10"],
    "full_K20": ["net.backprop=full", "net.n_iter=20"],
    "jfb": ["net.backprop=jfb", "net.n_iter=20", "net.fixed_point.m=1"],
    "restarted_jfb": ["net.backprop=restarted_jfb", "net.n_iter=10", "net.fixed_point.restarts=2",
                      "net.fixed_point.m=1", "net.fixed_point.warm_start=true"],
    "deq": ["net.backprop=deq", "net.n_iter=20", "net.fixed_point.backward_max_iter=50",
            "net.fixed_point.backward_tol=1e-6"],
}
PROFILES = {
    "quick": {"seeds": [0, 1, 2], "overrides": ["data.splits.train=1024", "data.splits.val=128", "data.splits.test=256",
                                                 "train.epochs=6", "train.batch_size=32"]},
    "paper": {"seeds": [0, 1, 2, 3, 4], "overrides": ["data.splits.train=4000", "data.splits.val=500",
                                                       "data.splits.test=500", "train.epochs=30", "train.batch_size=32"]},
}
COLUMNS = ["model", "mode", "seed", "test_mse", "test_psnr", "train_seconds", "saved_bytes", "final_step_size",
           "final_lipschitz", "nonfinite_steps"]


def one_run(model: str, mode: str, seed: int, profile: str, out_dir: Path) -> tuple[dict, list[dict]]:
    """Train one (model, mode, seed) into out_dir/runs/equilibrium/...; returns (table row, history)."""
    cfg = compose_config(MODELS[model] + MODES[mode] + PROFILES[profile]["overrides"] + [
        f"seed={seed}", "train.device=cpu", "train.on_nonfinite=skip", f"name=equilibrium_{model}_{mode}",
        f"data.root={out_dir / 'data'}"])
    run_dir = out_dir / "runs" / "equilibrium" / profile / f"{model}_{mode}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(cfg, run_dir)
    seconds = time.perf_counter() - start
    net = load_model(result["best"])
    operator = net.operator
    test = load_datasets(cfg, operator, splits=("test",))["test"]
    x, y, x0 = test.x, test.y, test.x0
    x_hat = net.reconstruct(y, x0).to(x.dtype)
    net.train()
    batch = slice(0, cfg.train.batch_size)
    _, saved = count_saved_bytes(net, y[batch].to(x.dtype), x0[batch])
    history = result["history"]
    skipped = checkpoint.load(Path(result["last"]))["skipped_steps"]
    row = {"model": model, "mode": mode, "seed": seed, "test_mse": float(metrics.mse(x_hat, x).mean()),
           "test_psnr": float(metrics.psnr(x_hat, x).mean()), "train_seconds": seconds, "saved_bytes": saved,
           "final_step_size": history[-1].get("step_size", ""), "final_lipschitz": history[-1].get("lipschitz", ""),
           "nonfinite_steps": skipped}
    return row, history


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
    return f"{mean:.4g} ± {std:.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| model | mode | test MSE | test PSNR (dB) | train time (s) | saved MiB (batch 32) | step size | Lipschitz |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in MODELS:
        for mode in MODES:
            rs = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if not rs:
                continue
            step = [float(r["final_step_size"]) for r in rs if r["final_step_size"] != ""]
            lip = [float(r["final_lipschitz"]) for r in rs if r["final_lipschitz"] != ""]
            lines.append(f"| {model} | {mode} | {_mean_std([r['test_mse'] for r in rs])} | "
                         f"{_mean_std([r['test_psnr'] for r in rs])} | {_mean_std([r['train_seconds'] for r in rs])} | "
                         f"{rs[0]['saved_bytes'] / 2**20:.2f} | {_mean_std(step) if step else '-'} | "
                         f"{_mean_std(lip) if lip else '-'} |")
    return "\n".join(lines)


def plot_step_size(histories: dict, path: Path, initial: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, mode in enumerate(MODES):
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


def run(profile: str = "quick", out_dir: str | Path = ".") -> list[dict]:
    """Run the study; writes out_dir/results/equilibrium.{csv,md} and out_dir/figures/equilibrium_step_size.png."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}; expected one of {sorted(PROFILES)}")
    out_dir = Path(out_dir)
    torch.set_num_threads(1)
    rows, pnp_histories = [], {}
    for seed in PROFILES[profile]["seeds"]:
        for model in MODELS:
            for mode in MODES:
                row, history = one_run(model, mode, seed, profile, out_dir)
                rows.append(row)
                if model == "pnp":
                    pnp_histories.setdefault(mode, []).append(history)
                print(f"{model} {mode} seed {seed}: test MSE {row['test_mse']:.4g}, PSNR {row['test_psnr']:.2f} dB, "
                      f"{row['train_seconds']:.1f} s", flush=True)
    write_csv(rows, out_dir / "results" / "equilibrium.csv", COLUMNS)
    md = (f"# Restarted JFB vs DEQ on the toy problem ({profile} profile, "
          f"{len(PROFILES[profile]['seeds'])} seeds, mean ± std)\n\n{table(rows)}\n")
    (out_dir / "results" / "equilibrium.md").write_text(md)
    initial = float(compose_config(MODELS["pnp"]).net.step.step_size)
    plot_step_size(pnp_histories, out_dir / "figures" / "equilibrium_step_size.png", initial)
    print(md)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--out-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    run(args.profile, args.out_dir)


if __name__ == "__main__":
    main()
