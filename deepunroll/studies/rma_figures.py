"""Figures of the RMA study: RMA gain versus a (toy), EIT error versus n_train, EIT reconstructions, validation curves."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepunroll.studies.common import mean_std

TOY_PAIRS = [("LPGD-RMA", "LPGD", "C0", "-"), ("LPGD-MA", "LPGD", "C0", ":"),
             ("LPD-RMA", "LPD", "C3", "-"), ("LPD-MA", "LPD", "C3", ":")]
RECONSTRUCTION_NETWORKS = ["LPGD", "LPGD-RMA", "LPD", "LPD-RMA"]


def _linestyle(network: str) -> str:
    """Solid for RMA, dashed for momentum (MA), dotted for the base networks."""
    return "-" if "RMA" in network else ("--" if "MA" in network else ":")


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def toy_gain_vs_a(rows: list[dict], path: Path) -> Path | None:
    """Per-seed PSNR gain of RMA and MA over their base network, mean +- std over seeds, against a."""
    psnr = {(r["network"], float(r["a"]), r["seed"]): float(r["psnr_mean"]) for r in rows}
    figure = Figure(figsize=(6.0, 4.0))
    ax = figure.add_subplot()
    drawn = False
    for better, base, colour, style in TOY_PAIRS:
        points = {}
        for (network, a, seed), value in psnr.items():
            if network == better and (base, a, seed) in psnr:
                points.setdefault(a, []).append(value - psnr[(base, a, seed)])
        if not points:
            continue
        a_values = sorted(points)
        stats = [mean_std(points[a]) for a in a_values]
        ax.errorbar(a_values, [m for m, _ in stats], yerr=[s for _, s in stats], color=colour, linestyle=style,
                    marker="o", capsize=3, label=f"{better} - {base}")
        drawn = True
    if not drawn:
        return None
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("nonlinearity a")
    ax.set_ylabel("test PSNR gain over the base network (dB)")
    ax.set_title("Toy problem: gain of RMA and MA (mean +- std over seeds)")
    ax.legend(fontsize=8)
    return _save(figure, path)


def eit_error_vs_ntrain(rows: list[dict], path: Path) -> Path | None:
    """Relative error against n_train per network (+ GN), one panel per (inclusions, noise)."""
    panels = sorted({(r["n_inclusions"], r["noise"]) for r in rows})
    if not panels:
        return None
    networks = list(dict.fromkeys(r["network"] for r in rows if r["seed"] != ""))
    figure = Figure(figsize=(4.2 * len(panels), 3.8))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (inclusions, noise) in zip(axes, panels):
        here = [r for r in rows if (r["n_inclusions"], r["noise"]) == (inclusions, noise)]
        for i, network in enumerate(networks):
            by_n = {}
            for r in here:
                if r["network"] == network:
                    by_n.setdefault(int(r["n_train"]), []).append(float(r["rel_err_mean"]))
            if by_n:
                n_values = sorted(by_n)
                stats = [mean_std(by_n[n]) for n in n_values]
                ax.errorbar(n_values, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                            color=f"C{i}", linestyle=_linestyle(network), label=network)
        for r in here:
            if r["seed"] == "":
                ax.axhline(float(r["rel_err_mean"]), color="black", linestyle="-.", linewidth=1, label=r["network"])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([50, 200, 400], ["50", "200", "400"])
        ax.set_xlabel("training samples n_train")
        ax.set_title(f"{inclusions} inclusions, noise {float(noise):g}", fontsize=10)
    axes[0].set_ylabel("test relative error")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(figure, path)


def eit_reconstructions(rows: list[dict], path: Path, out_dir: Path, n_samples: int = 3) -> Path | None:
    """Ground truth, GN and the networks on test samples of the hardest noise-free setting with most data."""
    from deepunroll.evaluation import evaluate
    from deepunroll.viz import plot_mesh_reconstructions

    runs = [r for r in rows if r["seed"] != "" and r["network"] in RECONSTRUCTION_NETWORKS]
    if not runs:
        return None
    key = max({(r["n_inclusions"], -float(r["noise"]), r["n_train"], -int(r["seed"])) for r in runs})
    chosen = {r["network"]: r for r in runs
              if (r["n_inclusions"], -float(r["noise"]), r["n_train"], -int(r["seed"])) == key}
    names = [n for n in RECONSTRUCTION_NETWORKS if n in chosen]
    _, columns, operator = evaluate([out_dir / chosen[n]["run_dir"] / "checkpoints" / "best.pt" for n in names])
    estimates = list(columns.values())[2:]  # after ground truth and the x0 (GN) column
    panels = dict(list(columns.items())[:2]) | {
        f"{n} (n_train {key[2]})": x for n, x in zip(names, estimates)}
    return plot_mesh_reconstructions(panels, operator.nodes, operator.elements, path, n_samples)


# axis columns a table may have, in the order a validation panel's title names them
SETTING_COLUMNS = ["a", "n_inclusions", "noise", "n_train"]


def validation_curves(rows: list[dict], path: Path, out_dir: Path) -> Path | None:
    """Validation loss per epoch of each network's seed-0 run, one panel per setting (is training flat?)."""
    from deepunroll.studies.common import val_curve

    runs = [r for r in rows if r["seed"] != "" and int(r["seed"]) == 0]
    if not runs:
        return None
    keys = [k for k in SETTING_COLUMNS if k in runs[0]]
    settings = sorted({tuple(r[k] for k in keys) for r in runs})
    networks = list(dict.fromkeys(r["network"] for r in runs))
    figure = Figure(figsize=(4.0 * len(settings), 3.6))
    axes = figure.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        for r in runs:
            if tuple(r[k] for k in keys) == setting:
                curve = val_curve(out_dir / r["run_dir"])
                ax.semilogy(range(1, len(curve) + 1), curve, color=f"C{networks.index(r['network'])}",
                            linestyle=_linestyle(r["network"]), label=r["network"])
        ax.set_xlabel("epoch")
        ax.set_title(", ".join(f"{k} {v}" for k, v in zip(keys, setting)), fontsize=9)
    axes[0].set_ylabel("validation MSE (seed 0)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(figure, path)


# figure kinds a sweep may ask for in its profile (figures: {kind: file stem under figures/})
FIGURES = {"gain_vs_a": lambda rows, path, out_dir: toy_gain_vs_a(rows, path),
           "error_vs_ntrain": lambda rows, path, out_dir: eit_error_vs_ntrain(rows, path),
           "reconstructions": eit_reconstructions,
           "validation": validation_curves}


def make_figures(tables: dict[str, tuple[list[dict], dict]], out_dir: Path) -> list[Path]:
    """The figures each table's profile entry names: ``figures: {kind: stem}`` -> figures/<stem>.png."""
    made = []
    for rows, spec in tables.values():
        for kind, stem in spec.get("figures", {}).items():
            if kind not in FIGURES:
                raise ValueError(f"figures.{kind}: unknown figure; expected one of {sorted(FIGURES)}")
            made.append(FIGURES[kind](rows, out_dir / "figures" / f"{stem}.png", out_dir))
    return [p for p in made if p is not None]
