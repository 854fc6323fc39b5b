"""Evaluate a checkpoint on the lossless CIFAR-10 test subset and print a Markdown table beside BM3D.

Final quality figures come from the 1000 bit-exact original test images, since the full CIFAR-10 copy was rebuilt
from JPEGs (``ddim_denoise.evaluation.lossless``). BM3D's estimates are cached in ``--cache-dir``.

    python benchmarks/eval_lossless.py --checkpoint models/best.pt --device cuda --workers 16
    python benchmarks/eval_lossless.py --split train --bm3d-images 0 --ddim-steps ""   # over-fitting? (train 0-999)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.evaluation.lossless import BM3D_CACHE, LOSSLESS_SUBSET, evaluate_lossless, load_lossless_images


def parse_list(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=LOSSLESS_SUBSET, help="npz with uint8 x_test (N, 32, 32, 3)")
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
    parser.add_argument("--cache-dir", type=Path, default=BM3D_CACHE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    clean = load_lossless_images(args.data, args.split, args.n_images)
    denoiser = Denoiser.from_checkpoint(args.checkpoint, device=args.device, amp=args.amp, weights=args.weights)
    evaluation = evaluate_lossless(denoiser, clean, args.sigmas, args.ddim_steps, args.ddim_images,
                                   args.ddim_stop_sigma, args.bm3d_images, args.seed, args.batch_size, args.workers,
                                   args.cache_dir)
    print("\n" + evaluation.markdown(
        f"{args.checkpoint} on {len(clean)} lossless CIFAR-10 {args.split} images ({args.data.name}), "
        f"PSNR (dB) / SSIM, noise seed {evaluation.noise_seed}, model in {denoiser.precision.name}, "
        f"{args.weights} weights" + (f", DDIM stopping at sigma {args.ddim_stop_sigma:g}" if args.ddim_stop_sigma
                                     else "")))


if __name__ == "__main__":
    main()
