"""Latency and throughput of the one-step denoiser on this CPU: PyTorch eager, TorchScript and onnxruntime.

All three run the same graph (``export.OneStepDenoiser``) on the same noisy photo crops; the exported files are
written to a temporary folder and checked for parity first, so a fast but wrong export is reported as such. Each
backend gets ``--warmup`` untimed calls, then the median of ``--repeats`` timed calls (backends taking turns) is
reported, as milliseconds per batch and images per second. ``--threads`` sets the intra-op threads of every
backend alike.

    python benchmarks/export_latency.py --checkpoint models/best.pt --batch 8 --size 64 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddim_denoise.serving.export import check_parity, export_model, load_exported, one_step_module, run_eager


def noisy_batch(batch: int, size: int, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    rng = np.random.default_rng(seed)
    photo = data.astronaut().astype(np.float32) / 255
    tops = rng.integers(0, photo.shape[0] - size, batch)
    lefts = rng.integers(0, photo.shape[1] - size, batch)
    clean = np.stack([photo[top:top + size, left:left + size] for top, left in zip(tops, lefts, strict=True)])
    noisy = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    return np.ascontiguousarray(noisy.transpose(0, 3, 1, 2)), np.full(batch, sigma, dtype=np.float32)


def median_seconds(runners: dict, images, sigma, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time per backend. Backends take turns call by call, so load from other processes on a shared
    machine falls on all of them alike instead of on whichever ran during the busy spell."""
    for run in runners.values():
        for _ in range(warmup):
            run(images, sigma)
    times = {label: [] for label in runners}
    for _ in range(repeats):
        for label, run in runners.items():
            start = time.perf_counter()
            run(images, sigma)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


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

    torch.set_num_threads(args.threads)
    images, sigma = noisy_batch(args.batch, args.size, args.sigma)
    eager = run_eager(one_step_module(args.checkpoint))
    runners = {"pytorch eager": eager}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in (("torchscript", "denoiser.pt"), ("onnx", "denoiser.onnx")):
            path = export_model(args.checkpoint, fmt, Path(tmp) / name)
            runners[f"{fmt} ({'torch.jit' if fmt == 'torchscript' else 'onnxruntime'})"] = load_exported(
                path, fmt, threads=args.threads)
        print(f"{args.batch} images of {args.size}x{args.size}, sigma {args.sigma}, {args.threads} thread(s), "
              f"median of {args.repeats} calls")
        print(f"{'backend':<26} {'ms/batch':>10} {'images/s':>10} {'max |diff| vs eager':>20}")
        for label, seconds in median_seconds(runners, images, sigma, args.warmup, args.repeats).items():
            error = check_parity(runners[label], eager, [(images, sigma)]).max_abs_error
            print(f"{label:<26} {seconds * 1e3:>10.2f} {args.batch / seconds:>10.1f} {error:>20.2e}")


if __name__ == "__main__":
    main()
