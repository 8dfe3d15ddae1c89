"""The KTC2023 difference-imaging pipeline: prior factor, difference solve, pixel map, Otsu segmentation, the
challenge's interface and the baseline's score (measured-data tests skip without ../shared/data)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from skimage.filters import threshold_multiotsu

from deepunroll.metrics import ktc_score
from deepunroll.operators.eit.cem import CompleteElectrodeModel
from deepunroll.operators.eit.mesh import build_electrode_disk_mesh, signed_areas
from deepunroll.realdata import ktc2023
from deepunroll.realdata.difference import DifferenceImaging, noise_variance, smoothness_factor
from deepunroll.realdata.ktc_reconstruct import KTCReconstructor, KTCSettings
from deepunroll.realdata.pixel_grid import PixelMap
from deepunroll.realdata.segmentation import otsu3_thresholds, segment_ktc

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ktc2023"
needs_data = pytest.mark.skipif(not (ROOT / "training" / "ref.mat").is_file(),
                                reason=f"KTC2023 data not found under {ROOT} (published by the challenge on Zenodo)")


def gaussian_kernel(points: np.ndarray, std: float, length: float) -> np.ndarray:
    b2 = length**2 / (2 * np.log(100))
    return std**2 * np.exp(-np.square(points[:, None] - points[None]).sum(-1) / (2 * b2))


def test_smoothness_factor_reproduces_the_kernel():
    """R R^T = Gamma_pr to 1e-9 std^2 in every entry (measured 9.4e-10; rank 185 of 400 points)."""
    points = np.random.default_rng(0).uniform(-0.1, 0.1, (400, 2))
    factor = smoothness_factor(points)
    assert factor.shape == (400, 185)
    assert np.abs(factor @ factor.T - gaussian_kernel(points, 0.05, 0.115)).max() <= 1e-9 * 0.05**2
    with pytest.raises(ValueError, match="length > 0"):
        smoothness_factor(points, length=0.0)


def small_cem():
    """8 adjacent-pattern electrodes of 0.3 rad on the unit disk (h0 0.15: 311 triangles), z = 0.01."""
    n_el = 8
    nodes, elements, faces = build_electrode_disk_mesh(n_el, 0.15, 0.3)
    pattern = np.eye(n_el) - np.roll(np.eye(n_el), 1, axis=0)  # column k: +1 at k, -1 at k + 1
    return CompleteElectrodeModel(nodes, elements, faces, pattern, pattern, 0.01), nodes, elements


def test_difference_imaging_equals_the_map_formula_with_masked_rows():
    """The data-space form R (A^T W A + I)^-1 A^T W dU equals Gamma_pr J^T (J Gamma_pr J^T + Gamma_n)^-1 dU with
    the exact kernel, over the rows kept (a mask and a NaN entry both drop a row). Measured 9.8e-11 relative."""
    op, nodes, elements = small_cem()
    centroids = nodes[elements].mean(axis=1)
    sigma = torch.ones(1, elements.shape[0], dtype=torch.float64)
    sigma[0, torch.as_tensor(np.linalg.norm(centroids - [0.4, 0.2], axis=1) < 0.25)] = 2.0
    reference, target = op(torch.ones_like(sigma))[0].numpy(), op(sigma)[0].numpy()
    noise = noise_variance(reference)
    solver = DifferenceImaging(op, 1.0, smoothness_factor(centroids, 0.05, 1.0), noise)
    keep = np.ones(op.n_out, dtype=bool)
    keep[::5] = False
    target[3] = np.nan
    ours = solver(target, reference, keep)[0].numpy()
    rows = keep & np.isfinite(target)
    jac = op.jacobian(torch.ones_like(sigma))[0].numpy()[rows]
    kernel = gaussian_kernel(centroids, 0.05, 1.0)
    exact = kernel @ jac.T @ np.linalg.solve(jac @ kernel @ jac.T + np.diag(noise[rows]), (target - reference)[rows])
    assert np.abs(ours - exact).max() <= 1e-9 * np.abs(exact).max()
    assert np.abs(solver(np.nan_to_num(target), reference)[0].numpy() - exact).max() > 1e-2 * np.abs(exact).max()
    with pytest.raises(ValueError, match="no usable measurement"):
        solver(target, reference, np.zeros(op.n_out, dtype=bool))


def test_gauss_newton_steps_reduce_the_nonlinear_misfit():
    """Noise-free data of a contrast-2 inclusion: relative misfit ||F(1 + dsigma) - y|| / ||y - y_ref|| of the
    linear step 0.182, after 1 and 2 Gauss-Newton steps 0.0166 and 0.0146 (measured)."""
    op, nodes, elements = small_cem()
    centroids = nodes[elements].mean(axis=1)
    sigma = torch.ones(1, elements.shape[0], dtype=torch.float64)
    sigma[0, torch.as_tensor(np.linalg.norm(centroids - [0.4, 0.2], axis=1) < 0.25)] = 2.0
    reference, target = op(torch.ones_like(sigma))[0], op(sigma)[0]
    factor, noise = smoothness_factor(centroids, 0.05, 1.0), noise_variance(reference.numpy())
    misfits = []
    for steps in (0, 1, 2):
        dsigma = DifferenceImaging(op, 1.0, factor, noise, gauss_newton_steps=steps)(target, reference)
        misfits.append(float((op(1 + dsigma)[0] - target).norm() / (target - reference).norm()))
    assert misfits == pytest.approx([0.1822, 0.01656, 0.01458], rel=2e-3)


@pytest.mark.parametrize("mode", ["nodal", "element"])
def test_pixel_map_orientation_on_a_synthetic_inclusion(mode):
    """A disk of radius 3 cm centred at (x, y) = (5, 6) cm on our tank mesh (its mesh elements' centroid (5.06, 5.99) cm)
    lands at row 61.57, column 183.10 of the 256 x 256 grid (rows downwards in y, columns with x; pixel pitch
    2r / 255): measured image centroids (61.49, 183.17) nodal, (61.56, 183.03) element; its area is kept to 1 % (2.889e-3 and 2.880e-3 vs 2.912e-3 m^2 of
    mesh elements); pixels outside the tank are 0 and a constant maps to itself inside."""
    nodes, elements, _ = ktc2023.tank_mesh(0.1)
    values = (np.linalg.norm(nodes[elements].mean(axis=1) - [0.05, 0.06], axis=1) < 0.03).astype(np.float64)
    pixels = PixelMap(nodes, elements, mode=mode)
    image = pixels(values)
    rows, cols = np.mgrid[:256, :256]
    centroid = ((image * rows).sum() / image.sum(), (image * cols).sum() / image.sum())
    assert centroid == pytest.approx({"nodal": (61.49, 183.17), "element": (61.56, 183.03)}[mode], abs=0.01)
    area = values * signed_areas(nodes, elements)
    x, y = (area[:, None] * nodes[elements].mean(axis=1)).sum(axis=0) / area.sum()  # (5.06, 5.99) cm
    w, pitch = 2 * ktc2023.RADIUS / 256, 2 * ktc2023.RADIUS / 255  # centres from -r + w/2 to r + w/2
    assert centroid == pytest.approx(((ktc2023.RADIUS + w / 2 - y) / pitch, (x + ktc2023.RADIUS - w / 2) / pitch),
                                     abs=0.1)  # (61.57, 183.10)
    mesh_area = float(area.sum())
    assert image.sum() * (2 * ktc2023.RADIUS / 256) ** 2 == pytest.approx(mesh_area, rel=1.2e-2)
    constant = pixels(np.ones((2, elements.shape[0])))
    assert constant.shape == (2, 256, 256) and constant[:, 0, 0].tolist() == [0.0, 0.0]
    inside = constant[0] > 0
    np.testing.assert_allclose(constant[0][inside], 1.0, rtol=1e-12)
    assert inside.sum() == pixels.inside.size == 51019


def test_otsu3_hand_case_and_scikit_image():
    """50 zeros, 30 ones, 20 twos: every split with bin 1 alone in the low class and the twos alone in the high
    class ties; the organisers' scan keeps the last, i.e. t_lo = centre of the bin below the ones (0.99609375)
    and t_hi = centre of bin 255 (1.98828125). On a smooth two-blob image the thresholds equal scikit-image's
    threshold_multiotsu (same 256 bins)."""
    values = np.concatenate([np.zeros(50), np.ones(30), 2 * np.ones(20)])
    assert otsu3_thresholds(values) == (0.99609375, 1.98828125)
    labels = segment_ktc(values - 1.0)  # -1, 0, 1: the low class (50 values) is the largest, so it is water
    assert labels.tolist() == [0] * 50 + [2] * 50  # and mid and high are conductive
    yy, xx = np.mgrid[-1:1:128j, -1:1:128j]
    image = np.exp(-((xx - 0.4) ** 2 + yy**2) / 0.05) - 0.7 * np.exp(-((xx + 0.4) ** 2 + (yy - 0.3) ** 2) / 0.03)
    image += 0.02 * np.random.default_rng(0).standard_normal(image.shape)
    np.testing.assert_allclose(otsu3_thresholds(image), threshold_multiotsu(image, classes=3, nbins=256), rtol=1e-12)
    with pytest.raises(ValueError, match="constant"):
        otsu3_thresholds(np.ones(5))


def test_segmentation_class_rule():
    """Largest class water; mid water: low resistive, high conductive; high water: low and mid resistive."""
    two_sided = np.concatenate([np.zeros(60), -np.ones(25), np.ones(15)])
    assert segment_ktc(two_sided).tolist() == [0] * 60 + [1] * 25 + [2] * 15
    mostly_high = np.concatenate([np.ones(60), np.zeros(25), -np.ones(15)])
    assert segment_ktc(mostly_high).tolist() == [0] * 60 + [1] * 40
    assert segment_ktc(two_sided.reshape(10, 10)).dtype == np.uint8


def test_settings_check_themselves():
    with pytest.raises(ValueError, match="mesh must be one of"):
        KTCSettings(mesh="fine")
    with pytest.raises(ValueError, match="needs mesh_root"):
        KTCSettings(mesh="sparse")
    with pytest.raises(ValueError, match="sigma0 must be"):
        KTCSettings(sigma0=-1.0)


@needs_data
def test_level_masks_match_the_nan_pattern_of_every_level():
    """Electrodes 1 .. 2(L - 1) removed: kept counts 2356, 1624, 1404, 1200, 1012, 630, 513 (measured, == the
    non-NaN entries of all 4 files of each level)."""
    ref = ktc2023.load_measurement(ROOT / "training" / "ref.mat")
    counts = []
    for level in range(1, 8):
        keep = ktc2023.level_keep_mask(ref["inj"], ref["mpat"], level)
        counts.append(int(keep.sum()))
        for k in range(1, 5):
            uel = ktc2023.load_measurement(ROOT / "training_levels" / f"level_{level}" / f"data{k}.mat")["uel"]
            np.testing.assert_array_equal(np.isfinite(uel), keep)
    assert counts == [2356, 1624, 1404, 1200, 1012, 630, 513]


@needs_data
def test_baseline_scores_and_the_challenge_interface(tmp_path):
    """The default pipeline (reference settings on our mesh h0 0.05) on level 1 scores 0.697, 0.772, 0.842, 0.663
    against training/trueK.mat (measured; the level-by-level table is results/ktc2023_levels.md), and
    scripts/ktc2023.py --linearised writes the same labels as 1.mat .. 4.mat (uint8, 256 x 256, values in {0, 1, 2});
    a linearisation setting without --linearised (the network is the default) is one line."""
    ref = ktc2023.load_measurement(ROOT / "training" / "ref.mat")
    data = np.stack([ktc2023.load_measurement(ROOT / "training_levels" / "level_1" / f"data{k}.mat")["uel"]
                     for k in range(1, 5)])
    labels = KTCReconstructor(ref).labels(data, 1)
    truths = [scipy.io.loadmat(str(ROOT / "training" / f"true{k}.mat"))["truth"] for k in range(1, 5)]
    scores = [ktc_score(t, r) for t, r in zip(truths, labels)]
    assert scores == pytest.approx([0.697, 0.772, 0.842, 0.663], abs=1.5e-3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ref.mat").symlink_to(ROOT / "training" / "ref.mat")
    for k in range(1, 5):
        (inputs / f"data{k}.mat").symlink_to(ROOT / "training_levels" / "level_1" / f"data{k}.mat")
    script = [sys.executable, str(REPO / "scripts" / "ktc2023.py")]
    done = subprocess.run(script + [str(inputs), str(tmp_path / "out"), "1", "--threads", "1", "--linearised"],
                          capture_output=True, text=True, check=True)
    assert "level 1: 4 reconstructions (linearised difference baseline) written to" in done.stdout
    for k in range(1, 5):
        written = scipy.io.loadmat(str(tmp_path / "out" / f"{k}.mat"))["reconstruction"]
        assert written.dtype == np.uint8 and written.shape == (256, 256) and set(np.unique(written)) <= {0, 1, 2}
        np.testing.assert_array_equal(written, labels[k - 1])
    (inputs / "ref.mat").unlink()
    failed = subprocess.run(script + [str(inputs), str(tmp_path / "out"), "1"], capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
        f"error: KTC2023: {inputs / 'ref.mat'} does not exist (expected the challenge's files under the data root)"]
    bad_level = subprocess.run(script + [str(inputs), str(tmp_path / "out"), "8"], capture_output=True, text=True)
    assert bad_level.returncode == 1 and "level must be an integer in 1..7" in bad_level.stderr
    no_flag = subprocess.run(script + [str(inputs), str(tmp_path / "out"), "1", "--sigma0", "fit"], capture_output=True,
                             text=True)
    assert no_flag.returncode == 1 and no_flag.stderr.strip().splitlines() == [
        "error: --sigma0 applies to the linearised baseline: add --linearised"]


def test_levels_study_needs_its_data_root(tmp_path):
    from deepunroll.studies import ktc2023_levels
    from deepunroll.validation import ConfigError

    with pytest.raises(ConfigError, match="needs data_root=PATH"):
        ktc2023_levels.run("quick", tmp_path)


@needs_data
def test_levels_study_writes_its_table_and_figure(tmp_path):
    """profile=tiny, one coarse variant (h0 0.1) through the whole study: 28 scores, the markdown table and the figure."""
    from deepunroll.studies import ktc2023_levels

    rows = ktc2023_levels.run("tiny", tmp_path, ROOT)
    assert len(rows) == 28 and {r["level"] for r in rows} == set(range(1, 8))
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    total = sum(r["score"] for r in rows)
    assert f"{total:.3f}" in (tmp_path / "results" / "ktc2023_levels.md").read_text()
    assert (tmp_path / "results" / "ktc2023_levels.csv").read_text().count("\n") == 29
    assert (tmp_path / "figures" / "ktc2023_levels.png").stat().st_size > 10_000
