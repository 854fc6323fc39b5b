"""Evaluate a checkpoint on the lossless CIFAR-10 test subset and print a Markdown table beside BM3D.

The project's full CIFAR-10 copy was rebuilt from JPEGs (about 30 dB from the originals), so final quality figures
use the 1000 bit-exact original test images instead. Same noise convention and the same functions as
``ddim-denoise evaluate``: every method sees the same noisy images (``make_noisy`` with ``--seed``). BM3D is slow
(about a second per image per core), so its estimates are cached per (sigma, seed, n, input digest) in
``--cache-dir`` and computed once.

    python benchmarks/eval_lossless.py --checkpoint models/best.pt --device cuda --workers 16
    python benchmarks/eval_lossless.py --split train --bm3d-images 0 --ddim-steps ""   # over-fitting? (train 0-999)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ddim_denoise.evaluation.baselines import BM3D_PROFILE, bm3d_denoise
from ddim_denoise.pipeline.checkpoint import atomic_path
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.evaluation.evaluate import NOISY, NOISY_INPUT, Method, model_methods, run_methods
from ddim_denoise.core.metrics import to_float
from ddim_denoise.evaluation.report import results_table

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-lossless-subset.npz"
DEFAULT_CACHE = Path.home() / ".cache" / "ddim-denoise"


def cached_bm3d(cache_dir: Path, seed: int, workers: int):
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


def parse_list(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def add_probe_arguments(parser: argparse.ArgumentParser, n_images: int = 300) -> None:
    """What the one-checkpoint probes on the lossless subset share (clipped_noise.py, gray_noise.py)."""
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="npz with uint8 x_test (N, H, W, 3)")
    parser.add_argument("--n-images", type=int, default=n_images)
    parser.add_argument("--sigmas", type=parse_list, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--device", default=None)


def parse_bm3d_probe(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, Denoiser, np.ndarray]:
    """The command line of the probes with a BM3D column (gray_noise.py, mono_noise.py): (arguments, the
    checkpoint's Denoiser, the clean test images)."""
    parser = argparse.ArgumentParser(description=description)
    add_probe_arguments(parser)
    parser.add_argument("--bm3d-images", type=int, default=100, help="BM3D (about 0.5 s per image) on the first N")
    parser.add_argument("--workers", type=int, default=2, help="processes for BM3D")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    return args, *load_probe(args)


def bm3d_probe(args: argparse.Namespace, denoiser: Denoiser, n_images: int) -> tuple[Callable, slice]:
    """(cached BM3D at the checkpoint's noise seed, the slice of images it runs on) for those probes."""
    bm3d = cached_bm3d(args.cache_dir, denoiser.params.eval.noise_seed, args.workers)
    return bm3d, slice(0, min(args.bm3d_images, n_images))


def load_probe(args: argparse.Namespace) -> tuple[Denoiser, np.ndarray]:
    """The checkpoint's Denoiser and the first ``--n-images`` clean test images, float (N, H, W, 3) in [0, 1]."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    denoiser = Denoiser.from_checkpoint(args.checkpoint, device=args.device)
    return denoiser, to_float(load_images_npz(args.data, "x_test", args.n_images))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="npz with uint8 x_test (N, 32, 32, 3)")
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--split", choices=["test", "train"], default="test",
                        help="the subset's test images, or its original-pixel training images (official train "
                             "0-3999, most of them in the training split): the same figures there show over-fitting")
    parser.add_argument("--bm3d-images", type=int, default=300, help="BM3D on the first this many (0: none)")
    parser.add_argument("--sigmas", type=parse_list, default=None,
                        help="e.g. 0.1,0.2 (default: the checkpoint's eval.sigmas)")
    parser.add_argument("--ddim-steps", type=lambda t: parse_list(t, int), default=[10, 50])
    parser.add_argument("--ddim-images", type=int, default=None,
                        help="multi-step DDIM on the first this many images only (default: all; K calls per image)")
    parser.add_argument("--ddim-stop-sigma", type=float, default=0.0,
                        help="where the DDIM rows stop walking down, pixel scale (0: to 0; Denoiser.denoise)")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: the checkpoint's eval.noise_seed)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's eval.batch_size")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="the checkpoint's EMA weights or its raw ones ('model': what the EMA is worth)")
    parser.add_argument("--amp", default=None, help="auto, bf16, fp16, off (default: the checkpoint's eval.amp)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for BM3D")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    clean = to_float(load_images_npz(args.data, f"x_{args.split}", args.n_images))
    denoiser = Denoiser.from_checkpoint(args.checkpoint, device=args.device, amp=args.amp, weights=args.weights)
    defaults = denoiser.params.eval  # the params.yaml the checkpoint was trained under
    batch_size, sigmas = args.batch_size or defaults.batch_size, args.sigmas or defaults.sigmas
    seed = defaults.noise_seed if args.seed is None else args.seed
    methods = {NOISY: NOISY_INPUT}
    if args.bm3d_images > 0:
        methods["bm3d"] = Method(cached_bm3d(args.cache_dir, seed, args.workers), max_images=args.bm3d_images)
    methods |= model_methods(denoiser, [1, *args.ddim_steps], batch_size, args.ddim_images, args.ddim_stop_sigma)

    table = run_methods(clean, sigmas, methods, seed).table
    print(f"\n### {args.checkpoint} on {len(clean)} lossless CIFAR-10 {args.split} images ({args.data.name}), "
          f"PSNR (dB) / SSIM, noise seed {seed}, model in {denoiser.precision.name}, {args.weights} weights"
          + (f", DDIM stopping at sigma {args.ddim_stop_sigma:g}" if args.ddim_stop_sigma else "") + "\n")
    print(results_table(table, origin=None))
    n_bm3d = min(args.bm3d_images, len(clean))
    if 0 < n_bm3d < len(clean):  # a paired comparison: every method on BM3D's images
        # Only methods that ran on more images than BM3D run again (on its images); the rest (BM3D itself, DDIM
        # on --ddim-images <= --bm3d-images) already saw exactly those images, and DDIM-50 is slow.
        covered = table.groupby("method").n_images.max()
        rerun = {name: m for name, m in methods.items() if covered.get(name, 0) > n_bm3d}  # absent: ran on none
        order = {name: i for i, name in enumerate(methods)}
        paired = pd.concat([run_methods(clean[:n_bm3d], sigmas, rerun, seed).table,
                            table[~table.method.isin(list(rerun))]])
        paired = paired.sort_values("method", key=lambda names: names.map(order), kind="stable")
        print(f"\n### The same on BM3D's {n_bm3d} images (a method run on fewer keeps its own n)\n")
        print(results_table(paired, origin=None))


if __name__ == "__main__":
    main()
