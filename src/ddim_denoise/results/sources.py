"""Reading the committed result files the docs are written from: one clear line when one is missing or old."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ddim_denoise.evaluation.report import load_training_summary
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.pipeline.files import SUMMARY_FILE, TABLE_FILE, TRAINING_DIR

# The files the main chain commits (dvc.yaml's outs): eval.out_dir is `evaluation` there.
EVALUATION_TABLE = f"evaluation/{TABLE_FILE}"
TRAINING_SUMMARY = (TRAINING_DIR / SUMMARY_FILE).as_posix()


def _committed(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise DataError(f"{path} not found: `dvc pull` or `dvc repro` of its pipeline writes it")
    return path


def read_csv(root: Path, relative: str, columns: Iterable[str] = ()) -> pd.DataFrame:
    """``root/relative`` as a table holding ``columns``; a DataError naming the file and the rerun otherwise."""
    path = _committed(root, relative)
    table = pd.read_csv(path)
    missing = [column for column in columns if column not in table]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; rerun `dvc repro` of its pipeline")
    return table


def read_json(root: Path, relative: str) -> dict:
    """``root/relative`` as JSON; a DataError naming the file and the rerun when it is missing."""
    return json.loads(_committed(root, relative).read_text())


def training_summary(root: Path, relative: str = TRAINING_SUMMARY) -> dict:
    """A training run's summary.json, ``root/relative``; a DataError naming the file and the rerun when missing."""
    summary = load_training_summary((root / relative).parent)
    if summary is None:
        raise DataError(f"{root / relative} not found: `dvc pull` or `dvc repro` of its pipeline writes it")
    return summary


def rows_by_sigma(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """An evaluation table's rows of one method, indexed by sigma."""
    return table[table.method == method].set_index("sigma")
