"""Noise clipped to [0, 1], as image files store it: one-step PSNR with and without undoing the clipping.

The project's benchmark inputs are unclipped (the noise convention), but an 8-bit PNG of a noisy picture holds
clip(round(255 (x + n)) / 255). For each sigma this prints the one-step PSNR on the first lossless test images
(noise seed as ``eval.noise_seed``) for: unclipped inputs at the true and the estimated sigma; 8-bit inputs at the
true sigma without unclipping and with ``eval.unclip_passes``; 8-bit inputs at the estimated sigma without
unclipping and with ``eval.unclip_passes_estimated`` (the estimate's median ratio to the true sigma in brackets).

    python benchmarks/clipped_noise.py --checkpoint models/best.pt --n-images 300
"""

from __future__ import annotations

import argparse

import numpy as np
from eval_lossless import add_probe_arguments, load_probe  # benchmarks/ is on sys.path when this file runs as a script

from ddim_denoise.denoising.clipping import as_8bit
from ddim_denoise.core.metrics import make_noisy, psnr_ssim


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_probe_arguments(parser)
    args = parser.parse_args(argv)
    denoiser, clean = load_probe(args)
    cfg = denoiser.params.eval
    passes, passes_estimated = cfg.unclip_passes, cfg.unclip_passes_estimated

    def run(noisy, true, estimate: bool, known_passes, estimated_passes) -> str:
        """One-step PSNR at the true or the estimated sigma (then with its median ratio to the true one)."""
        cfg.unclip_passes, cfg.unclip_passes_estimated = known_passes, estimated_passes
        psnr = psnr_ssim(clean, denoiser.denoise(noisy, None if estimate else true, batch_size=cfg.batch_size))[0]
        ratio = f" (x{np.median(denoiser.last_sigma) / true:.2f})" if estimate else ""
        return f"{psnr.mean():.2f}{ratio}"

    print(f"\n### Clipped noise, {args.checkpoint}: one-step PSNR (dB) on {len(clean)} lossless test images\n")
    print(f"| sigma | noisy 8-bit | unclipped, true sigma | unclipped, estimated | 8-bit, true sigma | "
          f"8-bit, true, {passes} unclip passes | 8-bit, estimated | 8-bit, estimated, {passes_estimated} passes |")
    print("|---|---|---|---|---|---|---|---|")
    for true in args.sigmas:
        noisy = make_noisy(clean, true, cfg.noise_seed)
        stored = as_8bit(noisy)
        cells = [f"{psnr_ssim(clean, stored)[0].mean():.2f}", run(noisy, true, False, 0, 0),
                 run(noisy, true, True, 0, 0), run(stored, true, False, 0, 0), run(stored, true, False, passes, 0),
                 run(stored, true, True, 0, 0), run(stored, true, True, 0, passes_estimated)]
        print(f"| {true:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
