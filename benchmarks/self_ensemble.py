"""Is test-time self-ensembling worth it? One-step PSNR with the outputs for flipped / rotated inputs averaged.

    python benchmarks/self_ensemble.py --checkpoint models/best.pt --n-images 300

For each sigma: the plain one-step PSNR on the lossless test subset, and the PSNR when the denoised outputs of
transformed copies of each noisy image (transformed back) are averaged: the horizontal flip (2 calls), flips x 180
degree rotation (4 calls), all eight flips and rotations (8 calls). The training augments with horizontal flips only,
so the 90-degree rotations are inputs the model never saw; the row ``rot90 alone`` shows what that costs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from eval_lossless import DEFAULT_DATA, parse_list  # benchmarks/ is on sys.path when this file runs as a script

from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.core.metrics import make_noisy, psnr_ssim, to_float

ENSEMBLES = {  # name: the (quarter turns, horizontal flip) transforms whose outputs are averaged
    "plain": [(0, False)],
    "rot90 alone": [(1, False)],
    "hflip (2 calls)": [(0, False), (0, True)],
    "flips x rot180 (4 calls)": [(k, f) for k in (0, 2) for f in (False, True)],
    "dihedral (8 calls)": [(k, f) for k in range(4) for f in (False, True)],
}


def transform(images: np.ndarray, quarter_turns: int, flip: bool) -> np.ndarray:
    out = np.rot90(images, quarter_turns, axes=(1, 2))
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def untransform(images: np.ndarray, quarter_turns: int, flip: bool) -> np.ndarray:
    return np.rot90(images[:, :, ::-1] if flip else images, -quarter_turns, axes=(1, 2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n-images", type=int, default=300)
    parser.add_argument("--sigmas", type=parse_list, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    clean = to_float(load_images_npz(args.data, "x_test", args.n_images))
    denoiser = Denoiser.from_checkpoint(args.checkpoint, device=args.device)
    transforms = sorted({t for ts in ENSEMBLES.values() for t in ts})
    table = {name: [] for name in ENSEMBLES}
    for sigma in args.sigmas:
        noisy = make_noisy(clean, sigma, args.seed)
        outputs = {t: untransform(denoiser.denoise(transform(noisy, *t), sigma, batch_size=args.batch_size), *t)
                   for t in transforms}
        for name, ts in ENSEMBLES.items():
            table[name].append(psnr_ssim(clean, sum(outputs[t] for t in ts) / len(ts))[0].mean())

    print(f"\n### {args.checkpoint}: one-step PSNR (dB) on {len(clean)} lossless test images, seed {args.seed}\n")
    print("| ensemble | " + " | ".join(f"sigma {s:g}" for s in args.sigmas) + " | delta (mean) |")
    print("|---" * (len(args.sigmas) + 2) + "|")
    for name, psnrs in table.items():
        delta = np.mean(psnrs) - np.mean(table["plain"])
        print(f"| {name} | " + " | ".join(f"{p:.2f}" for p in psnrs) + f" | {delta:+.3f} |")


if __name__ == "__main__":
    main()
