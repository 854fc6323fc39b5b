"""Training throughput (images/s) of the U-Net under each precision / memory-format / compile setting, one run.

    python benchmarks/train_speed.py                       # default model from params.yaml, batch 64, this device
    python benchmarks/train_speed.py -S model.base_channels=32 --steps 20 --modes fp32,bf16_cl,bf16_cl_compile
    python benchmarks/train_speed.py --out speed.csv        # the rows as CSV too (pipelines/results/speed)

Prints one row per mode and the speed-up over the first row, plus the model's training FLOPs per image, the achieved
TFLOP/s and its share of the matrix-product peak measured on the same device in the mode's precision
(``ddim_denoise.evaluation.training_speed``, whose ``MODES`` lists the modes).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from ddim_denoise.evaluation.training_speed import TrainingSpeedRow, inductor_settings, training_speed_report
from ddim_denoise.pipeline.checkpoint import atomic_write_text
from ddim_denoise.pipeline.params import load_params, parse_overrides
from ddim_denoise.pipeline.runtime import resolve_device


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], help="param override KEY=VALUE")
    ap.add_argument("--batch", default="64", help="batch size, or several comma-separated (one row per mode each)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="fp32,bf16_cl,bf16_cl_compile")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cudnn-benchmark", default="on",
                    help="on, off or off,on (one row each): torch.backends.cudnn.benchmark, as train.cudnn_benchmark "
                         "sets it on a GPU (no effect on a CPU)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the last row, profile this many of its steps and print where the time went")
    ap.add_argument("--profile-rows", type=int, default=30)
    ap.add_argument("--out", type=Path, help="also write the rows to this CSV (a results pipeline's output)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="a torch._inductor.config setting for the compiled modes on top of params' train.inductor "
                         "(as the Trainer applies it), e.g. coordinate_descent_tuning=True")
    args = ap.parse_args(argv)
    try:
        inductor_overrides = inductor_settings(args.inductor)
        params = load_params(args.params, parse_overrides(args.set))  # -S as the CLI reads it
    except ValueError as e:  # a bad pair, YAML value, key or params.yaml: one line (ParamsError)
        ap.error(str(e))
    cudnn_settings = args.cudnn_benchmark.split(",")
    if not set(cudnn_settings) <= {"on", "off"}:
        ap.error(f"--cudnn-benchmark takes on, off or both comma-separated, not {args.cudnn_benchmark!r}")
    report = training_speed_report(params, [int(b) for b in args.batch.split(",")], args.modes.split(","),
                                   resolve_device(args.device), args.steps, args.warmup, cudnn_settings,
                                   {**params.train.inductor, **inductor_overrides}, args.profile, args.profile_rows)
    rows = []
    for item in report:
        print(item, flush=True)
        if isinstance(item, TrainingSpeedRow):
            rows.append(item)
    if args.out:
        atomic_write_text(args.out, pd.DataFrame(map(asdict, rows)).to_csv(index=False))


if __name__ == "__main__":
    main()
