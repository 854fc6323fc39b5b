"""Where and in which precision the model runs: device choice and the autocast policy behind ``train.amp``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible: set train.device to auto or cpu")
    return device


def cpu_has_bf16_matmul() -> bool:
    """True on CPUs with AMX-BF16 matrix units, where bf16 autocast pays off for convolutions.

    AVX512-BF16 alone is not enough: on such an AMD EPYC (2 cores) bf16 autocast trained the default U-Net at 0.84x
    the fp32 speed (benchmarks/train_speed.py), so ``auto`` stays in fp32 there.
    """
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: fp32, no autocast
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, bf16 on CPUs with bf16 matrix units."""
    if amp == "off":
        return Precision(None, False)
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("train.amp=fp16 needs a CUDA device; use bf16, auto or off on the CPU")
        return Precision(torch.float16, True)
    if amp == "bf16":
        return Precision(torch.bfloat16, False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    return Precision(torch.bfloat16, False) if cpu_has_bf16_matmul() else Precision(None, False)
