"""Grayscale images through the RGB model: make their noise look like the noise the model was trained on.

A noisy gray image holds one noise draw per pixel. Replicated to RGB, all three channels carry that same draw, and the
model, trained on independent noise in each channel, has never seen such noise: along the gray axis it is sqrt(3)
times as strong as in an RGB image of the same sigma, and across colours it is absent. Told sigma, the model removes
little of it, barely improving on the noisy input (docs/serving.md, *Gray images*).

``whiten`` adds fresh noise in the two colour directions only, sqrt(3)·sigma strong. The replicated noise
(covariance sigma^2·11ᵀ) plus the colour noise (3·sigma^2·(I - 11ᵀ/3)) is then white, variance 3·sigma^2 everywhere:
exactly an RGB image at noise level sqrt(3)·sigma whose clean picture happens to be gray, which the model denoises as
it was trained to. ``to_gray`` averages the three denoised channels back to one. Colour pictures with
monochromatic noise (the same draw in R, G and B) are whitened the same way (``Denoiser.denoise(mono_noise=True)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddim_denoise.denoising.clipping import estimate_noise_sigma

RGB_SIGMA_FACTOR = math.sqrt(3)  # noise std of the whitened RGB image per unit of the gray image's noise std
# looks_mono_noise: an image's noise counts as one draw in R, G and B when its colour differences carry less than this
# share of the image's noise level. Noise drawn per channel gives a ratio near 1, monochromatic noise one near 0 (only
# the image's texture shows in its colour differences); 0.4 lies between the two on CIFAR-10 test images, float and
# 8-bit, at sigma 0.02-0.5 (docs/serving.md, *Monochromatic noise*; tests/test_grayscale.py checks both sides).
MONO_NOISE_MAX_RATIO = 0.4
# Below this given sigma the two overlap (texture outweighs the noise): taking per-channel noise for monochromatic
# there costs far more than the monochromatic path gains, so such images keep the default.
MONO_NOISE_MIN_SIGMA = 0.015


def identical_channels(images: np.ndarray) -> np.ndarray:
    """(N,) True for the (N, H, W, C) images whose channels are all equal: gray pictures, stored as gray or RGB."""
    images = np.asarray(images)
    return (images == images[..., :1]).reshape(len(images), -1).all(axis=1)


def looks_mono_noise(images: np.ndarray, sigma: float | np.ndarray | None = None) -> np.ndarray:
    """(N,) True for the (N, H, W, 3) images whose noise looks monochromatic: their colour differences (R - G and
    G - B, over sqrt(2): one channel's noise level if drawn per channel) show almost none of the image's noise, where
    noise drawn per channel shows all of it. False for images with fewer than three channels, which have no colour
    differences to tell by, and, where their noise level ``sigma`` is given, for those below MONO_NOISE_MIN_SIGMA."""
    images = np.asarray(images, dtype=np.float64)
    if images.shape[-1] < 3:
        return np.zeros(len(images), dtype=bool)
    found = []
    for image in images:
        level = estimate_noise_sigma(image)
        differences = np.stack([image[..., 0] - image[..., 1], image[..., 1] - image[..., 2]], axis=-1) / math.sqrt(2)
        found.append(estimate_noise_sigma(differences) < MONO_NOISE_MAX_RATIO * level)
    found = np.array(found, dtype=bool)
    if sigma is not None:
        found &= np.broadcast_to(np.asarray(sigma), (len(images),)) >= MONO_NOISE_MIN_SIGMA
    return found


def whiten(noisy: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 1, H, W) gray images with noise std ``sigma`` (N,) -> (N, 3, H, W) RGB with white noise of std
    ``RGB_SIGMA_FACTOR * sigma`` (same scale as the input). (N, 3, H, W) colour images whose noise is one draw copied
    to all three channels (monochromatic noise) are whitened the same way."""
    n, _, h, w = noisy.shape
    z = torch.randn((n, 3, h, w), generator=generator, device=noisy.device, dtype=noisy.dtype)
    colour = z - z.mean(dim=1, keepdim=True)  # the projection onto the plane orthogonal to gray
    return noisy.expand(-1, 3, -1, -1) + colour * (RGB_SIGMA_FACTOR * sigma).view(-1, 1, 1, 1).to(noisy.dtype)


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): the channel mean, as a gray file stores a colour picture (``image_io``)."""
    return rgb.mean(dim=1, keepdim=True)
