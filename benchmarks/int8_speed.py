"""What int8 inference would buy on this CPU: one-step denoising speed and PSNR, int8 against bf16.

The int8 model is torchao's PT2E post-training quantization for x86 (``X86InductorQuantizer``: per-channel int8
weights, per-tensor int8 activations calibrated on noisy images the scored ones do not include), compiled by
``torch.compile`` with weight freezing, so the convolutions run as oneDNN VNNI kernels. ``--keep-float`` names
modules left in fp32 (the U-Net's first and last convolution by default: quantizing them costs the most PSNR).
Both models run through ``Denoiser.denoise`` on the same noisy images, so pre- and post-processing are included.
The one-off cost (export, calibration, compilation) is timed apart: it is paid again by every new process, so the
script also prints what 10,000 images would take end to end with each.

Needs torchao (``pip install torchao``), which the project itself does not depend on.

    python benchmarks/int8_speed.py --checkpoint models/best.pt --n-images 300
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from eval_lossless import DEFAULT_DATA  # benchmarks/ is on sys.path when this file runs as a script

from ddim_denoise.data.cifar10 import load_images_npz
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.evaluation.evaluate import model_methods, run_methods
from ddim_denoise.core.metrics import make_noisy, to_float
from ddim_denoise.core.scale import sigma_to_model

EVAL_IMAGES = 10_000  # the CIFAR-10 test split, for the end-to-end projection


def model_inputs(noisy: np.ndarray, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``Denoiser`` hands the Preconditioner for 32x32 images: model-scale y (channels_last) and sigma."""
    y = (torch.from_numpy(noisy).permute(0, 3, 1, 2) * 2 - 1).contiguous(memory_format=torch.channels_last)
    return y, sigma_to_model(torch.full((len(y),), sigma))


def quantize_int8(model: torch.nn.Module, calibration: list[tuple[torch.Tensor, torch.Tensor]],
                  keep_float: list[str]) -> torch.nn.Module:
    """PT2E static int8 quantization of a Preconditioner (batch size left dynamic), compiled with freezing."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as exc:
        raise SystemExit(f"int8 quantization needs torchao ({exc}); install it with: pip install torchao") from exc
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        graph = torch.export.export(model, calibration[0], dynamic_shapes={"y": {0: batch}, "sigma": {0: batch}})
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        for name in keep_float:
            quantizer.set_module_name_qconfig(name, None)
        prepared = prepare_pt2e(graph.module(), quantizer)
        for inputs in calibration:
            prepared(*inputs)
        quantized = convert_pt2e(prepared)
    torch._inductor.config.freezing = True  # constant-fold the int8 weights into oneDNN's packed layout
    return torch.compile(quantized)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="models/best.pt")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="npz with uint8 x_test (N, H, W, 3)")
    parser.add_argument("--n-images", type=int, default=300, help="scored (and timed) images")
    parser.add_argument("--calibration-images", type=int, default=500,
                        help="images after the scored ones, noised at every sigma, to calibrate activation ranges")
    parser.add_argument("--sigmas", type=lambda t: [float(s) for s in t.split(",")], default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--keep-float", type=lambda t: [s for s in t.split(",") if s], default=["net.stem", "net.out.2"],
                        help="comma-separated module names left in fp32 ('' quantizes everything)")
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    images = to_float(load_images_npz(args.data, "x_test", args.n_images + args.calibration_images))
    clean, spare = images[: args.n_images], images[args.n_images:]
    if len(spare) == 0:
        raise SystemExit(f"{args.data} has no images beyond the {args.n_images} scored ones to calibrate on; "
                         "lower --n-images")
    reference = Denoiser.from_checkpoint(args.checkpoint, device="cpu", amp="auto")
    int8 = Denoiser.from_checkpoint(args.checkpoint, device="cpu", amp="off")
    seed = reference.params.eval.noise_seed

    start = time.perf_counter()
    calibration = [model_inputs(make_noisy(spare[i:i + args.batch_size], sigma, seed + 1 + k), sigma)
                   for k, sigma in enumerate(args.sigmas) for i in range(0, len(spare), args.batch_size)]
    int8.model = quantize_int8(int8.model, calibration, args.keep_float)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    warm_up = make_noisy(clean[: args.batch_size + 1], args.sigmas[0], seed)  # a full and a ragged batch
    int8.denoise(warm_up, args.sigmas[0], batch_size=args.batch_size)
    compile_s = time.perf_counter() - start

    setup_s = {"bf16 (eval.amp auto)": 0.0, "int8": quantize_s + compile_s}
    tables = {label: run_methods(clean, args.sigmas, model_methods(den, [1], args.batch_size), seed).table
              for label, den in zip(setup_s, (reference, int8))}
    print(f"\n### One-step denoising, {args.checkpoint}: bf16 against int8 (fp32: {', '.join(args.keep_float) or 'none'})"
          f"\n\n{len(clean)} lossless test images, batch {args.batch_size}, {torch.get_num_threads()} threads. "
          f"int8 setup: {quantize_s:.0f} s export + calibration on {len(spare)} images x {len(args.sigmas)} sigmas, "
          f"{compile_s:.0f} s compilation.\n")
    print("| model | " + " | ".join(f"PSNR σ={s:g}" for s in args.sigmas) + " | images/s | "
          f"{EVAL_IMAGES:,} images incl. setup |")
    print("|---|" + "---|" * len(args.sigmas) + "---|---|")
    for label, table in tables.items():
        speed = table.images_per_s.median()
        print(f"| {label} | " + " | ".join(f"{p:.2f}" for p in table.psnr) +
              f" | {speed:.1f} | {setup_s[label] + EVAL_IMAGES / speed:.0f} s |")


if __name__ == "__main__":
    main()
