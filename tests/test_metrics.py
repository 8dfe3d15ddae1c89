"""Metrics on hand-made cases and PSNR against scikit-image."""

import numpy as np
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
