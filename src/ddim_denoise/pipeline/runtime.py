"""Where, in which precision and how the model runs: device choice, the autocast policies behind ``train.amp`` and
``eval.amp``, memory format, and the compile policy (``train.compile``, ``train.compile_mode``, ``train.inductor``)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible: set train.device to auto or cpu")
    return device


@functools.cache  # a Denoiser is built per validation; the CPU does not change
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def device_name(device: torch.device) -> str:
    """The hardware's own model name (a GPU's or the CPU's), so runs compared in MLflow say what they ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    names = [line.partition(":")[2].strip() for line in _cpu_flags().splitlines() if line.startswith("model name")]
    return names[0] if names else device.type


def cpu_has_bf16_dot() -> bool:
    """True on CPUs with AVX512-BF16 (or AMX) bf16 dot products, where bf16 autocast speeds up training and denoising.

    AMX is not needed: on a 2-core CPU with AVX512-BF16 and no AMX, bf16 trained the 1.54M U-Net 1.64x as fast as
    fp32 (benchmarks/train_speed.py, batch 16), and the 4.44M U-Net denoised 109 img/s in bf16 against 62 in fp32
    (benchmarks/denoise_speed.py --amp off,auto).
    """
    flags = _cpu_flags()
    return " avx512_bf16" in flags or " amx_bf16" in flags


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


def resolve_precision(amp: str, device: torch.device, key: str = "train.amp") -> Precision:
    """``auto``: bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, bf16 on CPUs with bf16 dot products."""
    if amp == "off":
        return Precision(None, False)
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"{key}=fp16 needs a CUDA device; use bf16, auto or off on the CPU")
        return Precision(torch.float16, True)
    if amp == "bf16":
        return Precision(torch.bfloat16, False)
    if device.type == "cuda":
        return Precision(torch.bfloat16, False) if gpu_has_bf16(device) else Precision(torch.float16, True)
    return Precision(torch.bfloat16, False) if cpu_has_bf16_dot() else Precision(None, False)


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 natively: NVIDIA from Ampere (compute capability 8.0) on, and ROCm GPUs.
    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated, as on the origin report's T4 or a
    V100, whose tensor cores take fp16 alone."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_channels_last(setting: str | bool, device: torch.device) -> bool:
    """``train.channels_last``: ``auto`` is on for GPUs (tensor-core convolutions want NHWC) and off on CPUs, where
    channels_last cost bf16 training 40% of its speed (benchmarks/train_speed.py, bf16 against bf16_cl)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """``train.compile``: ``auto`` compiles on GPUs, where it doubled the training rate, and not on CPUs, where it
    added nothing after a minute or more of compiling (benchmarks/train_speed.py: bf16_cl_compile against bf16,
    the 4.44M model)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def resolve_compile_mode(mode: str, device: torch.device, world: int) -> str:
    """``train.compile_mode`` as torch.compile gets it. ``reduce-overhead`` records CUDA graphs, so it means
    ``default`` off a GPU, and also under DDP: CUDA graphs with DDP's gradient all-reduce are untested here and have
    crashed elsewhere (pytorch/pytorch#128218)."""
    if mode != "reduce-overhead":
        return mode
    if device.type != "cuda":
        return "default"
    if world > 1:
        log.warning("train.compile_mode=reduce-overhead: CUDA graphs are not used with %d DDP processes (untested "
                    "with DDP, pytorch/pytorch#128218); compiling with mode 'default'", world)
        return "default"
    return mode


def check_inductor_settings(settings: dict, where: str = "", error: type[Exception] = ValueError) -> dict:
    """``settings`` for torch._inductor.config, or a one-line ``error`` naming the keys it does not have: a misspelt
    key would otherwise fail at the first step, on the GPU box, after a minute of compiling. Params validation
    (``train.inductor``) and ``benchmarks/train_speed.py --inductor`` call it. The keys are the settings the module
    lists (nested ones dotted, ``triton.cudagraphs``), not any attribute: ``patch`` and ``__class__`` are not."""
    import torch._inductor.config as inductor_config  # imported on demand: a second or more

    keys = inductor_config.get_config_copy()
    unknown = [key if key.isidentifier() else repr(key) for key in settings if key not in keys]
    if unknown:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}torch._inductor.config has no {', '.join(unknown)}; see that module for its keys")
    return settings


@contextlib.contextmanager
def compile_context(setting: str | bool, compiling: bool, inductor: dict) -> Iterator[None]:
    """Around a compiled run (torch.compile compiles at the first call, and the backward at the first backward):
    ``train.inductor``'s settings, and, with ``train.compile: auto``, eager mode where compiling fails (no C
    compiler on the machine, a GPU Triton does not support; torch._dynamo logs why), since auto must not stop a run
    that eager mode can do. An explicit ``true`` lets the error stop the run."""
    if not compiling:
        yield
        return
    import torch._inductor.config as inductor_config

    fallback = torch._dynamo.config.patch(suppress_errors=True) if setting == "auto" else contextlib.nullcontext()
    with inductor_config.patch(inductor), fallback:
        yield


def configure_cudnn(device: torch.device, benchmark: bool) -> None:
    """``train.cudnn_benchmark`` on a GPU: cuDNN times its convolution algorithms on the first batch of each shape and
    keeps the fastest (training shapes never change: full batches only). Process-wide; CPUs have no cuDNN."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark


def resolve_inference_precision(amp: str, device: torch.device) -> Precision:
    """``eval.amp`` for denoising: as ``train.amp``, without a GradScaler. bf16 moves one-step PSNR by
    thousandths of a dB (benchmarks/eval_lossless.py --amp off against --amp auto)."""
    return Precision(resolve_precision(amp, device, key="eval.amp").dtype, False)
