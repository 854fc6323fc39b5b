"""Denoising large images in overlapping tiles, blended with a smooth window so that no seams show.

Why tiles: a U-Net pass needs memory in proportion to the pixels it sees (self-attention even to their square), so a
photo denoised whole can exhaust memory; the model was also trained on small crops. Tiles of ``tile`` pixels overlap
by ``overlap`` pixels and go through the denoiser ``batch`` at a time, so memory is bounded by the tile batch plus
the output accumulators, whatever the image size.

Why a window: a tile's border pixels lack context and are the least reliable. Each tile's output is weighted by a
window that is 1 in its middle and falls smoothly (raised cosine) to near zero over the overlap, and the image is the
weighted sum divided by the summed weights. The weights never reach zero, so pixels on the image border, covered by
a single tile, are reproduced as that tile gives them; a denoiser that returns its input gives back the input
exactly, whatever the tiling (the test of "no seams").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ddim_denoise.pipeline.errors import InputError

# (tiles (n, h, w, 3) float32, sigma (n,) float32) -> denoised tiles of the same shape, e.g. Denoiser.denoise
BatchDenoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TileOptions:
    tile: int = 64  # tile side in pixels; images no larger than this in both directions go whole
    overlap: int = 16  # pixels shared by neighbouring tiles, over which they are blended
    batch: int = 16  # tiles per denoiser call: bounds memory

    def validate(self) -> "TileOptions":
        if self.tile < 1 or self.batch < 1:
            raise InputError(f"tile size ({self.tile}) and tile batch ({self.batch}) must be at least 1")
        if not 0 <= self.overlap < self.tile:
            raise InputError(f"tile overlap ({self.overlap}) must lie in [0, tile size {self.tile})")
        return self


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: a stride of ``tile - overlap``, the last tile flush with the far edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def tile_boxes(height: int, width: int, options: TileOptions) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of every tile covering the image, row by row."""
    th, tw = min(options.tile, height), min(options.tile, width)
    return [(top, left, th, tw) for top in tile_starts(height, th, options.overlap)
            for left in tile_starts(width, tw, options.overlap)]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1-D window: raised-cosine ends of ``overlap`` samples (never zero), 1 in between."""
    taper = min(overlap, length // 2)
    window = np.ones(length, dtype=np.float64)
    if taper:
        edge = np.sin(0.5 * np.pi * (np.arange(taper) + 0.5) / taper) ** 2
        window[:taper] = edge
        window[length - taper:] = edge[::-1]
    return window


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """(height, width, 1) weights for one tile's output: the outer product of two 1-D ramps."""
    return np.outer(_ramp(height, overlap), _ramp(width, overlap))[..., None]


def denoise_tiled(denoise: BatchDenoiser, image: np.ndarray, sigma: float, options: TileOptions = TileOptions(),
                  on_tiles: Callable[[int], None] | None = None) -> np.ndarray:
    """Denoise one float32 (H, W, 3) image at noise level ``sigma``, in tiles when it exceeds ``options.tile``.

    ``on_tiles(n)`` is told after every denoiser call how many tiles it finished (for a progress bar); an image that
    goes whole counts as one tile.
    """
    options.validate()
    height, width = image.shape[:2]
    boxes = tile_boxes(height, width, options)
    if len(boxes) == 1:
        out = denoise(image[None], np.full(1, sigma, dtype=np.float32))[0]
        if on_tiles:
            on_tiles(1)
        return out
    _, _, th, tw = boxes[0]
    window = blend_window(th, tw, options.overlap).astype(np.float32)
    total = np.zeros((height, width, image.shape[2]), dtype=np.float32)  # float32: a large photo's accumulators
    weight = np.zeros((height, width, 1), dtype=np.float32)  # cost as much as the image itself, no more
    for first in range(0, len(boxes), options.batch):
        chunk = boxes[first:first + options.batch]
        tiles = np.stack([image[top:top + th, left:left + tw] for top, left, _, _ in chunk])
        denoised = denoise(tiles, np.full(len(chunk), sigma, dtype=np.float32))
        for (top, left, _, _), tile in zip(chunk, denoised, strict=True):
            total[top:top + th, left:left + tw] += window * tile
            weight[top:top + th, left:left + tw] += window
        if on_tiles:
            on_tiles(len(chunk))
    return total / weight
