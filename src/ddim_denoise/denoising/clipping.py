"""Noise that was clipped to [0, 1], as in every 8- or 16-bit image file, and the noise level of an image.

The model was trained on unclipped Gaussian noise. A noisy pixel stored as exactly 0 or 1 only says that x + n fell
at or beyond that bound, and treating it as an ordinary noisy value misleads the model badly, by several dB at high
sigma on 8-bit inputs (docs/serving.md, *Clipped noise*; the evaluate stage's "one-step, 8-bit input" rows measure
what is left after unclipping). ``unclip`` puts such
pixels back where Gaussian noise could have put them: around a clean estimate, it draws the noise from the normal
distribution truncated to the clipped side. Alternating this with the denoiser converges in a few passes.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

# Immerkaer's (1996) noise-only 3x3 filter: it cancels constants, ramps and quadratics, and its squared weights sum
# to 1, so filtered white noise keeps the noise's standard deviation.
NOISE_FILTER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64) / 6
MAD_TO_STD = 1 / 0.6744897501960817  # Gaussian: std = median(|x|) / Phi^-1(3/4)
CLIP_AT = 3.0  # the refinement's RMS ignores filter outputs beyond 3 estimated stds (edges, texture)
# Variance of a standard normal truncated to [-3, 3], to undo what that cut removes from the RMS.
TRUNCATED_VARIANCE = 1 - 2 * CLIP_AT * np.exp(-CLIP_AT**2 / 2) / np.sqrt(2 * np.pi) / (2 * ndtr(CLIP_AT) - 1)
REFINE_ITERATIONS = 3


def as_8bit(images: np.ndarray) -> np.ndarray:
    """What writing and reading an 8-bit image file does to float images on the [0, 1] scale: round and clip."""
    return (np.clip(np.round(images * 255), 0, 255) / 255).astype(np.float32)


def saturated(images: np.ndarray) -> np.ndarray:
    """Pixels stored at exactly 0 or 1: where clipping hid the noise (unclipped noisy values never land there)."""
    return (images == 0) | (images == 1)


def estimate_noise_sigma(image: np.ndarray) -> float:
    """Pixel-scale noise std of one (H, W, C) image: a robust spread of its noise-only filter outputs.

    The median absolute output gives a first estimate; an RMS over the outputs within 3 of those stds (corrected
    for the cut) refines it, being less noisy than the median on the ~2,700 outputs a 32x32 image has. Clipped noise
    is under-estimated (by ~15% at sigma 0.3 in 8-bit files): give the level when it is known.

    Exactly constant 3x3 windows are left out: they hold no noise at all (a file's transparent or padded regions),
    noisy pixels practically never agree nine times over, and half an image of them pulled the median to 0.
    """
    planes = np.moveaxis(np.asarray(image, dtype=np.float64), -1, 0)
    if min(planes.shape[-2:]) < 3:
        return float("nan")
    # Every 3x3 window of each channel, without padding (no border effects on small images).
    windows = np.lib.stride_tricks.sliding_window_view(planes, (3, 3), axis=(-2, -1))
    noisy = (windows.max(axis=(-2, -1)) > windows.min(axis=(-2, -1))).ravel()
    values = np.abs(np.einsum("...ij,ij->...", windows, NOISE_FILTER)).ravel()[noisy]
    if len(values) == 0:  # a noise-free, flat image: sigma is 0
        return 0.0
    sigma = np.median(values) * MAD_TO_STD
    for _ in range(REFINE_ITERATIONS):
        kept = values[values < CLIP_AT * sigma]
        if len(kept) == 0:  # a noise-free, flat image: sigma is 0
            break
        sigma = np.sqrt(np.mean(kept**2) / TRUNCATED_VARIANCE)
    return float(sigma)


def unclip(noisy: np.ndarray, estimate: np.ndarray, sigma: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``noisy`` with its saturated pixels redrawn as estimate + n, n ~ N(0, sigma^2) given that it was clipped.

    ``noisy`` and ``estimate`` are (N, H, W, C) on the [0, 1] scale, ``sigma`` one pixel-scale level per image. A
    pixel at 0 gets n <= -estimate, one at 1 gets n >= 1 - estimate (inverse-CDF sampling of the truncated normal).
    """
    s = np.asarray(sigma, dtype=np.float64).reshape(-1, 1, 1, 1)
    x = np.asarray(estimate, dtype=np.float64)
    tiny = 1e-12  # keeps the CDF bounds off 0 and 1 where the estimate contradicts the clipping
    low_cdf = np.clip(ndtr(-x / s), tiny, 1)  # P(n <= -x)
    high_cdf = np.clip(ndtr((1 - x) / s), 0, 1 - tiny)  # P(n <= 1 - x)
    u = rng.uniform(size=x.shape)
    out = np.array(noisy, dtype=np.float64)
    low, high = noisy == 0, noisy == 1
    out[low] = (x + s * ndtri(u * low_cdf))[low]
    out[high] = (x + s * ndtri(high_cdf + u * (1 - high_cdf)))[high]
    return out.astype(np.float32)


def share_noise(unclipped: np.ndarray, noisy: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """``unclip``'s output for monochromatic noise (one draw per pixel in every channel), made to hold one draw.

    ``unclip`` redraws each clipped channel on its own. Where a pixel has channels that were not clipped, they show
    its noise (noisy - estimate, their mean); where all were clipped, the channels' redraws are averaged. The clipped
    channels become estimate + that noise, kept on their clipped side of the bound.
    """
    clipped = saturated(noisy)
    noise = unclipped.astype(np.float64) - estimate
    n_free = (~clipped).sum(axis=-1, keepdims=True)
    shown = np.where(clipped, 0, noise).sum(axis=-1, keepdims=True) / np.maximum(n_free, 1)
    shared = np.where(n_free > 0, shown, noise.mean(axis=-1, keepdims=True))
    redrawn = estimate + shared
    redrawn = np.where(noisy == 1, np.maximum(redrawn, 1), np.minimum(redrawn, 0))
    return np.where(clipped, redrawn, unclipped).astype(np.float32)
