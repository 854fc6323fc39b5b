"""The transfer study (pipelines/results/transfer): does the ranking at the search's short budget predict the ranking
at a budget that stands for real training? The lever study's trials (the short budget) are run again, the same
configurations in the same order, with one full epoch of the whole training split, and the two rankings are compared
by Spearman's rank correlation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.results import levers
from ddim_denoise.results.sources import read_csv

STUDY = "pipelines/results/transfer"
LONG_TRIALS = f"{STUDY}/results/trials.csv"
SOURCES = (levers.TRIALS, LONG_TRIALS)
COLUMNS = ("number", "state", "value")


def paired_trials(root: Path) -> pd.DataFrame:
    """One row per configuration both studies completed: ``change``, ``short`` and ``long`` values and ranks (1 =
    best). A configuration is matched by trial number and must hold the same parameters in both."""
    short, long = read_csv(root, levers.TRIALS, COLUMNS), read_csv(root, LONG_TRIALS, COLUMNS)
    params = [c for c in short if c.startswith("params_")]
    both = short.merge(long, on="number", suffixes=("_short", "_long"))
    differs = [n for n, row in both.iterrows() for c in params
               if str(row.get(f"{c}_short")) != str(row.get(f"{c}_long"))]
    if differs:
        raise DataError(f"{root / LONG_TRIALS}: trial {both.number[differs[0]]} ran other parameters than the lever "
                        f"study's; rerun `dvc repro {STUDY}/dvc.yaml`")
    done = both[(both.state_short == "COMPLETE") & (both.state_long == "COMPLETE")]
    table = pd.DataFrame({"number": done.number, "change": levers.changes(short).loc[done.index].values,
                          "short": done.value_short, "long": done.value_long})
    table["short_rank"] = table.short.rank(ascending=False, method="min").astype(int)
    table["long_rank"] = table.long.rank(ascending=False, method="min").astype(int)
    return table.reset_index(drop=True)


def rank_correlation(table: pd.DataFrame) -> float:
    return float(spearmanr(table.short, table.long).statistic)


def render(root: Path) -> str:
    table = paired_trials(root)
    lines = ["| trial | change | short budget (dB) | rank | one full epoch (dB) | rank |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.number} | {r.change} | {r.short:.3f} | {r.short_rank} | {r.long:.3f} | {r.long_rank} |"
              for r in table.itertuples(index=False)]
    return "\n".join([*lines, "", f"Spearman's rank correlation over {len(table)} configurations: "
                                  f"{rank_correlation(table):+.2f}."])
