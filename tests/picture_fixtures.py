"""A small folder of generated pictures as a user would have one: mixed sizes, formats, bit depths and channels,
a corrupt file, a duplicate and one too small to crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def smooth_picture(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    """Float pixels in [0, 1]: a random colour gradient with a little texture, (H, W) or (H, W, C)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    planes = [np.clip(a * x + b * y + 0.1 * np.sin(c * x * 20), 0, 1) for a, b, c in rng.uniform(0.2, 0.8, (3, 3))]
    picture = np.stack(planes, axis=-1)
    return picture[..., 0] if channels == 1 else picture


def as_uint(picture: np.ndarray, dtype=np.uint8) -> np.ndarray:
    return np.round(picture * np.iinfo(dtype).max).astype(dtype)


def write_picture_folder(root: Path) -> dict[str, str]:
    """Write the folder; return {file name: what it is}, the usable ones marked ``ok``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested").mkdir(exist_ok=True)
    Image.fromarray(as_uint(smooth_picture(48, 72, 0))).save(root / "a.png")
    Image.fromarray(as_uint(smooth_picture(64, 40, 1))).save(root / "b.jpg", quality=95)
    Image.fromarray(as_uint(smooth_picture(40, 40, 2))).save(root / "nested" / "c.webp", lossless=True)
    np.save(root / "d.npy", as_uint(smooth_picture(56, 50, 3, channels=1), np.uint16))  # 16-bit gray
    Image.fromarray(as_uint(smooth_picture(44, 60, 4))).save(root / "e.tif")
    Image.fromarray(as_uint(smooth_picture(70, 45, 5))).save(root / "f.png")
    Image.fromarray(as_uint(smooth_picture(52, 52, 6))).save(root / "g.png")
    (root / "copy_of_a.png").write_bytes((root / "a.png").read_bytes())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.fromarray(as_uint(smooth_picture(20, 90, 7))).save(root / "thin.png")
    (root / "notes.txt").write_text("not a picture: ignored by its name")
    return {"a.png": "ok", "b.jpg": "ok", "nested/c.webp": "ok", "d.npy": "ok", "e.tif": "ok", "f.png": "ok",
            "g.png": "ok", "copy_of_a.png": "duplicate", "broken.png": "unreadable", "thin.png": "too small"}
