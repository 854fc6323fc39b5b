"""What the speed benchmarks divide by: the FLOPs a call costs and the device's measured matrix-product peak.

Shared by the training and denoising speed benchmarks (``training_speed.py``, ``denoising_speed.py``): achieved
FLOP/s over the measured peak says how much faster a model could run at all on the machine, which a bare images/s
cannot.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

PEAK_SIZE = {"cuda": (8192, 10), "cpu": (2048, 5)}  # (matrix side, repeats): seconds on an H100 or 2 CPU cores


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one ``call()`` as torch.utils.flop_counter counts them (matmuls and convolutions, forward and any
    backward inside the call).

    Attention runs on the math backend while counting: the counter has no entry for the fused CPU flash-attention
    kernel that channels_last inputs select (it would drop the default U-Net's 0.10 GFLOP of attention per image);
    the math backend computes the same products as countable matmuls.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured square matrix-product throughput in ``dtype`` on ``device``: the denominator of 'share of peak'."""
    n, reps = PEAK_SIZE.get(device.type, PEAK_SIZE["cpu"])
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class PeakTable:
    """Measured peaks, once per dtype: ``share(tflops, dtype)`` is the percentage of that dtype's peak."""

    def __init__(self, device: torch.device):
        self.device, self._peaks = device, {}

    def peak(self, dtype: torch.dtype | None) -> float:
        dtype = dtype or torch.float32
        if dtype not in self._peaks:
            self._peaks[dtype] = matmul_peak_tflops(self.device, dtype)
        return self._peaks[dtype]

    def share(self, tflops: float, dtype: torch.dtype | None) -> float:
        return 100 * tflops / self.peak(dtype)

    def describe(self) -> str:
        return ", ".join(f"{str(d).removeprefix('torch.')} {p:.3g} TFLOP/s" for d, p in self._peaks.items())
