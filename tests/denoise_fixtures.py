"""Helpers for the denoise / export / serve tests: a tiny checkpoint, noisy photos, image files written by other
libraries than the ones under test (so a codec is never checked only against itself)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch


def write_tiny_checkpoint(path: Path, params, perturb: float = 0.05, seed: int = 0) -> Path:
    """A checkpoint of the tiny model. A fresh U-Net is nearly the identity (zero-initialised block outputs), so the
    weights are jittered: every layer then shapes the output, as in a trained model."""
    from ddim_denoise.denoising.denoiser import build_model
    from ddim_denoise.pipeline.checkpoint import save_checkpoint

    with torch.random.fork_rng():  # the same weights whatever ran before (tests compare against thresholds)
        torch.manual_seed(seed)
        model, _ = build_model(params)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(perturb * torch.randn(parameter.shape, generator=generator))
    state = model.state_dict()
    save_checkpoint(path, {"params": params.model_dump(), "model": state, "ema": state})
    return path


def noisy_photo(height: int, width: int, sigma: float = 0.1, seed: int = 0) -> np.ndarray:
    """A crop of a real photograph (scikit-image's astronaut) plus Gaussian noise: float32 (H, W, 3), unclipped."""
    from skimage import data

    clean = data.astronaut()[100:100 + height, 150:150 + width].astype(np.float32) / 255
    rng = np.random.default_rng(seed)
    return clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32)


def quantize(image: np.ndarray, dtype) -> np.ndarray:
    scale = np.iinfo(dtype).max
    return np.clip(np.rint(image * scale), 0, scale).astype(dtype)


def encode_with_reference(fmt: str, pixels: np.ndarray) -> bytes:
    """Image bytes written by a library other than the code under test: Pillow, imagecodecs, tifffile, NumPy."""
    buffer = io.BytesIO()
    if fmt == "png" and pixels.dtype == np.uint16 and pixels.ndim == 3:
        import imagecodecs  # Pillow cannot write 16-bit colour PNGs

        return bytes(imagecodecs.png_encode(pixels))
    if fmt == "tiff":
        import tifffile

        colour = pixels.ndim == 3 and pixels.shape[2] >= 3
        tifffile.imwrite(buffer, pixels, photometric="rgb" if colour else "minisblack")
    elif fmt == "npy":
        np.save(buffer, pixels)
    else:
        from PIL import Image

        options = {"lossless": True, "exact": True} if fmt == "webp" else {}  # exact: keep colour where alpha is 0
        Image.fromarray(pixels).save(buffer, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt], **options)
    return buffer.getvalue()


def decode_with_reference(path: Path) -> np.ndarray:
    """Stored pixels of a written file, read back by a library other than the code under test."""
    return decode_bytes_with_reference(Path(path).read_bytes())


def decode_bytes_with_reference(data: bytes) -> np.ndarray:
    if data.startswith(b"\x89PNG"):
        import imagecodecs

        return imagecodecs.png_decode(data)
    if data.startswith((b"II*\x00", b"MM\x00*")):
        import tifffile

        return tifffile.imread(io.BytesIO(data))
    if data.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(data))
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))
