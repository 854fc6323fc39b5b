"""How much a model's training on JPEG pixels costs on original pixels: the same test images, JPEG and original.

    python benchmarks/jpeg_gap.py --checkpoint models/best.pt --n-images 200

The project's offline CIFAR-10 copy (``data/raw/cifar10.npz``) was rebuilt from JPEGs; the lossless subset holds the
original pixels of test images 0-999. For each sigma this prints the one-step PSNR of the model on noisy JPEG test
images (scored against the JPEG images: the domain it was trained on) and on the same images' originals (scored
against the originals). A gap well above zero means the model learned JPEG's smoothing (see ``data.originals``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval_lossless import DEFAULT_DATA, parse_list  # benchmarks/ is on sys.path when this file runs as a script

from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.core.metrics import make_noisy, psnr_ssim, to_float


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--originals", type=Path, default=DEFAULT_DATA, help="npz with the original x_test")
    parser.add_argument("--jpeg", type=Path, default=Path("data/raw/cifar10.npz"), help="npz with the JPEG x_test")
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--sigmas", type=parse_list, default=[0.1, 0.2, 0.5])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    images = {"JPEG": to_float(load_images_npz(args.jpeg, "x_test", args.n_images)),
              "original": to_float(load_images_npz(args.originals, "x_test", args.n_images))}
    denoiser = Denoiser.from_checkpoint(args.checkpoint, device=args.device)
    print(f"\n### {args.checkpoint}: one-step PSNR (dB) on {args.n_images} test images, JPEG vs original pixels "
          f"(JPEG vs original: {psnr_ssim(images['original'], images['JPEG'])[0].mean():.2f} dB)\n")
    print("| sigma | on JPEG pixels | on original pixels | gap |\n|---|---|---|---|")
    for sigma in args.sigmas:
        psnr = {}
        for name, clean in images.items():
            estimate = denoiser.denoise(make_noisy(clean, sigma, args.seed), sigma, steps=1)
            psnr[name] = psnr_ssim(clean, estimate)[0].mean()
        print(f"| {sigma:g} | {psnr['JPEG']:.2f} | {psnr['original']:.2f} | {psnr['JPEG'] - psnr['original']:+.2f} |")


if __name__ == "__main__":
    main()
