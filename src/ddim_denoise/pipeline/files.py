"""The names of the files that stages hand each other: one place, which dvc.yaml's paths follow (a test checks).

Folders that are params (``data.prepared_dir``, ``train.out_dir``, ``eval.out_dir``, ``report.out_dir``) come from
params.yaml; the names inside them, and the training records folder, are fixed here.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_FILE = "manifest.json"  # in data.prepared_dir: what prepare made, and from what

BEST_CHECKPOINT = "best.pt"  # in train.out_dir: the EMA weights of the best validation epoch
LAST_CHECKPOINT = "last.pt"  # in train.out_dir: the whole state of the last finished epoch, for resuming
EPOCH_CHECKPOINTS = "epoch_*.pt"  # in train.out_dir: the periodic checkpoints (epoch_checkpoint names each)


def epoch_checkpoint(epoch: int) -> str:
    """The periodic checkpoint of ``epoch``: ``epoch_0012.pt``."""
    return f"epoch_{epoch:04d}.pt"


TRAINING_DIR = Path("training")  # the training's records, small enough for git
SUMMARY_FILE = "summary.json"
STEPS_FILE = "steps.csv"
VAL_FILE = "val.csv"

METRICS_FILE = "metrics.json"  # in eval.out_dir
TABLE_FILE = "psnr_vs_sigma.csv"
GRID_FILE = "grid.png"

REPORT_FILE = "report.md"  # in report.out_dir
