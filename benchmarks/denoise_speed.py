"""Denoising speed: images/s of the model (one step and DDIM) and of BM3D and NLM on the same test images.

Wall time of each method's call alone, after one warm-up call for the model (CUDA context, cuDNN autotuning). The
model runs on ``--device`` in each precision of ``--amp`` (``eval.amp`` values; ``off,auto`` compares fp32 with what
``auto`` picks on this machine); BM3D and NLM on the CPU in ``--workers`` processes. For the model also the FLOPs
per image (torch.utils.flop_counter), the achieved TFLOP/s and their share of the matrix-product peak measured on the
same device in the same precision: how much faster denoising could get at all on this machine.

    python benchmarks/denoise_speed.py --checkpoint models/best.pt --n-images 1000 --amp off,auto --device cuda
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd
from eval_lossless import DEFAULT_DATA  # benchmarks/ is on sys.path when this file runs as a script
from throughput import PeakTable, count_flops

from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.evaluation.evaluate import baseline_methods, method_label, model_methods, run_methods
from ddim_denoise.core.metrics import make_noisy, to_float


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="npz with uint8 x_test (N, H, W, 3)")
    parser.add_argument("--n-images", type=int, default=500, help="images for the model and NLM")
    parser.add_argument("--bm3d-images", type=int, default=20, help="BM3D is slow: fewer images (0: skip it)")
    parser.add_argument("--sigma", type=float, default=0.2)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--amp", type=lambda t: t.split(","), default=["off", "auto"],
                        help="model precisions to time, comma-separated eval.amp values (auto, bf16, fp16, off)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's eval.batch_size")
    parser.add_argument("--workers", type=int, default=1, help="processes for BM3D and NLM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    clean = to_float(load_images_npz(args.data, "x_test", args.n_images))
    tables, batch_size, peaks = [], args.batch_size, None
    for amp in dict.fromkeys(args.amp):
        denoiser = Denoiser.from_checkpoint(args.checkpoint, device=args.device, amp=amp)
        batch_size = batch_size or denoiser.params.eval.batch_size
        seed = denoiser.params.eval.noise_seed
        peaks = peaks or PeakTable(denoiser.device)
        steps = [1, args.ddim_steps]
        methods = model_methods(denoiser, steps, batch_size)
        table = run_methods(clean, [args.sigma], methods, noise_seed=seed).table
        noisy = make_noisy(clean[:1], args.sigma, seed)  # a clean image may hold 0s and 1s: "clipped", more passes
        flops = {name: count_flops(lambda: denoiser.denoise(noisy, args.sigma, steps=k, batch_size=1))
                 for name, k in zip(methods, steps)}
        table["gflop"] = table.method.map(flops) / 1e9
        tflops = table.images_per_s * table.gflop / 1e3
        table["tflops"], table["peak_share"] = tflops, [peaks.share(t, denoiser.precision.dtype) for t in tflops]
        tables.append(table.assign(runs_on=f"{denoiser.device} {denoiser.precision.name}"))
    baselines = baseline_methods(args.bm3d_images, len(clean), args.workers)
    if baselines:
        table = run_methods(clean, [args.sigma], baselines, noise_seed=seed).table
        tables.append(table.assign(runs_on=f"cpu, {args.workers} process(es)"))
    table = pd.concat(tables, ignore_index=True)

    print(f"\n### Denoising speed at σ={args.sigma:g}, {args.checkpoint}, model batch {batch_size}\n")
    print("| method | runs on | images | images/s | ms/image | GFLOP/image | TFLOP/s | % of matmul peak | PSNR (dB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table.itertuples(index=False):
        model_figures = (f"{r.gflop:.3g} | {r.tflops:.3f} | {r.peak_share:.0f}%" if r.gflop == r.gflop  # NaN: baseline
                         else "– | – | –")
        print(f"| {method_label(r.method)} | {r.runs_on} | {r.n_images} | {r.images_per_s:.1f} "
              f"| {1000 / r.images_per_s:.2f} | {model_figures} | {r.psnr:.2f} |")
    print(f"\nMeasured matrix-product peaks on {peaks.device}: {peaks.describe()}")


if __name__ == "__main__":
    main()
