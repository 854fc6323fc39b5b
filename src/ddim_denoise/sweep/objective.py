"""One sweep trial: train on params.yaml + budget + sampled values, report each epoch to Optuna, score the result.

The objective is a validation figure (``objective.metric``, by default the mean one-step PSNR of the EMA weights over
``eval.sigmas`` on the fixed validation subset with fixed noise seeds, as ``Trainer.validate`` computes it); the
trial's value is its best epoch. The test split is never touched. Each trial trains into its own folder
(``<trials_dir>/trial_NNNN/``), so trials never overwrite the main pipeline's ``models/`` and ``training/``.

Outcomes, recorded both as Optuna state/user attributes and as MLflow tags on the trial's nested run:
- complete: value, best-epoch SSIM, a DDIM-steps PSNR/SSIM of the best checkpoint, throughput;
- pruned (``optuna.TrialPruned`` raised from the Trainer's epoch hook): the epoch and value reached;
- pruned as diverged (the loss went non-finite or rose and stayed up: ``DivergedError``): the reason too. Settings
  that do not train are an answer about the space, not a broken trial: TPE ranks pruned trials (below every complete
  one) but ignores failed ones, so it learns to avoid a learning rate that diverges instead of sampling it again;
- failed (out of memory, a full disk, an invalid combination, ...): the reason; the search goes on.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddim_denoise.pipeline.errors import DivergedError
from ddim_denoise.pipeline.params import Params
from ddim_denoise.sweep import tracking as sweep_tracking
from ddim_denoise.sweep.space import SearchSpace
from ddim_denoise.sweep.storage import FAIL_REASON_ATTR, WORKER_ATTR, worker_identity

DIVERGED_ATTR = "diverged"  # the user attribute (and MLflow tag) holding a diverged trial's reason
MAX_REASON_CHARS = 2000  # Optuna user attributes and MLflow tags hold the failure reason, not a full traceback


@dataclass
class EpochReporter:
    """The Trainer's ``on_epoch_end`` hook: reports the objective metric to Optuna and raises TrialPruned when the
    pruner says so. Keeps the best epoch's metrics for the trial's user attributes."""

    trial: object
    metric: str
    prune: bool = True  # False for multi-objective studies: Optuna cannot prune them
    best_value: float = -math.inf
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    last_epoch: int = 0
    last_value: float | None = None

    def __call__(self, epoch: int, metrics: dict) -> None:
        import optuna

        value = metrics.get(self.metric)
        if value is None:  # no validation this epoch (train.val_every > 1)
            return
        value = float(value)
        self.last_epoch, self.last_value = epoch, value
        if value > self.best_value:
            self.best_value, self.best_epoch, self.best_metrics = value, epoch, dict(metrics)
        if self.prune:
            self.trial.report(value, epoch)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric} {value:.3f}")


def per_image_scores(checkpoint: Path, clean: np.ndarray, params: Params,
                     steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR and SSIM of ``steps``-step denoising (DDIM stopping at ``eval.ddim_stop_sigma``; one step is
    Tweedie's estimate) with the checkpoint's EMA weights, each image's mean over ``eval.sigmas``, with the same
    fixed noise seeds as validation."""
    from ddim_denoise.core.metrics import make_noisy, psnr_ssim
    from ddim_denoise.denoising.denoiser import Denoiser

    denoiser = Denoiser.from_checkpoint(checkpoint, params.train.device, amp=params.eval.amp)
    psnrs, ssims = [], []
    for sigma in params.eval.sigmas:
        noisy = make_noisy(clean, sigma, params.eval.noise_seed)
        psnr, ssim = psnr_ssim(clean, denoiser.denoise(noisy, sigma, steps=steps, batch_size=params.eval.batch_size,
                                                       ddim_stop_sigma=params.eval.ddim_stop_sigma))
        psnrs.append(psnr)
        ssims.append(ssim)
    return np.mean(psnrs, axis=0), np.mean(ssims, axis=0)


def ddim_scores(checkpoint: Path, clean: np.ndarray, params: Params, steps: int) -> dict[str, float]:
    """Mean PSNR/SSIM of ``steps``-step DDIM denoising on the validation subset ``clean`` (``per_image_scores``)."""
    psnr, ssim = per_image_scores(checkpoint, clean, params, steps)
    return {"ddim_steps": steps, "ddim_images": len(clean), "ddim_psnr_mean": float(psnr.mean()),
            "ddim_ssim_mean": float(ssim.mean())}


def mean_of(metrics: dict, prefix: str) -> float | None:
    values = [float(v) for k, v in metrics.items() if k.startswith(prefix)]
    return float(np.mean(values)) if values else None


def failure_reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:MAX_REASON_CHARS]


@dataclass
class TrialObjective:
    """The function Optuna calls per trial. Returns the objective value (single) or (value, train images/s)."""

    base: Params
    space: SearchSpace
    study_name: str
    trials_dir: Path
    parent_run_id: str | None
    multi_objective: bool = False

    def __call__(self, trial):
        import optuna

        from ddim_denoise.training.build import build_trainer

        trial.set_user_attr(WORKER_ATTR, worker_identity())
        sampled = self.space.sample(trial)
        folder = self.trials_dir / f"trial_{trial.number:04d}"
        reporter = EpochReporter(trial, self.space.objective.metric, prune=not self.multi_objective)
        trainer = None
        try:
            params = self.space.trial_params(self.base, sampled, folder / "models")
            trainer = build_trainer(params, on_epoch_end=reporter, run_name=f"trial-{trial.number}",
                                    run_tags=sweep_tracking.trial_run_tags(self.parent_run_id, self.study_name,
                                                                           trial.number),
                                    training_dir=folder / "training")
            summary = trainer.fit()
            if not math.isfinite(reporter.best_value):
                raise DivergedError(f"no finite {reporter.metric} in any epoch: the model diverged")
            objective = self.space.objective
            scores = ddim_scores(folder / "models" / "best.pt", trainer.val_clean[: objective.ddim_images], params,
                                 objective.ddim_steps or params.eval.ddim_steps)
        except optuna.TrialPruned:
            self._record_pruned(trial, trainer, reporter)
            raise
        except DivergedError as e:
            reason = failure_reason(e)
            trial.set_user_attr(DIVERGED_ATTR, reason)
            self._record_pruned(trial, trainer, reporter, {DIVERGED_ATTR: reason})
            _free_accelerator_memory()
            raise optuna.TrialPruned(reason) from None
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL and the search stops
            trial.set_user_attr(FAIL_REASON_ATTR, "interrupted")
            sweep_tracking.record_outcome(self._run_id(trial, trainer), "FAIL", tags={"error": "interrupted"})
            raise
        except Exception as e:  # the study's catch=(Exception,) marks it FAIL and the search goes on
            reason = failure_reason(e)
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
            run_id = self._run_id(trial, trainer)
            if run_id is None:
                run_id = sweep_tracking.record_failure_without_run(self.base.mlflow.experiment, self.parent_run_id,
                                                                   self.study_name, trial.number, sampled, reason)
                trial.set_user_attr(sweep_tracking.RUN_ID_ATTR, run_id)
            else:  # FAILED also when training finished and the scoring after it failed
                sweep_tracking.record_outcome(run_id, "FAIL", tags={"error": reason}, status="FAILED")
            _free_accelerator_memory()
            raise
        return self._complete(trial, trainer, reporter, summary, scores)

    def _complete(self, trial, trainer, reporter: EpochReporter, summary: dict, scores: dict):
        attrs = {"best_epoch": reporter.best_epoch, "val_ssim_mean": mean_of(reporter.best_metrics, "val_ssim_sigma"),
                 **scores, "train_images_per_s": summary["images_per_s"], "train_seconds": summary["train_seconds"],
                 "parameters": summary["parameters"]}
        for key, value in attrs.items():
            if value is not None:
                trial.set_user_attr(key, value)
        steps = scores["ddim_steps"]
        sweep_tracking.record_outcome(self._run_id(trial, trainer), "COMPLETE", metrics={
            "objective": reporter.best_value, f"val_ddim{steps}_psnr_mean": scores["ddim_psnr_mean"],
            f"val_ddim{steps}_ssim_mean": scores["ddim_ssim_mean"]})
        if self.multi_objective:
            return reporter.best_value, float(summary["images_per_s"])
        return reporter.best_value

    def _record_pruned(self, trial, trainer, reporter: EpochReporter, tags: dict[str, str] | None = None) -> None:
        trial.set_user_attr("pruned_at_epoch", reporter.last_epoch)
        metrics = {"pruned_value": reporter.last_value} if reporter.last_value is not None else None
        sweep_tracking.record_outcome(self._run_id(trial, trainer), "PRUNED", status="KILLED", metrics=metrics,
                                      tags={"pruned_at_epoch": str(reporter.last_epoch), **(tags or {})})

    @staticmethod
    def _run_id(trial, trainer) -> str | None:
        run_id = trainer.run.run_id if trainer is not None and trainer.run is not None else None
        if run_id is not None:
            trial.set_user_attr(sweep_tracking.RUN_ID_ATTR, run_id)
        return run_id


def _free_accelerator_memory() -> None:
    """After an out-of-memory failure the next trial needs the memory the failed one held."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
