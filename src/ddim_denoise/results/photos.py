"""The worked example's table (pipelines/results/photos): a model trained on a folder of photos against BM3D and
against the CIFAR-10 model, on the same noisy test photos denoised whole."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ddim_denoise.evaluation.evaluate import NOISY, ONE_STEP, TABLE_COLUMNS, model_method_name
from ddim_denoise.pipeline.files import SUMMARY_FILE, TABLE_FILE
from ddim_denoise.results.sources import read_csv, read_json, rows_by_sigma

STUDY = "pipelines/results/photos"
PARAMS = f"{STUDY}/params.yaml"
PHOTOS_TABLE = f"{STUDY}/evaluation/{TABLE_FILE}"
CIFAR_TABLE = f"{STUDY}/cifar_model/{TABLE_FILE}"
TRAINING = f"{STUDY}/training/{SUMMARY_FILE}"
SOURCES = (PARAMS, PHOTOS_TABLE, CIFAR_TABLE, TRAINING)


def _cell(rows: pd.DataFrame, sigma: float) -> str:
    if sigma not in rows.index:
        return "–"
    row = rows.loc[sigma]
    return f"{row.psnr:.2f} ± {row.psnr_ci95:.2f} / {row.ssim:.3f}"


def render(root: Path) -> str:
    params = yaml.safe_load((root / PARAMS).read_text())
    photos, cifar = read_csv(root, PHOTOS_TABLE, TABLE_COLUMNS), read_csv(root, CIFAR_TABLE, TABLE_COLUMNS)
    summary = read_json(root, TRAINING)
    ddim = model_method_name(params["eval"]["ddim_steps"])

    columns = {"noisy input": rows_by_sigma(photos, NOISY), "BM3D": rows_by_sigma(photos, "bm3d"),
               "NLM": rows_by_sigma(photos, "nlm"), "CIFAR-10 model, one step": rows_by_sigma(cifar, ONE_STEP),
               "photos model, one step": rows_by_sigma(photos, ONE_STEP),
               f"photos model, DDIM-{params['eval']['ddim_steps']}": rows_by_sigma(photos, ddim)}
    one, bm3d, cifar_one = columns["photos model, one step"], columns["BM3D"], columns["CIFAR-10 model, one step"]
    header = ["σ", *columns, "photos − BM3D", "photos − CIFAR-10 model"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sigma in one.index:
        gaps = [f"{one.psnr[sigma] - other.psnr[sigma]:+.2f}" if sigma in other.index else "–"
                for other in (bm3d, cifar_one)]
        lines.append("| " + " | ".join([f"{sigma:g}", *(_cell(rows, sigma) for rows in columns.values()), *gaps])
                     + " |")
    test = ", ".join(params["data"]["test_files"])
    lead = (f"`dvc repro {STUDY}/dvc.yaml`: the `photos` profile's model ({summary['parameters'] / 1e6:.2f}M "
            f"parameters, {summary['train_seconds']:.0f} s of training in {summary['precision']} on "
            f"{summary['device_name']}, best validation PSNR {summary['best_val_psnr']:.2f} dB) and the main chain's "
            f"CIFAR-10 model, on the same noisy test photos ({test}; n = {int(one.n_images.max())}), each denoised "
            "whole. PSNR (dB) ± 95% CI / SSIM, per-photo means; the differences are paired, on the same photos and "
            "noise.")
    return "\n".join([lead, "", *lines])
