"""The KTC2023 difference-imaging baseline scored on the public training levels (4 targets x 7 levels).

    python scripts/reproduce.py study=ktc2023_levels data_root=PATH/TO/ktc2023

data_root holds the challenge's training/ (ref.mat, trueK.mat), training_levels/level_L/dataK.mat and
mesh/. Every variant of the profile reconstructs the 28 level files with :class:`KTCReconstructor` and
scores them with :func:`deepunroll.metrics.ktc_score` against training/trueK.mat. Writes
results/ktc2023_levels.{csv,md} and figures/ktc2023_levels.png (the first variant: images, segmentations,
truths). About a minute per variant on one core (the Gauss-Newton one: a few minutes).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.io

from deepunroll.metrics import ktc_score
from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_reconstruct import KTCReconstructor, KTCSettings
from deepunroll.realdata.segmentation import segment_ktc
from deepunroll.record import git_commit
from deepunroll.studies.common import load_profile, markdown_table, measured_data_root
from deepunroll.tables import write_csv

N_TARGETS = 4
REFERENCE_TOTAL = 17.77  # the organisers' reference method on the same 28 files (issue 17)
COLUMNS = ["variant", "level", "target", "score", "sigma0", "seconds_per_level", "git_commit"]


def load_truths(root: Path) -> np.ndarray:
    """(4, 256, 256) truths from training/trueK.mat."""
    paths = [root / "training" / f"true{k}.mat" for k in range(1, N_TARGETS + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"KTC2023: {missing[0]} does not exist (data_root must be the KTC2023 folder)")
    return np.stack([scipy.io.loadmat(str(p))["truth"] for p in paths])


def load_level(root: Path, level: int) -> np.ndarray:
    """(4, 2356) voltages of training_levels/level_L/data1..4.mat (NaN where removed)."""
    folder = root / "training_levels" / f"level_{level}"
    return np.stack([ktc2023.load_measurement(folder / f"data{k}.mat")["uel"] for k in range(1, N_TARGETS + 1)])


def score_variant(root: Path, name: str, overrides: dict, truths: np.ndarray, commit: str):
    """(rows, images (7, 4, 256, 256), labels (7, 4, 256, 256), setup seconds) for one variant."""
    ref = ktc2023.load_measurement(root / "training" / "ref.mat")
    start = time.perf_counter()
    reconstructor = KTCReconstructor(ref, KTCSettings(mesh_root=str(root), **overrides))
    setup = time.perf_counter() - start
    rows, images, labels = [], [], []
    for level in range(1, ktc2023.N_LEVELS + 1):
        data = load_level(root, level)
        start = time.perf_counter()
        level_images = reconstructor.images(data, level)
        level_labels = np.stack([segment_ktc(image) for image in level_images])
        seconds = time.perf_counter() - start
        images.append(level_images), labels.append(level_labels)
        for target, (truth, label) in enumerate(zip(truths, level_labels), start=1):
            rows.append({"variant": name, "level": level, "target": target, "score": round(ktc_score(truth, label), 4),
                         "sigma0": round(reconstructor.sigma0, 4), "seconds_per_level": round(seconds, 2),
                         "git_commit": commit})
    return rows, np.stack(images), np.stack(labels), setup


def level_table(rows: list[dict], setups: dict[str, float]) -> str:
    """Markdown: per variant, the level sums (max 4), the total (max 28), sigma0 and the times."""
    header = ["variant", *[f"L{level}" for level in range(1, ktc2023.N_LEVELS + 1)], "total (max 28)", "sigma0",
              "setup s", "s per level"]
    body = []
    for name, setup in setups.items():
        mine = [r for r in rows if r["variant"] == name]
        sums = [sum(r["score"] for r in mine if r["level"] == level) for level in range(1, ktc2023.N_LEVELS + 1)]
        seconds = np.median([r["seconds_per_level"] for r in mine])
        body.append([name, *[f"{s:.3f}" for s in sums], f"{sum(sums):.3f}", f"{mine[0]['sigma0']:.4g}",
                     f"{setup:.1f}", f"{seconds:.1f}"])
    return markdown_table(header, body)


def per_target_table(rows: list[dict], name: str) -> str:
    """Markdown: one variant's scores, level x target."""
    mine = {(r["level"], r["target"]): r["score"] for r in rows if r["variant"] == name}
    body = [[level, *[f"{mine[level, t]:.3f}" for t in range(1, N_TARGETS + 1)],
             f"{sum(mine[level, t] for t in range(1, N_TARGETS + 1)):.3f}"] for level in range(1, ktc2023.N_LEVELS + 1)]
    return markdown_table(["level", *[f"target {t}" for t in range(1, N_TARGETS + 1)], "sum"], body)


def plot_levels(images: np.ndarray, labels: np.ndarray, truths: np.ndarray, path: Path, title: str) -> Path:
    """Rows: the 7 levels, then the truths; per target two columns: the change image (colour scale symmetric
    per image) and its segmentation (0 water white, 1 resistive blue, 2 conductive red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    classes = ListedColormap(["white", "tab:blue", "tab:red"])
    n_levels = images.shape[0]
    figure, axes = plt.subplots(n_levels + 1, 2 * N_TARGETS, figsize=(2 * N_TARGETS * 1.3, (n_levels + 1) * 1.35))
    for t in range(N_TARGETS):
        for level in range(n_levels):
            image = images[level, t]
            bound = float(np.abs(image).max()) or 1.0
            axes[level, 2 * t].imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound)
            axes[level, 2 * t + 1].imshow(labels[level, t], cmap=classes, vmin=0, vmax=2, interpolation="nearest")
        axes[n_levels, 2 * t + 1].imshow(truths[t], cmap=classes, vmin=0, vmax=2, interpolation="nearest")
        axes[0, 2 * t].set_title(f"target {t + 1}: change", fontsize=7)
        axes[0, 2 * t + 1].set_title("segmentation", fontsize=7)
    for level in range(n_levels):
        axes[level, 0].set_ylabel(f"level {level + 1}", fontsize=7)
    axes[n_levels, 1].set_ylabel("truth", fontsize=7)
    for ax in axes.reshape(-1):
        ax.set_xticks([]), ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(profile: str, out_dir: Path, data_root: Path | None = None, report_only: bool = False) -> list[dict]:
    variants = load_profile("ktc2023_levels", profile)["variants"]  # configs/reproduce/ktc2023_levels.yaml
    root = measured_data_root("ktc2023_levels", data_root,
                              "the KTC2023 folder (training/, training_levels/, mesh/; published on Zenodo, see "
                              "the README's Real tanks section)")
    commit = git_commit()
    truths = load_truths(root)
    rows, setups, first = [], {}, None
    for name, overrides in variants.items():
        variant_rows, images, labels, setups[name] = score_variant(root, name, overrides, truths, commit)
        rows += variant_rows
        total = sum(r["score"] for r in variant_rows)
        print(f"{name}: total {total:.3f} of 28 (setup {setups[name]:.1f} s)", flush=True)
        first = first or (name, images, labels, total)
    write_csv(rows, out_dir / "results" / "ktc2023_levels.csv", COLUMNS)
    name, images, labels, total = first
    plot_levels(images, labels, truths, out_dir / "figures" / "ktc2023_levels.png",
                f"KTC2023 training levels, {name}: {total:.2f} of 28")
    text = [f"# KTC2023 training levels: the difference-imaging baseline (`study=ktc2023_levels profile={profile}`)",
            "", "KTC score (`deepunroll.metrics.ktc_score`) of each level's 4 targets against training/trueK.mat, "
            f"summed per level (max 4) and over the 7 levels (max 28). The organisers' reference method scores "
            f"{REFERENCE_TOTAL} of 28 on the same files. Times: one core, this run (setup: mesh, Jacobian at sigma0, "
            "prior factor, pixel map; per level: 4 reconstructions, images and segmentations).", "",
            level_table(rows, setups), "", f"## {name}: per target", "", per_target_table(rows, name), "",
            f"Figure: figures/ktc2023_levels.png. git commit {commit}."]
    (out_dir / "results" / "ktc2023_levels.md").write_text("\n".join(text) + "\n")
    return rows
