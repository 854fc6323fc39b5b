"""Training throughput (images/s) of the U-Net under each precision / memory-format / compile setting, one run.

One row per mode (``MODES``): images/s and the speed-up over the first row, the achieved TFLOP/s (training FLOPs per
image, forward + backward, counted by torch.utils.flop_counter) and its share of the matrix-product peak measured on
the same device in the mode's precision (``throughput.py``), and the warm-up's seconds (compilation, graph capture).
Speed targets live here, not in timed tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import pandas as pd
import torch
import torch._inductor.config as inductor_config
from torch.autograd import DeviceType

from ddim_denoise.core.diffusion import SigmaSampler
from ddim_denoise.core.precond import DenoisingLoss
from ddim_denoise.core.scale import to_model
from ddim_denoise.core.unet import count_parameters
from ddim_denoise.denoising.denoiser import build_model
from ddim_denoise.evaluation.throughput import PeakTable, count_flops, synchronize
from ddim_denoise.pipeline.params import Params, parse_yaml
from ddim_denoise.pipeline.runtime import Precision, check_inductor_settings, device_name

MODES = {  # name: (autocast dtype, channels_last, torch.compile mode or None for eager)
    "fp32": (None, False, None),
    "fp32_cl": (None, True, None),
    "fp32_compile": (None, False, "default"),
    "bf16": (torch.bfloat16, False, None),
    "bf16_cl": (torch.bfloat16, True, None),
    "bf16_compile": (torch.bfloat16, False, "default"),
    "bf16_cl_compile": (torch.bfloat16, True, "default"),
    # CUDA graphs: replays the compiled step's kernels without a launch each (pays off when launches bound a step).
    "bf16_cl_compile_cg": (torch.bfloat16, True, "reduce-overhead"),
    "bf16_compile_cg": (torch.bfloat16, False, "reduce-overhead"),  # NCHW: no layout copies, slower convolutions
    # Inductor times its own convolution / matmul templates against cuDNN / cuBLAS (minutes of compiling), CUDA graphs
    "bf16_cl_compile_ma": (torch.bfloat16, True, "max-autotune"),
    "fp16_cl": (torch.float16, True, None),
}


def build_step(params, mode: str, batch: int, device):
    """One training step of ``mode`` on a fixed random batch, as the Trainer takes it (fused AdamW, loss)."""
    dtype, channels_last, compile_mode = MODES[mode]
    torch.manual_seed(0)
    model, schedule = build_model(params)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model, mode=compile_mode) if compile_mode else model
    d = params.diffusion
    loss_fn = DenoisingLoss(SigmaSampler(d.t_sampling, schedule, d.sigma_min, d.sigma_max), d.prediction, d.sigma_data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the Trainer builds it
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    precision = Precision(dtype, dtype == torch.float16)
    x = to_model(torch.rand(batch, 3, 32, 32, device=device))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # a no-op unless the mode replays CUDA graphs
        with precision.autocast(device):
            loss = loss_fn(step_model, x)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def measure(step, batch: int, steps: int, warmup: int, device) -> tuple[float, float]:
    """(images/s over ``steps`` timed steps, seconds the ``warmup`` steps took: compilation and graph capture)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start), warmup_seconds


def inductor_settings(pairs: list[str]) -> dict:
    """``--inductor KEY=VALUE`` pairs as torch._inductor.config settings, values read as YAML (True, 8, ...) as the
    CLI reads ``-S`` values; a bad pair or key is one ValueError line."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--inductor {pair!r}: expected KEY=VALUE, e.g. coordinate_descent_tuning=True")
        settings[key.strip()] = parse_yaml(value, f"--inductor {pair!r}", ValueError)
    return check_inductor_settings(settings, "--inductor")


# The profile's summary of where the time went: (family, lower-case name fragments), first match wins. GPU kernels
# and CPU operators are both named here.
FAMILIES = [
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("compiled (Triton / Inductor C++)", ("triton_", "compiledfxgraph")),
    ("convolution / matmul", ("xmma", "implicit_gemm", "gemm", "nvjet", "cutlass", "conv", "aten::mm", "aten::bmm",
                              "aten::addmm")),
    ("ATen elementwise and copies", ("elementwise", "copy")),
    ("ATen reductions", ("reduce",)),
    ("optimizer", ("multi_tensor_apply", "adam")),
]


def family(name: str) -> str:
    name = name.lower()
    return next((label for label, fragments in FAMILIES if any(f in name for f in fragments)), "other")


def profile(step, steps: int, device, rows: int) -> str:
    """Where a step's time goes: ``torch.profiler`` over ``steps`` steps, the operators and kernels that took the most
    device time (CPU time on a CPU), and how busy the device was against the wall clock."""
    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    # As the table's own total counts it: on a GPU the kernels' time only (operators list it again as theirs).
    timed = [e for e in events if not on_gpu or (e.device_type == DeviceType.CUDA and not e.is_user_annotation)]
    by_family: dict[str, float] = {}
    for e in timed:
        by_family[family(e.key)] = by_family.get(family(e.key), 0.0) + getattr(e, key) / 1e3 / steps
    busy_ms = sum(by_family.values())
    lines = [events.table(sort_by=key, row_limit=rows, max_name_column_width=70)]
    if on_gpu:  # which operators launched those kernels (compiled code calls cuDNN, copies etc. as ATen operators)
        operators = [e for e in events if e.key.startswith("aten::") and e.device_time_total > 0]
        operators.sort(key=lambda e: -e.device_time_total)
        lines += ["operators by the device time of their kernels, per step:"] + [
            f"  {e.key:<45} {e.device_time_total / 1e3 / steps:7.2f} ms  {e.count // steps:4d} calls" for e in
            operators[:rows // 2]]
    lines.append(f"per step: {busy_ms:.2f} ms of {'device' if on_gpu else 'CPU'} time in {wall_ms:.2f} ms wall "
                 f"(profiled, so slower than the timed rows); by kind:")
    lines += [f"  {label:<34} {ms:7.2f} ms  {100 * ms / busy_ms:5.1f}%" for label, ms in
              sorted(by_family.items(), key=lambda item: -item[1])]
    return "\n".join(lines)


def flops_per_image(params, device) -> float:
    """Training FLOPs (forward + backward) per 32x32 image, as torch.utils.flop_counter counts them."""
    model, schedule = build_model(params)
    model.to(device)
    d = params.diffusion
    loss_fn = DenoisingLoss(SigmaSampler(d.t_sampling, schedule, d.sigma_min, d.sigma_max), d.prediction, d.sigma_data)
    x = to_model(torch.rand(2, 3, 32, 32, device=device))
    return count_flops(lambda: loss_fn(model, x).backward()) / 2


@dataclass(frozen=True)
class TrainingSpeedRow:
    """One measured row: a mode at a batch size and cuDNN setting on ``device_name`` with ``threads`` CPU threads."""

    label: str
    mode: str
    batch: int
    cudnn_benchmark: str
    images_per_s: float  # NaN where the mode failed (``error`` says why)
    speedup: float  # over the report's first measured row
    tflops: float
    peak_share: float  # percent of the measured matmul peak in the mode's precision
    warmup_seconds: float
    device_name: str
    threads: int
    parameters: int
    gflop_per_image: float
    error: str = ""

    def __str__(self) -> str:
        if self.error:
            return f"{self.label:>24}: failed ({self.error})"
        dtype = MODES[self.mode][0]
        return (f"{self.label:>24}: {self.images_per_s:9.1f} img/s  ({self.speedup:.2f}x the first row), "
                f"{self.tflops:.3f} TFLOP/s, {self.peak_share:.1f}% of the "
                f"{'fp32' if dtype is None else str(dtype).removeprefix('torch.')} matmul peak; "
                f"warm-up {self.warmup_seconds:.1f} s")


def training_speed_report(params: Params, batches: Sequence[int], modes: Sequence[str], device: torch.device,
                          steps: int = 10, warmup: int = 3, cudnn_settings: Sequence[str] = ("on",),
                          inductor: dict | None = None, profile_steps: int = 0,
                          profile_rows: int = 30) -> Iterator[str | TrainingSpeedRow]:
    """The report as each part is measured (a row of a slow mode is worth seeing before the next one compiles): header
    lines (str), one ``TrainingSpeedRow`` per batch, mode and ``torch.backends.cudnn.benchmark`` setting
    (``"on"``/``"off"``), then, with ``profile_steps``, where the last row's time went; ``str`` of each item is its
    printed line. ``inductor`` (default: params' ``train.inductor``) holds the torch._inductor.config settings the
    compiled modes run under, as the Trainer applies them."""
    inductor = params.train.inductor if inductor is None else inductor
    model, _ = build_model(params)
    parameters = count_parameters(model)
    yield (f"device {device}, threads {torch.get_num_threads()}, {parameters:,} parameters, "
           f"batch {','.join(map(str, batches))}" + (f", inductor {inductor}" if inductor else ""))
    flops = flops_per_image(params, device)
    peaks = PeakTable(device)
    yield f"training FLOPs per image (fwd+bwd): {flops / 1e9:.3f} GFLOP"
    row_facts = dict(device_name=device_name(device), threads=torch.get_num_threads(), parameters=parameters,
                     gflop_per_image=flops / 1e9)
    baseline, step = None, None
    for batch, mode, cudnn in ((b, m, c) for b in batches for m in modes for c in cudnn_settings):
        label = (mode + (f" @{batch}" if len(batches) > 1 else "")
                 + (f" cudnn.benchmark={cudnn}" if len(cudnn_settings) > 1 else ""))
        torch.backends.cudnn.benchmark = cudnn == "on"
        try:
            step = build_step(params, mode, batch, device)
            with inductor_config.patch(inductor):  # read when the first step compiles
                rate, warmup_seconds = measure(step, batch, steps, warmup, device)
        except Exception as e:  # e.g. torch.compile without a working compiler: report and go on
            nan = float("nan")
            yield TrainingSpeedRow(label, mode, batch, cudnn, nan, nan, nan, nan, nan, **row_facts,
                                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            step = None
            continue
        baseline = baseline or rate
        tflops = rate * flops / 1e12
        yield TrainingSpeedRow(label, mode, batch, cudnn, rate, rate / baseline, tflops,
                               peaks.share(tflops, MODES[mode][0]), warmup_seconds, **row_facts)
    if profile_steps and step is not None:
        yield f"profile of the last row ({label}):\n{profile(step, profile_steps, device, profile_rows)}"
    yield f"measured matmul peaks: {peaks.describe()}"


def training_speed_markdown(rows: pd.DataFrame) -> str:
    """``TrainingSpeedRow``s (as a table, e.g. read back from CSV) as a Markdown table under a line saying where."""
    first = rows.iloc[0]
    lines = [f"{first.device_name}, {first.threads} threads; {first.parameters:,} parameters, "
             f"{first.gflop_per_image:.3g} GFLOP per training image (forward + backward).", "",
             "| mode | batch | images/s | speed-up | TFLOP/s | % of matmul peak | warm-up (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows.itertuples(index=False):
        if isinstance(r.error, str) and r.error:
            lines.append(f"| {r.label} | {r.batch} | failed: {r.error} | | | | |")
        else:
            lines.append(f"| {r.label} | {r.batch} | {r.images_per_s:.1f} | {r.speedup:.2f}x | {r.tflops:.3f} "
                         f"| {r.peak_share:.1f}% | {r.warmup_seconds:.1f} |")
    return "\n".join(lines)
