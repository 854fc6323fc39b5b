"""Denoising speed: images/s of the model (one step and DDIM) and of BM3D and NLM on the same test images.

What is timed and how: ``ddim_denoise.evaluation.denoising_speed``.

    python benchmarks/denoise_speed.py --checkpoint models/best.pt --n-images 1000 --amp off,auto --device cuda
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ddim_denoise.core.metrics import to_float
from ddim_denoise.data.prepared import load_split
from ddim_denoise.evaluation.denoising_speed import denoising_speed
from ddim_denoise.evaluation.lossless import LOSSLESS_SUBSET, load_lossless_images
from ddim_denoise.pipeline.checkpoint import atomic_write_text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=LOSSLESS_SUBSET,
                        help="npz with uint8 x_test (N, H, W, 3), or a prepared folder (data/prepared): its test split")
    parser.add_argument("--n-images", type=int, default=500, help="images for the model and NLM")
    parser.add_argument("--bm3d-images", type=int, default=20, help="BM3D is slow: fewer images (0: skip it)")
    parser.add_argument("--sigma", type=float, default=0.2)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--amp", type=lambda t: t.split(","), default=["off", "auto"],
                        help="model precisions to time, comma-separated eval.amp values (auto, bf16, fp16, off)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's eval.batch_size")
    parser.add_argument("--workers", type=int, default=1, help="processes for BM3D and NLM")
    parser.add_argument("--out", type=Path, help="also write the table to this CSV (a results pipeline's output)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.data.is_dir():
        clean = to_float(load_split(args.data, "test")[0][:args.n_images])
    else:
        clean = load_lossless_images(args.data, "test", args.n_images)
    speed = denoising_speed(args.checkpoint, clean, args.sigma, args.ddim_steps, args.amp, args.device,
                            args.batch_size, args.bm3d_images, args.workers)
    print(f"\n### Denoising speed at σ={args.sigma:g}, {args.checkpoint}, model batch {speed.batch_size}\n")
    print(speed.markdown())
    if args.out:
        atomic_write_text(args.out, speed.table.to_csv(index=False))


if __name__ == "__main__":
    main()
