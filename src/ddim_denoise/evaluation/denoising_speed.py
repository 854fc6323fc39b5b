"""Denoising speed: images/s of the model (one step and DDIM) and of BM3D and NLM on the same test images.

Wall time of each method's call alone, after one warm-up call for the model (CUDA context, cuDNN autotuning). The
model runs on its device in each precision asked for (``eval.amp`` values; ``off`` and ``auto`` compare fp32 with
what ``auto`` picks on this machine); BM3D and NLM on the CPU in worker processes. For the model also the FLOPs per
image (torch.utils.flop_counter), the achieved TFLOP/s and their share of the matrix-product peak measured on the
same device in the same precision: how much faster denoising could get at all on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from ddim_denoise.core.metrics import make_noisy
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.evaluation.evaluate import baseline_methods, method_label, model_methods, run_methods
from ddim_denoise.evaluation.throughput import PeakTable, count_flops
from ddim_denoise.pipeline.runtime import device_name


@dataclass(frozen=True)
class DenoisingSpeed:
    """One row per method and model precision (``runs_on``); model rows also carry ``gflop``, ``tflops`` and
    ``peak_share`` (NaN for the baselines)."""

    table: pd.DataFrame
    batch_size: int
    peaks: PeakTable

    def markdown(self) -> str:
        return (f"{denoising_speed_markdown(self.table)}\n\n"
                f"Measured matrix-product peaks on {self.peaks.device}: {self.peaks.describe()}")


def denoising_speed_markdown(table: pd.DataFrame) -> str:
    """``DenoisingSpeed.table`` (or that table read back from CSV) as Markdown."""
    lines = ["| method | runs on | images | images/s | ms/image | GFLOP/image | TFLOP/s | % of matmul peak "
             "| PSNR (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        model_figures = (f"{r.gflop:.3g} | {r.tflops:.3f} | {r.peak_share:.0f}%" if r.gflop == r.gflop
                         else "– | – | –")  # NaN: a baseline
        lines.append(f"| {method_label(r.method)} | {r.runs_on} | {r.n_images} | {r.images_per_s:.1f} "
                     f"| {1000 / r.images_per_s:.2f} | {model_figures} | {r.psnr:.2f} |")
    return "\n".join(lines)


def denoising_speed(checkpoint: str | Path, clean: np.ndarray, sigma: float, ddim_steps: int,
                    amps: Iterable[str] = ("off", "auto"), device: str | None = None, batch_size: int | None = None,
                    bm3d_images: int = 20, workers: int = 1) -> DenoisingSpeed:
    """Time the checkpoint's model in each precision of ``amps`` (one step and ``ddim_steps``) on ``clean`` at
    ``sigma``, then BM3D on the first ``bm3d_images`` and NLM on all of them. ``batch_size`` defaults to the
    checkpoint's ``eval.batch_size``."""
    tables, peaks = [], None
    for amp in dict.fromkeys(amps):
        denoiser = Denoiser.from_checkpoint(checkpoint, device=device, amp=amp)
        batch_size = batch_size or denoiser.params.eval.batch_size
        seed = denoiser.params.eval.noise_seed
        peaks = peaks or PeakTable(denoiser.device)
        steps = [1, ddim_steps]
        methods = model_methods(denoiser, steps, batch_size)
        table = run_methods(clean, [sigma], methods, noise_seed=seed).table
        noisy = make_noisy(clean[:1], sigma, seed)  # a clean image may hold 0s and 1s: "clipped", more passes
        flops = {name: count_flops(lambda: denoiser.denoise(noisy, sigma, steps=k, batch_size=1))
                 for name, k in zip(methods, steps)}
        table["gflop"] = table.method.map(flops) / 1e9
        tflops = table.images_per_s * table.gflop / 1e3
        table["tflops"], table["peak_share"] = tflops, [peaks.share(t, denoiser.precision.dtype) for t in tflops]
        tables.append(table.assign(runs_on=f"{denoiser.device} {denoiser.precision.name}",
                                   device_name=device_name(denoiser.device), batch_size=batch_size))
    baselines = baseline_methods(bm3d_images, len(clean), workers)
    if baselines:
        table = run_methods(clean, [sigma], baselines, noise_seed=seed).table
        tables.append(table.assign(runs_on=f"cpu, {workers} process(es)", device_name=device_name(torch.device("cpu")),
                                   batch_size=1))
    return DenoisingSpeed(pd.concat(tables, ignore_index=True), batch_size, peaks)
