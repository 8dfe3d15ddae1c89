"""The measured targets' twin (deepunroll/realdata/ktc_twin.py): truth images on the mesh, the conductivity fit, the
twin's data per level. Operator tests skip without ../shared/data (ref.mat gives the patterns)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from deepunroll.realdata import ktc2023
from deepunroll.realdata.ktc_sim import KTCDifferenceCEM
from deepunroll.realdata.ktc_twin import TankTwin, fit_conductivities, truth_classes

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ktc2023"
needs_data = pytest.mark.skipif(not (ROOT / "training" / "ref.mat").is_file(),
                                reason=f"KTC2023 data not found under {ROOT} (published by the challenge on Zenodo)")
R = ktc2023.RADIUS
DISC, SQUARE = (0.03, -0.04, 0.025), (-0.05, 0.03, 0.02)  # (x, y, radius or half side) in m


def truth_image(n: int = 256) -> np.ndarray:
    """(n, n) KTC-style truth: a conductive disc (2) low right, a resistive square (1) high left, water (0)."""
    w = 2 * R / n
    c = np.linspace(-R + w / 2, R + w / 2, n)
    x, y = np.meshgrid(c, c[::-1])  # row 0 is the top (largest y)
    image = np.zeros((n, n), dtype=np.uint8)
    image[np.hypot(x - DISC[0], y - DISC[1]) < DISC[2]] = 2
    image[(np.abs(x - SQUARE[0]) < SQUARE[2]) & (np.abs(y - SQUARE[1]) < SQUARE[2])] = 1
    return image


def test_truth_classes_put_each_centroid_in_its_pixel():
    """Centroids well inside the disc / square get its class, those well outside water: the orientation (rows top
    down) and the pixel centres hold, since both shapes are off the centre lines; a (n, m) image is one error."""
    nodes, elements, _ = ktc2023.tank_mesh(0.1)
    centroids = nodes[elements].mean(axis=1)
    classes = truth_classes(truth_image()[None], centroids, R)[0].numpy()
    to_disc = np.hypot(centroids[:, 0] - DISC[0], centroids[:, 1] - DISC[1])
    to_square = np.abs(centroids - np.array(SQUARE[:2])).max(axis=1)
    assert (classes[to_disc < DISC[2] - 0.002] == 2).all() and (classes[to_square < SQUARE[2] - 0.002] == 1).all()
    outside = (to_disc > DISC[2] + 0.002) & (to_square > SQUARE[2] + 0.002)
    assert (classes[outside] == 0).all() and (classes == 2).sum() > 10 and (classes == 1).sum() > 10
    with pytest.raises(ValueError, match=r"truths must be \(B, n, n\) images"):
        truth_classes(np.zeros((1, 4, 5)), centroids, R)


@pytest.fixture(scope="module")
def operator():
    """The tank's difference CEM at level 1 on the coarse mesh (352 triangles)."""
    if not (ROOT / "training" / "ref.mat").is_file():
        pytest.skip(f"KTC2023 data not found under {ROOT}")
    return KTCDifferenceCEM(ROOT, h0=0.15)


@needs_data
def test_fit_recovers_the_conductivities_of_simulated_data(operator):
    """Noise-free data of the truth with water 1.03 bg, resistive 0.04 bg and conductive 12 bg: the fit returns them
    to 1e-8 relative (measured: 4e-11) with a relative misfit under 1e-9 (measured 8e-12), from the default start; a class the target lacks
    keeps its start; a classes array of the wrong shape is one error."""
    classes = truth_classes(np.stack([truth_image(), np.where(truth_image() == 1, 0, truth_image())]),
                            operator.centroids, R)
    values = operator.background * torch.tensor([[1.03, 0.04, 12.0], [0.98, 0.05, 3.0]], dtype=torch.float64)
    y = operator(torch.gather(values, 1, classes))
    fitted, misfit = fit_conductivities(operator, classes, y)
    torch.testing.assert_close(fitted[0], values[0], rtol=1e-8, atol=0)
    torch.testing.assert_close(fitted[1, [0, 2]], values[1, [0, 2]], rtol=1e-8, atol=0)
    assert float(fitted[1, 1]) == pytest.approx(0.05 * operator.background)  # no resistive class: the start
    assert float(misfit.max()) < 1e-9
    with pytest.raises(ValueError, match=r"classes must be \(B=2, E=352\)"):
        fit_conductivities(operator, classes[:, :10], y)


@needs_data
def test_twin_data_follow_the_level_mask_and_the_noise_model(operator):
    """The twin of simulated 'measurements' reproduces them at level 1 without noise; at level 3 the removed rows are
    exactly 0 and the noise on the kept rows has unit standard deviation in units of the operator's noise std
    (within 0.05 over 1,404 entries); the same seed gives the same data; an operator not at level 1 is an error."""
    truths = truth_image()[None]
    values = operator.background * torch.tensor([[1.0, 0.05, 8.0]], dtype=torch.float64)
    measured = operator(torch.gather(values, 1, truth_classes(truths, operator.centroids, R)))
    quiet = TankTwin(operator, truths, measured, noise=0.0)
    torch.testing.assert_close(quiet.data(1), measured, rtol=1e-5, atol=1e-9)
    noisy = TankTwin(operator, truths, measured, noise=1.0, seed=3)
    level3 = noisy.data(3)
    keep = operator.level_masks([3])[0] > 0
    assert int(keep.sum()) == 1404 and (level3[0, ~keep] == 0).all()
    scaled = ((level3 - quiet.data(1)) / operator.noise_std())[0, keep]
    assert float(scaled.std()) == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(noisy.data(3), level3, rtol=0, atol=0)
    with pytest.raises(ValueError, match="TankTwin needs the operator at level 1"):
        TankTwin(KTCDifferenceCEM(ROOT, h0=0.15, level=3), truths, measured)
