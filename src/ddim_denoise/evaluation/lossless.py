"""A checkpoint on the lossless CIFAR-10 subset beside BM3D, from the command line (benchmarks/eval_lossless.py).

The project's full CIFAR-10 copy was rebuilt from JPEGs (about 30 dB from the originals), so final quality figures
use the 1000 bit-exact original test images instead. Same noise convention and the same functions as
``ddim-denoise evaluate``: every method sees the same noisy images (``make_noisy`` with the noise seed). BM3D is slow
(about a second per image per core), so its estimates are cached per (sigma, seed, n, input digest) in a cache
folder and computed once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ddim_denoise.core.metrics import to_float
from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.evaluation.baselines import BM3D_PROFILE, bm3d_denoise
from ddim_denoise.evaluation.evaluate import NOISY, NOISY_INPUT, Method, model_methods, run_methods
from ddim_denoise.evaluation.report import results_table
from ddim_denoise.pipeline.checkpoint import atomic_path

# The shared data folder beside the checkout, as the benchmarks' commands (run from the repository root) find it.
LOSSLESS_SUBSET = Path("..") / "shared" / "data" / "cifar10-lossless-subset.npz"
BM3D_CACHE = Path.home() / ".cache" / "ddim-denoise"


def cached_bm3d(cache_dir: Path, seed: int, workers: int) -> Callable[[np.ndarray, float], np.ndarray]:
    """BM3D whose estimates are stored in ``cache_dir`` keyed by sigma, seed, image count and a digest of the input."""

    def run(noisy: np.ndarray, sigma: float) -> np.ndarray:
        digest = hashlib.sha256(np.ascontiguousarray(noisy).tobytes()).hexdigest()[:12]
        path = cache_dir / f"bm3d-{BM3D_PROFILE}_sigma{sigma:g}_seed{seed}_n{len(noisy)}_{digest}.npz"
        if path.is_file():
            with np.load(path) as cached:
                logging.info("BM3D sigma %g: cached in %s", sigma, path)
                return cached["estimate"]
        estimate = bm3d_denoise(noisy, sigma, workers=workers)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, estimate=estimate)
        return estimate

    return run


def load_lossless_images(data: str | Path, split: str = "test", n_images: int | None = None) -> np.ndarray:
    """The subset's first ``n_images`` ``x_<split>`` images, float (N, H, W, 3) in [0, 1]."""
    return to_float(load_images_npz(data, f"x_{split}", n_images))


@dataclass(frozen=True)
class LosslessEvaluation:
    """Every method's scores on all images (``table``), and on BM3D's images alone where BM3D ran on fewer
    (``paired``, else None); ``n_bm3d`` is how many images BM3D saw."""

    table: pd.DataFrame
    paired: pd.DataFrame | None
    n_bm3d: int
    noise_seed: int

    def markdown(self, title: str) -> str:
        """``title`` over the first table, then the paired one where there is one."""
        text = f"### {title}\n\n{results_table(self.table, origin=None)}"
        if self.paired is not None:
            text += (f"\n\n### The same on BM3D's {self.n_bm3d} images (a method run on fewer keeps its own n)\n\n"
                     + results_table(self.paired, origin=None))
        return text


def evaluate_lossless(denoiser: Denoiser, clean: np.ndarray, sigmas: Sequence[float] | None = None,
                      ddim_steps: Sequence[int] = (), ddim_images: int | None = None, ddim_stop_sigma: float = 0.0,
                      bm3d_images: int = 300, seed: int | None = None, batch_size: int | None = None,
                      workers: int = 1, cache_dir: Path = BM3D_CACHE) -> LosslessEvaluation:
    """The noisy input, cached BM3D on the first ``bm3d_images`` and the model (one step and each of ``ddim_steps``)
    on ``clean``. ``sigmas``, ``seed`` and ``batch_size`` default to the checkpoint's ``eval`` settings (the
    params.yaml it was trained under)."""
    defaults = denoiser.params.eval
    batch_size, sigmas = batch_size or defaults.batch_size, sigmas or defaults.sigmas
    seed = defaults.noise_seed if seed is None else seed
    methods = {NOISY: NOISY_INPUT}
    if bm3d_images > 0:
        methods["bm3d"] = Method(cached_bm3d(cache_dir, seed, workers), max_images=bm3d_images)
    methods |= model_methods(denoiser, [1, *ddim_steps], batch_size, ddim_images, ddim_stop_sigma)

    table = run_methods(clean, sigmas, methods, seed).table
    n_bm3d = min(bm3d_images, len(clean))
    paired = None
    if 0 < n_bm3d < len(clean):  # a paired comparison: every method on BM3D's images
        # Only methods that ran on more images than BM3D run again (on its images); the rest (BM3D itself, DDIM
        # on --ddim-images <= --bm3d-images) already saw exactly those images, and DDIM-50 is slow.
        covered = table.groupby("method").n_images.max()
        rerun = {name: m for name, m in methods.items() if covered.get(name, 0) > n_bm3d}  # absent: ran on none
        order = {name: i for i, name in enumerate(methods)}
        paired = pd.concat([run_methods(clean[:n_bm3d], sigmas, rerun, seed).table,
                            table[~table.method.isin(list(rerun))]])
        paired = paired.sort_values("method", key=lambda names: names.map(order), kind="stable")
    return LosslessEvaluation(table, paired, n_bm3d, seed)
