"""What a run leaves on record: ``steps.csv`` / ``val.csv`` histories, ``summary.json``, and its MLflow run."""

from __future__ import annotations

import fnmatch
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ddim_denoise.pipeline import tracking
from ddim_denoise.pipeline.checkpoint import atomic_write_text
from ddim_denoise.pipeline.files import (
    BEST_CHECKPOINT,
    EPOCH_CHECKPOINTS,
    LAST_CHECKPOINT,
    STEPS_FILE,
    SUMMARY_FILE,
    VAL_FILE,
)
from ddim_denoise.pipeline.params import Params, flatten

log = logging.getLogger(__name__)

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class History:
    steps: list = field(default_factory=list)  # [step, epoch, loss, lr]
    val: list = field(default_factory=list)  # [epoch, sigma, psnr, ssim]

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / STEPS_FILE, "step,epoch,loss,lr\n" + "".join(
            f"{int(s)},{int(e)},{l:.6g},{lr:.6g}\n" for s, e, l, lr in self.steps))
        atomic_write_text(folder / VAL_FILE, "epoch,sigma,psnr,ssim\n" + "".join(
            f"{int(e)},{s:g},{p:.4f},{q:.4f}\n" for e, s, p, q in self.val))


class RunRecords:
    """Rank 0's records of one run: the MLflow run (``run``: None until ``start``, and on other ranks), the CSV
    histories and summary.json in ``training_dir``, and the checkpoints in ``out_dir`` it uploads."""

    def __init__(self, params: Params, out_dir: Path, training_dir: Path, run_name: str, run_tags: dict[str, str]):
        self.params, self.out_dir, self.training_dir = params, out_dir, training_dir
        self.run_name, self.run_tags = run_name, run_tags
        self.run: tracking.SafeRun | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    def start(self, run_id: str | None, description: dict[str, str]) -> None:
        """Open the MLflow run ``run_id`` (a resume's) or a new one; a new one gets the params and ``description``
        (what the run trains on and with) as tags."""
        experiment = self.params.mlflow.experiment
        # Metric points MLflow cannot take are kept in out_dir, beside last.pt: it names the run that a resume
        # reopens and sends them to (kept even when MLflow is unreachable as it resumes), and the folder persists
        # between runs (dvc.yaml).
        self.run = tracking.start_run(experiment, run_name=self.run_name, run_id=run_id, tags=self.run_tags,
                                      unsent_dir=self.out_dir)
        if run_id is not None and self.run.run_id is None:
            log.warning("%s names MLflow run %s, which this tracking store does not hold (deleted, or the checkpoint "
                        "came from another store): logging to a new run", self.out_dir / LAST_CHECKPOINT, run_id)
            run_id = None
            self.run = tracking.start_run(experiment, run_name=self.run_name, tags=self.run_tags,
                                          unsent_dir=self.out_dir)
        if run_id is None:
            self.run.log_params(flatten(self.params))
            self.run.set_tags({"git_commit": git_commit(), **description})

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run:
            self.run.log_metrics(metrics, step=step)

    def epoch_logged(self, metrics: dict, step: int, checkpoint_names: list[str]) -> None:
        """An epoch's metrics, and its periodic checkpoints when ``mlflow.log_checkpoints`` (the best is uploaded
        once, at the end: it changes often)."""
        if not self.run:
            return
        self.run.log_metrics(metrics, step=step)
        if self.params.mlflow.log_checkpoints:
            for name in checkpoint_names:
                if fnmatch.fnmatch(name, EPOCH_CHECKPOINTS):
                    self.run.log_artifact(self.out_dir / name, "checkpoints")

    def failed(self, error: BaseException) -> None:
        if self.run:
            self.run.set_tags({"error": f"{type(error).__name__}: {error}"[:5000]})
            self.run.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def finish(self, summary: dict, history: History, step: int) -> None:
        """Write summary.json and the histories; upload them and best.pt; close the run."""
        atomic_write_text(self.training_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        history.write(self.training_dir)
        if not self.run or self.run.run_id is None:
            return
        metrics = {"parameters": summary["parameters"], "train_images_per_s": summary["images_per_s"],
                   "train_seconds": summary["train_seconds"], "best_val_psnr": summary["best_val_psnr"],
                   "validation_seconds": summary["validation_seconds"],
                   "checkpoint_seconds": summary["checkpoint_seconds"]}
        if summary["steady_images_per_s"] is not None:
            metrics["train_images_per_s_steady"] = summary["steady_images_per_s"]
        self.run.log_metrics(metrics, step=step)
        self.run.log_artifacts(self.training_dir, "training")
        if self.params.mlflow.log_checkpoints and (self.out_dir / BEST_CHECKPOINT).is_file():
            self.run.log_artifact(self.out_dir / BEST_CHECKPOINT, "checkpoints")
        # No model is logged here: evaluate logs the evaluated checkpoint into this run as a code-based pyfunc model
        # (mlflow.log_model), the one form that loading cannot turn into running pickled code.
        self.run.finish()
