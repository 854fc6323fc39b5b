"""The speed study's tables (pipelines/results/speed): training and denoising images/s on the machine that ran it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ddim_denoise.evaluation.denoising_speed import denoising_speed_markdown
from ddim_denoise.evaluation.training_speed import TrainingSpeedRow, training_speed_markdown
from ddim_denoise.results.sources import read_csv

STUDY = "pipelines/results/speed"
TRAINING = f"{STUDY}/training_speed.csv"
DENOISING = f"{STUDY}/denoising_speed.csv"
SOURCES = (TRAINING, DENOISING)
TRAINING_COLUMNS = [field.name for field in fields(TrainingSpeedRow)]
DENOISING_COLUMNS = ("sigma", "method", "runs_on", "n_images", "images_per_s", "psnr", "gflop", "tflops", "peak_share",
                     "device_name", "batch_size")


def render(root: Path) -> str:
    training = read_csv(root, TRAINING, TRAINING_COLUMNS)
    denoising = read_csv(root, DENOISING, DENOISING_COLUMNS)
    model_rows = denoising[denoising.gflop.notna()]
    sigma = denoising.sigma.iloc[0]
    return "\n".join([
        "**Training** (`benchmarks/train_speed.py`): one optimizer step on a fixed batch, as the trainer takes it, "
        "timed after the warm-up.", "", training_speed_markdown(training), "",
        f"**Denoising** (`benchmarks/denoise_speed.py`) at sigma {sigma:g} on {model_rows.device_name.iloc[0]}, "
        f"model batch {model_rows.batch_size.iloc[0]}: the wall time of each method's call alone.", "",
        denoising_speed_markdown(denoising)])
