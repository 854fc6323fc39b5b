"""Noisy benchmark inputs and image-quality metrics shared by validation, evaluation, sweeps and benchmarks.

The noise for image ``i`` at level ``sigma`` depends only on (seed, i, sigma): every method sees the same noisy
input, and the figures do not change with batch size or with how many images are evaluated.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def to_float(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 255.0


def make_noisy(clean: np.ndarray, sigma: float, seed: int, first_index: int = 0) -> np.ndarray:
    """clean float32 (N,H,W,C) in [0,1] plus N(0, sigma^2) noise, unclipped; image i uses its own seeded stream."""
    out = np.empty_like(clean, dtype=np.float32)
    sigma_key = int(round(sigma * 1_000_000))
    for k, img in enumerate(clean):
        rng = np.random.default_rng([seed, first_index + k, sigma_key])
        out[k] = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return out


def psnr_ssim(clean: np.ndarray, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM, scikit-image, data_range 1, estimates clipped to [0, 1] first."""
    estimate = np.clip(estimate, 0, 1)
    psnr = np.array([peak_signal_noise_ratio(c, e, data_range=1.0) for c, e in zip(clean, estimate)])
    ssim = np.array([structural_similarity(c, e, data_range=1.0, channel_axis=-1) for c, e in zip(clean, estimate)])
    return psnr, ssim


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def psnr_of_mean_mse(psnr: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) of the mean MSE over images, from per-image PSNRs (data range 1), and the half-width of its 95%
    confidence interval (the mean MSE's, carried through the log by the delta method).

    The published diffusion-denoiser figures (Kong et al., ICLR 2023) are in this form; it is never above the mean
    of per-image PSNRs, since the worst images dominate the mean MSE."""
    mse = 10.0 ** (-np.asarray(psnr, dtype=np.float64) / 10.0)
    mean, ci = mean_ci95(mse)
    return float(-10.0 * math.log10(mean)), float(10.0 / math.log(10.0) * ci / mean)
