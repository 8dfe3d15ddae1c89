"""Does a network use the measurements? LPGD-RMA trained with each ``net.direction``, then ablated.

    python scripts/reproduce.py study=physics_use profile=probe   # profiles: configs/reproduce/physics_use.yaml

A profile's ``noise_overrides`` ({noise: [overrides]}) adds settings per noise level (e.g. the Gauss-Newton
damping that suits it, study=direction_alignment). For every run: test MSE and PSNR of the initial guess x0 (EIT:
Gauss-Newton) and the network, and the network's test MSE with the data term removed (zero directions) and with another sample's measurements (same x0), as ratios
(deepunroll.ablation). A post-processing network has both ratios 1.00. Writes
results/physics_use_<profile>.{csv,md} and figures/physics_use_<profile>.png (validation curves).
Runs are resumable (deepunroll.studies.common.run_one); ``report_only`` tabulates what is finished.
"""

from __future__ import annotations

import math
from pathlib import Path

from deepunroll.studies.common import (format_mean_std, load_profile, markdown_table, paired, run_ablation, run_one,
                                       slug, val_curve)
from deepunroll.tables import write_csv

COLUMNS = ["variant", "noise", "seed", "gn_mse", "net_mse", "gn_psnr", "net_psnr", "psnr_gain_db",
           "no_data_term_ratio", "other_y_ratio", "epochs", "train_seconds", "git_commit"]


def _row(variant: str, noise: float, seed: int, result: dict, ablation: dict) -> dict:
    base, net, seconds = result["baseline"], result["scores"], result["train_seconds"]
    return {"variant": variant, "noise": noise, "seed": seed, "gn_mse": base["mse_mean"], "net_mse": net["mse_mean"],
            "gn_psnr": base["psnr_mean"], "net_psnr": net["psnr_mean"],
            "psnr_gain_db": net["psnr_mean"] - base["psnr_mean"],
            "no_data_term_ratio": ablation["no_data_term_ratio"], "other_y_ratio": ablation["other_y_ratio"],
            "epochs": result["epochs"], "train_seconds": round(seconds) if math.isfinite(seconds) else seconds,
            "git_commit": result["git_commit"]}


def run(profile: str, out_dir: Path, runs_dir: Path | None = None, report_only: bool = False) -> list[dict]:
    spec = load_profile("physics_use", profile)
    runs_dir = Path(runs_dir) if runs_dir else out_dir / "runs" / "reproduce"
    rows, curves = [], {}
    for seed in spec["seeds"]:  # seed outermost: a partial sweep holds complete paired comparisons
        for noise in spec["noise"]:
            for variant, extra in spec["variants"].items():
                run_dir = runs_dir / f"physics_use_{profile}" / slug(f"{variant}_noise={noise}_seed={seed}")
                overrides = [f"+experiment={spec['experiment']}", *spec["base"], *extra,
                             *spec.get("noise_overrides", {}).get(noise, []), f"data.noise={noise}", f"seed={seed}",
                             "train.device=cpu", "evaluate=false", f"data.root={runs_dir / 'data'}"]
                result = run_one(overrides, run_dir, {"study": "physics_use", "variant": variant}, report_only)
                if result is None:
                    continue
                rows.append(_row(variant, noise, seed, result, run_ablation(run_dir)))
                curves[(variant, noise, seed)] = val_curve(run_dir)
    _write(profile, out_dir, rows, curves, spec)
    return rows


def _write(profile: str, out_dir: Path, rows: list[dict], curves: dict, spec: dict) -> None:
    if not rows:
        return
    results, figures = out_dir / "results", out_dir / "figures"
    results.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    write_csv(rows, results / f"physics_use_{profile}.csv", COLUMNS)
    header = ["signal", "noise", "seeds", "test MSE", "PSNR gain over x0 (dB)", "MSE x, data term removed",
              "MSE x, another sample's y", "epochs", "train s"]
    body = []
    for noise in spec["noise"]:
        for variant in spec["variants"]:
            group = [r for r in rows if r["variant"] == variant and r["noise"] == noise]
            if group:
                body.append([variant, noise, len(group), format_mean_std([r["net_mse"] for r in group], 5),
                             format_mean_std([r["psnr_gain_db"] for r in group], 2),
                             format_mean_std([r["no_data_term_ratio"] for r in group], 3),
                             format_mean_std([r["other_y_ratio"] for r in group], 2),
                             group[0]["epochs"], format_mean_std([r["train_seconds"] for r in group], 0)])
    lines = [f"# Physics use of {spec['experiment']}, profile `{profile}`", "",
             f"`python scripts/reproduce.py study=physics_use profile={profile}`; overrides "
             f"`{' '.join(spec['base'])}`"
             + "".join(f"; with noise {n}: `{' '.join(extra)}`" for n, extra in spec.get("noise_overrides", {}).items())
             + ". Test MSE of the initial guess x0 "
             + ", ".join(f"{format_mean_std(list({r['seed']: r['gn_mse'] for r in rows if r['noise'] == n}.values()), 5)} "
                         f"(noise {n})"
                         for n in spec["noise"] if any(r["noise"] == n for r in rows)) + ".", "",
             markdown_table(header, body), ""]
    lines += _paired_lines(rows, spec)
    commits = sorted({r["git_commit"] for r in rows})
    lines += ["", f"Runs at commit(s) {', '.join(commits)}. Ratios: test MSE of the same trained network with the "
              "data-fit directions set to zero, and with each sample's y replaced by the next sample's (x0 kept); "
              "1.00 means the network ignores the measurements. Validation curves: "
              f"`figures/physics_use_{profile}.png`."]
    untimed = [f"{r['variant']} noise {r['noise']} seed {r['seed']}" for r in rows
               if not math.isfinite(r["train_seconds"])]
    if untimed:
        lines[-1] += (f" Train s: over the runs whose whole training time is known; not {', '.join(untimed)} (resumed "
                      "from a checkpoint written before per-epoch times were recorded).")
    (results / f"physics_use_{profile}.md").write_text("\n".join(lines) + "\n")
    _plot(figures / f"physics_use_{profile}.png", curves, profile)


def _paired_lines(rows: list[dict], spec: dict) -> list[str]:
    """Per noise level: each variant against raw, PSNR gains paired by seed."""
    out = []
    for noise in spec["noise"]:
        raw = {r["seed"]: r["net_psnr"] for r in rows if r["variant"].startswith("raw") and r["noise"] == noise}
        for variant in spec["variants"]:
            if variant.startswith("raw"):
                continue
            gains = [r["net_psnr"] - raw[r["seed"]] for r in rows
                     if r["variant"] == variant and r["noise"] == noise and r["seed"] in raw]
            if gains:
                p = paired(gains)
                out.append(f"- noise {noise}: {variant} vs raw, PSNR gain {p['mean']:+.2f} dB (paired over {p['n']} "
                           f"seed(s), {p['favour']} of {p['n']} in favour" + (f", t = {p['t']:.1f})" if p['n'] > 1 else ")"))
    return out


def _plot(path: Path, curves: dict, profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (variant, noise, seed), values in curves.items():
        ax.semilogy(range(1, len(values) + 1), values, label=f"{variant}, noise {noise}, seed {seed}",
                    linestyle="-" if noise == 0 else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE")
    ax.set_title(f"{load_profile('physics_use', profile)['experiment']} by data-fit signal ({profile})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
