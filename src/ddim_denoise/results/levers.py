"""The lever study's table (pipelines/results/levers): params.yaml's defaults against one change at a time, each
trial scored on the lossless validation split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ddim_denoise.results.sources import read_csv
from ddim_denoise.sweep.report import BASELINE_ATTR, ENQUEUED_ATTR

STUDY = "pipelines/results/levers"
TRIALS = f"{STUDY}/results/trials.csv"
SPACE = f"{STUDY}/space.yaml"
SOURCES = (TRIALS, SPACE)


def _attr(trials: pd.DataFrame, name: str) -> pd.Series:
    column = f"user_attrs_{name}"
    return trials[column] if column in trials else pd.Series(float("nan"), index=trials.index)


def is_baseline(trials: pd.DataFrame) -> pd.Series:
    """Which trials ran params.yaml's own values (``objective.baseline``)."""
    return _attr(trials, BASELINE_ATTR).astype(str).eq("True")


def baseline_value(trials: pd.DataFrame, path: Path) -> float:
    """The value of the trial that ran params.yaml's own values: what every other trial is measured against."""
    baseline = is_baseline(trials)
    if not baseline.any():
        raise ValueError(f"{path}: no trial ran params.yaml's own values (objective.baseline)")
    return float(trials.value[baseline].iloc[0])


def changes(trials: pd.DataFrame) -> pd.Series:
    """What each trial changed: its ``objective.enqueue`` entry, or that it ran params.yaml's defaults."""
    return _attr(trials, ENQUEUED_ATTR).where(~is_baseline(trials), "none: params.yaml's defaults")


def render(root: Path) -> str:
    trials = read_csv(root, TRIALS, ("number", "state", "value"))
    budget = yaml.safe_load((root / SPACE).read_text())["budget"]
    reference = baseline_value(trials, root / TRIALS)
    change = changes(trials)
    ssim = _attr(trials, "val_ssim_mean")
    lines = ["| trial | change | validation PSNR (dB) | minus the defaults | validation SSIM | state |",
             "|---|---|---|---|---|---|"]
    for i, row in trials.iterrows():
        done = row.state == "COMPLETE"
        lines.append(f"| {row.number} | {change[i]} | " + (f"{row.value:.3f} | {row.value - reference:+.3f}" if done
                     else "– | –") + f" | {ssim[i]:.4f} | {row.state} |")
    complete = trials[trials.state == "COMPLETE"]
    better = complete[complete.value > reference]
    verdict = ("No change beats the defaults at this budget." if better.empty else
               "Above the defaults at this budget: " + ", ".join(f"{change[i]} ({v - reference:+.3f} dB)"
                                                                 for i, v in better.value.items()) + ".")
    lead = (f"Each trial trains {budget['train.epochs']} epochs x {budget['train.max_train_images']:,} images and is "
            f"scored on {budget['train.val_images']:,} lossless validation images: one-step PSNR, mean over "
            f"eval.sigmas, best epoch, EMA weights (`dvc repro {STUDY}/dvc.yaml`). One seed per trial.")
    return "\n".join([lead, "", *lines, "", f"- {verdict}"])
