"""Pixels and the model's scale. Images are [0, 1] pixels outside the model and [-1, 1] inside it: values and noise
levels double on the way in and halve on the way out. Training, denoising and export all convert through here."""

from __future__ import annotations

import torch


def to_model(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1] model scale."""
    return pixels * 2 - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model scale -> [0, 1] pixels (not clamped)."""
    return (x + 1) / 2


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255, any layout) -> float32 on the model scale, in one float copy."""
    return images.float().div_(127.5).sub_(1)


def sigma_to_model(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """A pixel-scale noise level -> the model scale: the range doubles, so does the noise."""
    return 2.0 * sigma


def sigma_to_pixels(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """A model-scale noise level -> the pixel scale."""
    return 0.5 * sigma
