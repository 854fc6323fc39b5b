"""Monochromatic noise: one-step PSNR of the model on colour images whose noise is one draw copied to R, G and B.

An image editor's "monochromatic" noise (and the luminance part of camera noise) looks like this. The clean images
are the first lossless test images; each pixel gets one N(0, sigma^2) draw, the same in all three channels (noise
seed as ``eval.noise_seed``). For each sigma this prints PSNR (dB) / SSIM of: the noisy input; BM3D on the luminance
(the channel mean, which alone carries this noise: ``bm3d.bm3d``, on the first ``--bm3d-images``, cached as
eval_lossless.py caches it) with the exact colour differences added back; the model told sigma, as if the noise were
independent per channel (what ``Denoiser.denoise`` does without ``mono_noise``); the model with ``mono_noise=True``
(``grayscale.whiten``, colour differences kept), at the true and at the estimated sigma and on the noisy images as an
8-bit file stores them; and that model on BM3D's images, for a paired comparison. ``mono_noise="auto"`` decides per
image (``grayscale.looks_mono_noise``): the last columns give its score and how many images it takes for monochromatic,
of these (float / 8-bit) and of the same images with noise drawn per channel (where the right count is 0).

    python benchmarks/mono_noise.py --checkpoint models/best.pt --n-images 300 --bm3d-images 100
"""

from __future__ import annotations

import numpy as np
from eval_lossless import bm3d_probe, parse_bm3d_probe  # benchmarks/ is on sys.path

from ddim_denoise.denoising.clipping import as_8bit
from ddim_denoise.denoising.grayscale import looks_mono_noise
from ddim_denoise.core.metrics import make_noisy, psnr_ssim


def main(argv: list[str] | None = None) -> None:
    args, denoiser, clean = parse_bm3d_probe(argv, __doc__.split("\n\n")[0])
    cfg = denoiser.params.eval
    bm3d, paired = bm3d_probe(args, denoiser, len(clean))

    def score(estimate: np.ndarray, images: slice = slice(None)) -> str:
        psnr, ssim = psnr_ssim(clean[images], np.clip(estimate, 0, 1))
        return f"{psnr.mean():.2f} / {ssim.mean():.3f}"

    print(f"\n### Monochromatic noise, {args.checkpoint}: one step, PSNR (dB) / SSIM on {len(clean)} lossless test "
          f"images (BM3D and the paired column: the first {paired.stop})\n")
    print("| sigma | noisy | BM3D on the luminance | model told sigma (before) | model, mono_noise (now) | "
          "now, estimated sigma | now, 8-bit file | now, on BM3D's images | auto | taken for mono: these (float / "
          "8-bit), per-channel noise |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sigma in args.sigmas:
        noisy = clean + make_noisy(np.zeros_like(clean[..., :1]), sigma, cfg.noise_seed)
        luminance = noisy.mean(axis=-1, keepdims=True)
        now = denoiser.denoise(noisy, sigma, batch_size=cfg.batch_size, mono_noise=True)
        bm3d_cell = "-"
        if paired.stop:
            bm3d_cell = score(bm3d(luminance[paired], sigma) + (noisy - luminance)[paired], paired)
        cells = [score(noisy), bm3d_cell, score(denoiser.denoise(noisy, sigma, batch_size=cfg.batch_size)),
                 score(now), score(denoiser.denoise(noisy, None, batch_size=cfg.batch_size, mono_noise=True)),
                 score(denoiser.denoise(as_8bit(noisy), sigma, batch_size=cfg.batch_size, mono_noise=True)),
                 score(now[paired], paired) if paired.stop else "-",
                 score(denoiser.denoise(noisy, sigma, batch_size=cfg.batch_size, mono_noise="auto")),
                 f"{looks_mono_noise(noisy).sum()} / {looks_mono_noise(as_8bit(noisy)).sum()}, "
                 f"{looks_mono_noise(make_noisy(clean, sigma, cfg.noise_seed)).sum()} of {len(clean)}"]
        print(f"| {sigma:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
