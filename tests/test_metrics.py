"""Metrics on hand-made cases and PSNR against scikit-image."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from deepunroll.metrics import dynamic_range, mse, psnr, relative_error


def test_hand_made_cases():
    x = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    x_hat = torch.tensor([[3.0, 4.0, 5.0]], dtype=torch.float64)
    assert mse(x_hat, x).item() == 25.0 / 3
    assert relative_error(x_hat, x).item() == 1.0            # ||(0,0,5)|| / ||(3,4,0)||
    assert dynamic_range(x_hat, x).item() == 50.0            # range (5 - 3) over range (4 - 0)


def test_psnr_matches_scikit_image():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(6, 53))
    x_hat = x + 0.1 * rng.standard_normal((6, 53))
    ours = psnr(torch.from_numpy(x_hat), torch.from_numpy(x)).numpy()
    for i in range(6):
        ref = peak_signal_noise_ratio(x[i], x_hat[i], data_range=x[i].max() - x[i].min())
        np.testing.assert_allclose(ours[i], ref, rtol=1e-12)


def test_ssim_matches_scikit_image_per_sample_range():
    from skimage.metrics import structural_similarity

    from deepunroll.metrics import METRICS, ssim

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(4, 16, 12)) * np.array([1.0, 0.5, 2.0, 0.1])[:, None, None]  # ranges differ
    x_hat = x + 0.05 * rng.standard_normal(x.shape)
    ours = ssim(torch.from_numpy(x_hat), torch.from_numpy(x))
    assert ours.shape == (4,) and ours.dtype == torch.float64 and METRICS["ssim"] is ssim
    for i in range(4):
        ref = structural_similarity(x[i], x_hat[i], data_range=x[i].max() - x[i].min())
        np.testing.assert_allclose(ours[i].item(), ref, rtol=1e-12)
    assert torch.allclose(ssim(torch.from_numpy(x), torch.from_numpy(x)), torch.ones(4, dtype=torch.float64))


def test_mesh_ssim_matches_an_element_loop():
    """MeshSSIM against a per-element loop over vertex-sharing neighbourhoods (README, Metrics (ours))."""
    from deepunroll.metrics import MeshSSIM

    elements = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 4], [4, 5, 6], [5, 6, 7]])
    rng = np.random.default_rng(1)
    x, x_hat = rng.uniform(0.5, 2, size=(2, 5)), rng.uniform(0.5, 2, size=(2, 5))
    ours = MeshSSIM(torch.from_numpy(elements))(torch.from_numpy(x_hat), torch.from_numpy(x)).numpy()
    for b in range(2):
        L = x[b].max() - x[b].min()
        c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
        values = []
        for e in range(5):
            window = [f for f in range(5) if set(elements[e]) & set(elements[f])]
            a, t = x_hat[b, window], x[b, window]
            cov = ((a - a.mean()) * (t - t.mean())).mean()
            values.append((2 * a.mean() * t.mean() + c1) * (2 * cov + c2)
                          / ((a.mean() ** 2 + t.mean() ** 2 + c1) * (a.var() + t.var() + c2)))
        np.testing.assert_allclose(ours[b], np.mean(values), rtol=1e-12)
    assert MeshSSIM(torch.from_numpy(elements))(torch.from_numpy(x), torch.from_numpy(x)).tolist() == [1.0, 1.0]


def _disc_map(cx: int, cy: int, radius: int, value: int, image=None):
    image = np.zeros((256, 256)) if image is None else image
    yy, xx = np.mgrid[:256, :256]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = value
    return image


def test_ktc_score_hand_cases():
    """Identical maps score 1; a class absent from both maps scores 1 for that class (so an empty map against an
    empty truth is 1, and against a truth with one class 0.5 + its term); swapping the classes scores lower; a
    map of another size scores 0 (the challenge's rules)."""
    from deepunroll.metrics import ktc_score

    truth = _disc_map(80, 100, 25, 1, _disc_map(170, 150, 30, 2))
    assert ktc_score(truth, truth) == pytest.approx(1.0, abs=1e-12)
    assert ktc_score(np.zeros((256, 256)), np.zeros((256, 256))) == pytest.approx(1.0, abs=1e-12)
    resistive_only = _disc_map(80, 100, 25, 1)
    half = ktc_score(resistive_only, np.zeros((256, 256)))
    assert half == pytest.approx(0.50971, abs=1e-5)  # conductive term 1 (absent in both), resistive term 0.0194
    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0))
    shifted = _disc_map(90, 100, 25, 1, _disc_map(160, 150, 30, 2))
    assert ktc_score(truth, swapped) == pytest.approx(-0.01838, abs=1e-5)  # measured
    assert ktc_score(truth, shifted) == pytest.approx(0.75234, abs=1e-5)   # measured: 10 px shifts
    assert ktc_score(truth, truth[:255, :255]) == 0.0
    # values within 0.1 of a class count as that class
    assert ktc_score(truth, truth + 0.05) == pytest.approx(1.0, abs=1e-12)


def test_ktc_local_means_equal_the_two_dimensional_convolution():
    """The separable matrix form of the score's window equals scipy's zero-padded 'same' convolution with the
    321 x 321 truncated Gaussian (to rounding)."""
    from scipy.signal import fftconvolve

    from deepunroll.metrics import KTC_RADIUS, _ktc_window_matrix

    offsets = np.arange(-2 * int(KTC_RADIUS), 2 * int(KTC_RADIUS) + 1)
    line = np.exp(-offsets.astype(np.float64) ** 2 / (2 * KTC_RADIUS**2))
    image = np.random.default_rng(0).random((256, 256))
    window = _ktc_window_matrix()
    np.testing.assert_allclose(window @ image @ window, fftconvolve(image, np.outer(line, line), mode="same"),
                               rtol=1e-10)
