"""KIT4 (16 electrodes): empty-tank calibration and difference images of the 20 targets against datamat_1_0.

    python scripts/reproduce.py study=kit4_difference data_root=PATH/TO/kit4

data_root holds the archive's ``datamat_A_B.mat`` files (``datamat_1_0.mat``: the empty tank). Each variant
of the profile fits sigma0 and the contact impedance to the empty tank on our 16-electrode tank mesh
(:class:`deepunroll.realdata.kit4.KIT4Difference`), reconstructs the conductivity change of every target with
the KTC2023 baseline's pipeline (smoothness prior, reference noise model, one linear step or a few
Gauss-Newton steps) and segments it with the three-class Otsu rule. The calibration is also fitted with one
contact impedance per electrode, for the residual. Writes results/kit4_difference.{csv,md} and
figures/kit4_difference.png (per target: the first variant's change, the last variant's change, the first
variant's segmentation). The KIT4 files have no ground truth: docs/kit4.md compares the images with the
archive's photos. About half a minute per variant on one core.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from deepunroll.operators.eit.calibration import fit_background
from deepunroll.realdata import kit4
from deepunroll.realdata.segmentation import segment_ktc
from deepunroll.record import git_commit
from deepunroll.studies.common import load_profile, markdown_table, measured_data_root
from deepunroll.tables import write_csv
from deepunroll.validation import ConfigError

# fitted to datamat_1_0 by other codes (the data README; their cm geometry: z in Ohm cm = 100 x Ohm m)
PUBLISHED_FITS = {"eitinn": (0.927201922231050, 0.011067821038742e-2), "FEIT_CBM34": (0.92959, 0.07825e-2)}
IMAGE_SIZE = 128
COLUMNS = ["variant", "target", "min_change", "max_change", "resistive_percent", "conductive_percent",
           "sigma0", "contact_impedance", "relative_residual", "seconds", "git_commit"]


def _columns(name: str | None):
    return kit4.ALL_AGAINST_1 if name == "all_against_1" else None


def calibration_rows(root: Path) -> list[list]:
    """Markdown rows: one and 16 contact impedances, fitted on all 79 and on the 15 all-against-1 injections."""
    body = []
    for label, columns in (("all 79", None), ("all against 1", kit4.ALL_AGAINST_1)):
        operator = kit4.kit4_operator(root, columns=columns)
        uel = torch.as_tensor(kit4.load_measurement(root / kit4.EMPTY_TANK, columns)["uel"])
        for per_electrode in (False, True):
            fit = fit_background(operator, uel, per_electrode=per_electrode)
            z = np.asarray(fit["z"])
            z_text = f"{z[0]:.3e}" if z.size == 1 else f"{z.min():.2e} .. {z.max():.2e}"
            body.append([f"ours, {label}, {'16 z' if per_electrode else 'one z'}", f"{fit['sigma']:.5f}", z_text,
                         f"{100 * fit['relative_residual']:.2f}"])
    for name, (sigma, z) in PUBLISHED_FITS.items():
        body.append([f"{name} (data README)", f"{sigma:.5f}", f"{z:.3e}", "1.09" if name == "FEIT_CBM34" else "-"])
    return body


def reconstruct_variant(root: Path, name: str, overrides: dict, commit: str):
    """(rows, images (T, n, n), labels (T, n, n), setup seconds) of one variant over every target."""
    columns = _columns(overrides.get("columns"))
    start = time.perf_counter()
    pipeline = kit4.KIT4Difference(root, columns=columns, gauss_newton_steps=overrides.get("gauss_newton_steps", 0),
                                   image_size=IMAGE_SIZE)
    setup = time.perf_counter() - start
    names, data = kit4.load_targets(root, columns)
    start = time.perf_counter()
    images = pipeline.images(data)
    seconds = time.perf_counter() - start
    inside = pipeline.tank_mask
    labels = np.stack([segment_ktc(image) for image in images]) * inside
    calibration = pipeline.calibration
    rows = [{"variant": name, "target": target, "min_change": round(float(image.min()), 4),
             "max_change": round(float(image.max()), 4),
             "resistive_percent": round(100 * float((label == 1).sum() / inside.sum()), 2),
             "conductive_percent": round(100 * float((label == 2).sum() / inside.sum()), 2),
             "sigma0": round(calibration["sigma"], 5), "contact_impedance": f"{calibration['z'][0]:.4e}",
             "relative_residual": round(calibration["relative_residual"], 5),
             "seconds": round(seconds / len(names), 3), "git_commit": commit}
            for target, image, label in zip(names, images, labels)]
    return rows, images, labels, setup


def plot_targets(names: list[str], first: np.ndarray, last: np.ndarray, labels: np.ndarray, path: Path,
                 titles: tuple[str, str]) -> Path:
    """Four targets per row, three panels each: two change images (colour scale symmetric per image, red
    more conductive) and the segmentation (white water, blue resistive, red conductive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    classes = ListedColormap(["white", "tab:blue", "tab:red"])
    per_row = 4
    n_rows = -(-len(names) // per_row)
    figure, axes = plt.subplots(n_rows, 3 * per_row, figsize=(3 * per_row * 1.05, n_rows * 1.25))
    axes = np.atleast_2d(axes)
    for index, name in enumerate(names):
        row, column = divmod(index, per_row)
        for offset, image in enumerate((first[index], last[index])):
            bound = float(np.abs(image).max()) or 1.0
            axes[row, 3 * column + offset].imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
        axes[row, 3 * column + 2].imshow(labels[index], cmap=classes, vmin=0, vmax=2, interpolation="nearest")
        axes[row, 3 * column].set_title(f"{name.replace('_', '.')}: {titles[0]}", fontsize=6)
        axes[row, 3 * column + 1].set_title(titles[1], fontsize=6)
        axes[row, 3 * column + 2].set_title("segmentation", fontsize=6)
    for ax in axes.reshape(-1):
        ax.set_xticks([]), ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    figure.suptitle("KIT4 targets against the empty tank (datamat_1_0); electrode 1 at the top, numbered clockwise",
                    fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def variant_table(rows: list[dict], setups: dict[str, float]) -> str:
    """Markdown: per variant the fitted sigma0 and z, the time, and the range of the changes."""
    body = []
    for name, setup in setups.items():
        mine = [r for r in rows if r["variant"] == name]
        body.append([name, f"{mine[0]['sigma0']:.5f}", mine[0]["contact_impedance"],
                     f"{100 * mine[0]['relative_residual']:.2f}", f"{setup:.1f}",
                     f"{np.median([r['seconds'] for r in mine]):.3f}"])
    return markdown_table(["variant", "sigma0", "z (Ohm m)", "residual %", "setup s", "s per target"], body)


def target_table(rows: list[dict], names: list[str]) -> str:
    """Markdown: per target and variant the min / max change and the segmented areas."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    found = {(r["variant"], r["target"]): r for r in rows}
    header = ["target", *[f"{v}: min / max, resistive / conductive %" for v in variants]]
    body = [[name.replace("_", "."), *[
        f"{found[v, name]['min_change']:.2f} / {found[v, name]['max_change']:.2f}, "
        f"{found[v, name]['resistive_percent']:.1f} / {found[v, name]['conductive_percent']:.1f}" for v in variants]]
        for name in names]
    return markdown_table(header, body)


def run(profile: str, out_dir: Path, data_root: Path | None = None, report_only: bool = False) -> list[dict]:
    variants = load_profile("kit4_difference", profile)["variants"]  # configs/reproduce/kit4_difference.yaml
    root = measured_data_root("kit4_difference", data_root,
                              "the KIT4 folder of datamat_A_B.mat files (published on Zenodo, record 1203914; "
                              "see the README's Real tanks section)")
    commit = git_commit()
    if not (root / kit4.EMPTY_TANK).is_file():
        raise ConfigError(f"data_root={str(root)!r}: {root / kit4.EMPTY_TANK} not found (the KIT4 folder)")
    names = kit4.target_names(root)
    rows, setups, outputs = [], {}, []
    for name, overrides in variants.items():
        variant_rows, images, labels, setups[name] = reconstruct_variant(root, name, overrides, commit)
        rows += variant_rows
        outputs.append((name, images, labels))
        print(f"{name}: sigma0 {variant_rows[0]['sigma0']}, z {variant_rows[0]['contact_impedance']}, "
              f"setup {setups[name]:.1f} s", flush=True)
    write_csv(rows, out_dir / "results" / "kit4_difference.csv", COLUMNS)
    (first_name, first, labels), (last_name, last, _) = outputs[0], outputs[-1]
    plot_targets(names, first, last, labels, out_dir / "figures" / "kit4_difference.png",
                 (first_name.split(",")[0], last_name.split(",")[0]))
    text = [f"# KIT4: calibration and difference images (`study=kit4_difference profile={profile}`)", "",
            "## Empty-tank calibration (datamat_1_0)", "",
            "Least squares over sigma0 and the contact impedance z with our adjoint gradients "
            "(`operators.eit.calibration.fit_background`) on our tank mesh (radius 0.14 m, 16 electrodes of "
            "2.5 cm, h0 0.05), currents divided by sqrt 2 as the other codes do; the residual is "
            "||V - U|| / ||U||. The other codes' values come from the data README (their z converted from "
            "Ohm cm to Ohm m).", "",
            markdown_table(["fit", "sigma0", "z (Ohm m)", "residual %"], calibration_rows(root)), "",
            "## Difference images", "",
            "Per variant: the calibration used, the setup time (calibration, mesh, Jacobian, prior) and the "
            "reconstruction time per target on one core.", "", variant_table(rows, setups), "",
            "Per target: the smallest and largest conductivity change (fitted unit) and the areas the three-class "
            "Otsu rule labels resistive / conductive (% of the tank).", "", target_table(rows, names), "",
            f"Figure: figures/kit4_difference.png. What the images get right and wrong: docs/kit4.md. "
            f"git commit {commit}."]
    (out_dir / "results" / "kit4_difference.md").write_text("\n".join(text) + "\n")
    return rows
