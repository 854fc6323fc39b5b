"""Latency and throughput of the one-step denoiser on this CPU: PyTorch eager, TorchScript and onnxruntime.

Each backend's median call time on the same noisy photo crops, with its largest difference from eager
(``ddim_denoise.serving.latency``). ``--threads`` sets the intra-op threads of every backend alike.

    python benchmarks/export_latency.py --checkpoint models/best.pt --batch 8 --size 64 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from ddim_denoise.serving.latency import export_latency


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--sigma", type=float, default=0.1, help="pixel-scale noise level")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads per backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    rows = export_latency(args.checkpoint, args.batch, args.size, args.sigma, args.threads, args.warmup, args.repeats)
    print(f"{args.batch} images of {args.size}x{args.size}, sigma {args.sigma}, {args.threads} thread(s), "
          f"median of {args.repeats} calls")
    print(f"{'backend':<26} {'ms/batch':>10} {'images/s':>10} {'max |diff| vs eager':>20}")
    for row in rows:
        print(f"{row.backend:<26} {row.seconds * 1e3:>10.2f} {args.batch / row.seconds:>10.1f} "
              f"{row.max_abs_error:>20.2e}")


if __name__ == "__main__":
    main()
