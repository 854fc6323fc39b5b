"""The search's history and verdict (pipelines/sweep): every trial with what it changed from params.yaml's defaults,
then the verification of the best at a full training budget, and whether params.yaml may take it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ddim_denoise.results.levers import baseline_value, is_baseline
from ddim_denoise.results.sources import read_csv, read_json
from ddim_denoise.sweep.report import format_changes
from ddim_denoise.sweep.verify import Verification

STUDY = "pipelines/sweep"
TRIALS = f"{STUDY}/results/trials.csv"
VERIFICATION = f"{STUDY}/results/verification.json"
SPACE = f"{STUDY}/space.yaml"
SOURCES = (TRIALS, VERIFICATION, SPACE)


def short(value):
    """A sampled float to 3 significant digits (the table's reader needs the setting, not the sampler's digits;
    trials.csv keeps them all)."""
    return float(f"{value:.3g}") if isinstance(value, float) and not value.is_integer() else value


def changed_values(trials: pd.DataFrame) -> pd.Series:
    """Each trial's values that differ from the defaults' trial (trial 0), as `key=value, ...`."""
    params = [c for c in trials if c.startswith("params_")]
    defaults = trials[is_baseline(trials)].iloc[0]

    def changes(row) -> str:
        differ = {c.removeprefix("params_"): short(row[c]) for c in params
                  if pd.notna(row[c]) and str(row[c]) != str(defaults[c])}
        return format_changes(differ) or "none"

    return trials.apply(changes, axis=1)


def render(root: Path) -> str:
    trials = read_csv(root, TRIALS, ("number", "state", "value"))
    reference = baseline_value(trials, root / TRIALS)
    space = yaml.safe_load((root / SPACE).read_text())
    budget, pruner = space["budget"], space["pruner"]
    counts = trials.state.value_counts()
    lead = (f"`dvc repro {STUDY}/dvc.yaml`: {len(trials)} trials of {budget['train.epochs']} epochs x "
            f"{budget['train.max_train_images']:,} images, scored on {budget['train.val_images']:,} lossless "
            f"validation images (one-step PSNR, mean over eval.sigmas, best epoch), {pruner['default']} pruning by "
            f"epoch: {counts.get('COMPLETE', 0)} complete, {counts.get('PRUNED', 0)} pruned, "
            f"{counts.get('FAIL', 0)} failed. A pruned trial's value is that of the epoch it stopped at.")
    lines = ["| trial | state | validation PSNR (dB) | minus the defaults | changed from params.yaml |",
             "|---|---|---|---|---|"]
    for (_, row), change in zip(trials.iterrows(), changed_values(trials)):
        scored = pd.notna(row.value)
        lines.append(f"| {row.number} | {row.state} | " + (f"{row.value:.3f} | {row.value - reference:+.3f}"
                     if scored else "– | –") + f" | {change} |")
    complete = trials[trials.state == "COMPLETE"]
    if complete.empty:
        raise ValueError(f"{root / TRIALS}: no trial completed, so there is no best to report")
    best = complete.loc[complete.value.idxmax()]
    verification = Verification(**read_json(root, VERIFICATION))
    adopted = ("params.yaml takes it (`ddim-denoise sweep best --apply`)." if verification.verified else
               "params.yaml keeps its values: `sweep best --apply` refuses.")
    return "\n".join([lead, "", *lines, "",
                      f"- Best: trial {best.number}, {best.value:.3f} dB ({best.value - reference:+.3f} dB over the "
                      "defaults at this budget).",
                      f"- Verification (`ddim-denoise sweep verify`): {verification.line()}. {adopted}"])
