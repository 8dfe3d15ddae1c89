"""Three-class segmentation of a conductivity-change image: the KTC2023 reference method's Otsu rule.

Classes (KTC2023): 0 water (background), 1 resistive, 2 conductive.
"""

from __future__ import annotations

import numpy as np

N_BINS = 256


def otsu3_thresholds(image: np.ndarray, n_bins: int = N_BINS) -> tuple[float, float]:
    """(t_lo, t_hi) of the three-class Otsu threshold as the organisers compute it.

    Histogram of all pixels into ``n_bins`` equal bins over [min, max]; over every split A = bins 1..j,
    B = j+1..i, C = i+1..n_bins (1 <= j < i <= n_bins - 1, all three non-empty) maximise the between-class
    variance sum_k n_k (mu_k - mu)^2 of the bin *index* (count-weighted); ties go to the pair met last
    scanning i, then j, upwards. t_lo, t_hi are the centres of bins j and i.
    """
    values = np.asarray(image, dtype=np.float64).reshape(-1)
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        raise ValueError("otsu3: the image is constant; three classes need at least two distinct values")
    counts, edges = np.histogram(values, bins=n_bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    index = np.arange(1, n_bins + 1, dtype=np.float64)
    n_cum = np.concatenate([[0.0], np.cumsum(counts)])            # n_cum[k] = count of bins 1..k
    s_cum = np.concatenate([[0.0], np.cumsum(counts * index)])
    total, mean = n_cum[-1], s_cum[-1] / n_cum[-1]
    j, i = np.meshgrid(np.arange(1, n_bins), np.arange(1, n_bins), indexing="xy")  # rows i, columns j
    n_a, n_b, n_c = n_cum[j], n_cum[i] - n_cum[j], total - n_cum[i]
    s_a, s_b, s_c = s_cum[j], s_cum[i] - s_cum[j], s_cum[-1] - s_cum[i]
    valid = (j < i) & (n_a > 0) & (n_b > 0) & (n_c > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = sum(n * (s / n - mean) ** 2 for n, s in ((n_a, s_a), (n_b, s_b), (n_c, s_c)))
    between = np.where(valid, between, -np.inf)
    if not np.isfinite(between).any():
        raise ValueError("otsu3: fewer than three occupied histogram bins; cannot split into three classes")
    flat = between.reshape(-1)  # i-major, j-minor: the scan order
    best = flat.size - 1 - int(np.argmax(flat[::-1]))  # the last maximum
    row, col = divmod(best, n_bins - 1)  # i = row + 1, j = col + 1 (1-based bins)
    return float(centres[col]), float(centres[row])


def segment_ktc(image: np.ndarray) -> np.ndarray:
    """KTC2023 labels (uint8, same shape) of a conductivity-change image (positive = more conductive).

    Otsu's three classes low (< t_lo), mid, high (> t_hi); the largest is water. Mid is water: low -> 1,
    high -> 2. Low is water: mid and high -> 2. High is water: low and mid -> 1.
    """
    image = np.asarray(image, dtype=np.float64)
    t_lo, t_hi = otsu3_thresholds(image)
    low, high = image < t_lo, image > t_hi
    mid = ~low & ~high
    labels = np.zeros(image.shape, dtype=np.uint8)
    water = int(np.argmax([low.sum(), mid.sum(), high.sum()]))
    if water == 1:
        labels[low], labels[high] = 1, 2
    elif water == 0:
        labels[mid | high] = 2
    else:
        labels[low | mid] = 1
    return labels
