"""Gray images: one-step PSNR of the RGB model on grayscale noise, before and after whitening it (``grayscale.py``).

The clean images are the first lossless test images averaged to gray (as a gray file stores a colour picture), plus
one N(0, sigma^2) draw per pixel (noise seed as ``eval.noise_seed``). For each sigma this prints PSNR (dB) / SSIM of:
the noisy input; BM3D for gray images (``bm3d.bm3d``, on the first ``--bm3d-images``, cached as eval_lossless.py
caches it); the model as it denoised gray images before, the gray image copied to three channels and passed straight
to the network; the model now
(``Denoiser.denoise`` on (N, H, W, 1)), at the true and at the estimated sigma, and on the noisy images as an 8-bit
gray file stores them (clipped and rounded; unclipped in ``eval.unclip_passes`` passes). The last column is the model
now on BM3D's images, for a paired comparison.

    python benchmarks/gray_noise.py --checkpoint models/best.pt --n-images 300 --bm3d-images 100
"""

from __future__ import annotations

import numpy as np
import torch
from eval_lossless import bm3d_probe, parse_bm3d_probe  # benchmarks/ is on sys.path

from ddim_denoise.denoising.clipping import as_8bit
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.core.metrics import make_noisy, psnr_ssim


def straight_to_the_network(denoiser: Denoiser, gray: np.ndarray, sigma: float, batch_size: int) -> np.ndarray:
    """The behaviour before grayscale.py: the gray image copied to RGB, the model told sigma, the channels averaged.
    ``Denoiser.denoise`` now routes such images through ``whiten``, so this calls the batch step below it."""
    rgb = np.repeat(gray, 3, axis=-1)
    sigmas, generator = np.full(len(rgb), sigma, dtype=np.float32), torch.Generator(denoiser.device)
    out = np.concatenate([denoiser._denoise_batch(rgb[k:k + batch_size], sigmas[k:k + batch_size], 1, 0.0, generator)
                          for k in range(0, len(rgb), batch_size)])
    return out.mean(axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    args, denoiser, colour = parse_bm3d_probe(argv, __doc__.split("\n\n")[0])
    cfg = denoiser.params.eval
    clean = colour.mean(axis=-1, keepdims=True)
    bm3d, paired = bm3d_probe(args, denoiser, len(clean))

    def score(estimate: np.ndarray, images: slice = slice(None)) -> str:
        psnr, ssim = psnr_ssim(clean[images], estimate)
        return f"{psnr.mean():.2f} / {ssim.mean():.3f}"

    print(f"\n### Gray images, {args.checkpoint}: one step, PSNR (dB) / SSIM on {len(clean)} lossless test images "
          f"averaged to gray (BM3D and the paired column: the first {paired.stop})\n")
    print("| sigma | noisy | BM3D | model, gray copied to RGB (before) | model, whitened (now) | now, estimated sigma | "
          "now, 8-bit file | now, on BM3D's images |")
    print("|---|---|---|---|---|---|---|---|")
    for sigma in args.sigmas:
        noisy = make_noisy(clean, sigma, cfg.noise_seed)
        now = denoiser.denoise(noisy, sigma, batch_size=cfg.batch_size)
        bm3d_cell = score(bm3d(noisy[paired], sigma), paired) if paired.stop else "-"
        before = straight_to_the_network(denoiser, noisy, sigma, cfg.batch_size)
        estimated = denoiser.denoise(noisy, None, batch_size=cfg.batch_size)
        stored = denoiser.denoise(as_8bit(noisy), sigma, batch_size=cfg.batch_size)
        cells = [score(noisy), bm3d_cell, score(before), score(now), score(estimated), score(stored),
                 score(now[paired], paired)]
        print(f"| {sigma:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
