"""Latency of the one-step denoiser on this CPU: PyTorch eager, TorchScript and onnxruntime on the same inputs.

All three run the same graph (``export.OneStepDenoiser``) on the same noisy photo crops; the exported files are
written to a temporary folder and checked for parity, so a fast but wrong export is reported as such. Each backend
gets ``warmup`` untimed calls, then the median of ``repeats`` timed calls (backends taking turns) is reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddim_denoise.serving.export import check_parity, export_model, load_exported, one_step_module, run_eager


@dataclass(frozen=True)
class BackendLatency:
    backend: str
    seconds: float  # median per call of ``batch`` images
    max_abs_error: float  # against PyTorch eager on the same inputs


def noisy_batch(batch: int, size: int, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` random ``size`` x ``size`` crops of a photo plus N(0, sigma^2) noise, as the exported graph takes
    them: (images (N, 3, H, W) float32, sigma per image)."""
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


def export_latency(checkpoint: str | Path, batch: int = 8, size: int = 64, sigma: float = 0.1,
                   threads: int | None = None, warmup: int = 3, repeats: int = 20) -> list[BackendLatency]:
    """Eager, TorchScript and ONNX latency of the checkpoint's one-step graph, ``threads`` intra-op threads each
    (the process's own thread count is restored after)."""
    threads_before = torch.get_num_threads()
    threads = threads or threads_before
    torch.set_num_threads(threads)
    try:
        images, sigmas = noisy_batch(batch, size, sigma)
        eager = run_eager(one_step_module(checkpoint))
        runners = {"pytorch eager": eager}
        with tempfile.TemporaryDirectory() as tmp:
            for fmt, name in (("torchscript", "denoiser.pt"), ("onnx", "denoiser.onnx")):
                path = export_model(checkpoint, fmt, Path(tmp) / name)
                runners[f"{fmt} ({'torch.jit' if fmt == 'torchscript' else 'onnxruntime'})"] = load_exported(
                    path, fmt, threads=threads)
            return [BackendLatency(label, seconds,
                                   check_parity(runners[label], eager, [(images, sigmas)]).max_abs_error)
                    for label, seconds in median_seconds(runners, images, sigmas, warmup, repeats).items()]
    finally:
        torch.set_num_threads(threads_before)
