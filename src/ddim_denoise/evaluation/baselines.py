"""Classical Gaussian denoisers used as baselines, with the model's call shape: ``fn(noisy, sigma) -> estimate``.

Both take float32 images (N, H, W, 3) on the [0, 1] scale (BM3D also gray ones, (N, H, W, 1)), noisy and NOT
clipped (clipping first would bias the noise the method was told about), and return float32 estimates clipped to
[0, 1], as ``Denoiser.denoise`` does. Both work one image at a time on the CPU; ``workers > 1`` spreads the images
over that many processes.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable

import numpy as np

# BM3D: the "np" (normal profile) settings of the reference implementation, colour via the opponent transform.
BM3D_PROFILE = "np"
BM3D_COLORSPACE = "opp"

# Non-local means, scikit-image's recommended use: filter strength h a bit below the noise sigma, the fast
# (box-kernel) variant, 5x5 patches searched within 6 pixels (13x13 window), which suits 32x32 images.
NLM_H_FACTOR = 0.8
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 6
NLM_FAST_MODE = True


def _bm3d_one(image: np.ndarray, sigma: float, profile: str, colorspace: str) -> np.ndarray:
    import bm3d

    if image.shape[-1] == 1:  # gray: the single-channel algorithm
        return bm3d.bm3d(image[..., 0], sigma_psd=sigma, profile=profile)[..., None]
    return bm3d.bm3d_rgb(image, sigma_psd=sigma, profile=profile, colorspace=colorspace)


def _nlm_one(image: np.ndarray, sigma: float, h_factor: float, patch_size: int, patch_distance: int,
             fast_mode: bool) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(image, h=h_factor * sigma, sigma=sigma, fast_mode=fast_mode, patch_size=patch_size,
                            patch_distance=patch_distance, channel_axis=-1)


def resolve_workers(setting: str | int) -> int:
    """``eval.workers``: ``auto`` is one process per CPU core this process may run on (a container's or taskset's
    share, where the OS tells it), else the number given."""
    if setting != "auto":
        return int(setting)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _import_baselines(_: int) -> None:
    import bm3d  # noqa: F401
    import skimage.restoration  # noqa: F401


@functools.lru_cache(maxsize=None)
def worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes, started once and reused for the rest of this process. A pool per call made every call
    pay seconds of start-up (each worker imports the caller's main module, then bm3d): BM3D's measured speed counted
    it, and every sigma of an evaluation paid it again.

    Workers are spawned, not forked: forking a process that already runs torch threads can deadlock.
    """
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    list(pool.map(_import_baselines, range(workers)))
    atexit.register(pool.shutdown)
    return pool


def map_images(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, workers: int = 1) -> np.ndarray:
    """Apply a per-image function to (N, H, W, C) images; float32 result clipped to [0, 1]. With ``workers`` > 1
    the images go to ``worker_pool(workers)``, so ``fn`` must be picklable (a module-level function or a
    functools.partial of one)."""
    images = np.asarray(images, dtype=np.float32)
    if workers > 1 and len(images):
        chunk = math.ceil(len(images) / workers)
        results = list(worker_pool(workers).map(fn, images, chunksize=chunk))
    else:
        results = [fn(img) for img in images]
    out = np.empty(images.shape, dtype=np.float32)
    for k, estimate in enumerate(results):
        out[k] = np.clip(estimate, 0, 1)
    return out


def bm3d_denoise(noisy: np.ndarray, sigma: float, profile: str = BM3D_PROFILE, colorspace: str = BM3D_COLORSPACE,
                 workers: int = 1) -> np.ndarray:
    """BM3D (``bm3d.bm3d_rgb``; ``bm3d.bm3d`` for gray images) with the true noise standard deviation; slow: about a
    second per 32x32 colour image."""
    return map_images(functools.partial(_bm3d_one, sigma=float(sigma), profile=profile, colorspace=colorspace),
                      noisy, workers)


def nlm_denoise(noisy: np.ndarray, sigma: float, h_factor: float = NLM_H_FACTOR, patch_size: int = NLM_PATCH_SIZE,
                patch_distance: int = NLM_PATCH_DISTANCE, fast_mode: bool = NLM_FAST_MODE,
                workers: int = 1) -> np.ndarray:
    """scikit-image non-local means, told the true sigma (it subtracts 2*sigma^2 from patch distances)."""
    one = functools.partial(_nlm_one, sigma=float(sigma), h_factor=h_factor, patch_size=patch_size,
                            patch_distance=patch_distance, fast_mode=fast_mode)
    return map_images(one, noisy, workers)


BASELINES: dict[str, Callable[..., np.ndarray]] = {"bm3d": bm3d_denoise, "nlm": nlm_denoise}
