"""Verification before adoption: a search's winner, found at the search's short per-trial budget, is retrained at
the budget people train at beside params.yaml's defaults at that same budget, both scored per image on the whole
lossless validation split. The budget is a params file's: params.yaml's own by default, or a study's such as the CPU
recipe's (pipelines/results/recipes/cpu/params.yaml, the cpu profile composed). It counts as verified only when the
paired difference (winner minus defaults, one-step PSNR averaged over ``eval.sigmas``) is above zero by more than
its 95% confidence interval. The result is stored on the study (``VERIFICATION_ATTR``), and ``sweep best --apply``
applies only a verified winner (``adoption_refusal``). A winner whose training diverges at that budget is not
verified whatever it scores: its best validated weights are scored all the same, so the verdict says how far short
it fell (it has no score when it diverged before its first validation).

Each side is trained once, with the budget file's seed: the interval covers the choice of validation images, not the
spread between training runs, so a verified win smaller than that spread can still be luck. The defaults' side is
the budget file's own training (its ``train.out_dir``) when that is finished and is this very run (the run
fingerprint: params, data and training code), as the CPU recipe's is; otherwise it is trained.

The trainings go to ``sweeps/<study>/verify/{defaults,trial_NNNN}/`` and resume when rerun after an interruption.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ddim_denoise.core.metrics import mean_ci95, to_float
from ddim_denoise.data.prepared import data_identity, load_split, read_manifest
from ddim_denoise.pipeline.checkpoint import atomic_write_text, load_checkpoint
from ddim_denoise.pipeline.errors import DivergedError
from ddim_denoise.pipeline.files import BEST_CHECKPOINT, LAST_CHECKPOINT
from ddim_denoise.pipeline.params import Params, ParamsError, flatten, load_params, validate_params
from ddim_denoise.pipeline.stage_code import code_digest
from ddim_denoise.pipeline.tracking import project_root
from ddim_denoise.sweep.objective import per_image_scores
from ddim_denoise.sweep.space import with_overrides
from ddim_denoise.sweep.storage import fingerprint_of

log = logging.getLogger(__name__)

VERIFICATION_ATTR = "verification"  # the study's user attribute holding the last ``Verification``
VERIFY_COMMAND = "ddim-denoise sweep verify"


@dataclass(frozen=True)
class Verification:
    trial: int
    params_fingerprint: str  # the budget file's values and the code it ran under: ``budget_fingerprint``
    n_images: int
    defaults_psnr: float
    defaults_ci95: float
    winner_psnr: float | None  # None: its training diverged before its first validation, so nothing was scored
    winner_ci95: float | None
    difference: float | None  # winner minus defaults, paired per image
    difference_ci95: float | None
    verified: bool
    winner_diverged: bool = False  # its training stopped as diverged; the scores are its best validated weights'
    budget: str = "params.yaml"  # the params file whose budget both sides trained at

    def line(self) -> str:
        if self.winner_diverged:
            verdict = "not verified: its training diverged at this budget (lower its train.lr)"
        else:
            verdict = "verified: it wins" if self.verified else "not verified: no win beyond the 95% CI"
        defaults = f"{self.defaults_psnr:.3f} ± {self.defaults_ci95:.3f} dB"
        if self.winner_psnr is None:
            scores = f"nothing to score (diverged before its first validation) against the defaults' {defaults}"
        else:
            scores = (f"{self.winner_psnr:.3f} ± {self.winner_ci95:.3f} dB against the defaults' {defaults}, paired "
                      f"difference {self.difference:+.3f} ± {self.difference_ci95:.3f} dB")
        where = f"trial {self.trial} at {self.budget}'s budget on {self.n_images:,} validation images"
        return f"{where}: {scores}; {verdict}"


def budget_fingerprint(budget: Params) -> str:
    """What a verification's result rests on: the budget file's values (the budget and the defaults) and the code."""
    values = {k: v for k, v in flatten(budget).items() if not k.startswith("mlflow.")}
    return fingerprint_of({"params": values, "code": code_digest("sweep")})


def project_path(path: Path) -> str:
    """``path`` as a verification records it: relative to the project root, so ``sweep best`` finds it again from
    any folder (absolute when it lies outside)."""
    resolved = Path(path).resolve()
    root = project_root()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def paired_verdict(trial: int, fingerprint: str, defaults: np.ndarray, winner: np.ndarray | None,
                   winner_diverged: bool = False, budget: str = "params.yaml") -> Verification:
    """The verdict from per-image scores of the same validation images: verified when the paired difference's 95%
    CI lies above zero and the winner trained without diverging. ``winner`` None: it diverged before scoring."""
    (defaults_mean, defaults_ci) = mean_ci95(defaults)
    if winner is None:
        return Verification(trial, fingerprint, len(defaults), defaults_mean, defaults_ci, None, None, None, None,
                            False, True, budget)
    difference, difference_ci = mean_ci95(winner - defaults)
    winner_mean, winner_ci = mean_ci95(winner)
    wins = bool(difference - difference_ci > 0) and not winner_diverged
    return Verification(trial, fingerprint, len(defaults), defaults_mean, defaults_ci, winner_mean, winner_ci,
                        difference, difference_ci, wins, winner_diverged, budget)


def validation_scores(checkpoint: Path, params: Params) -> np.ndarray:
    """One-step PSNR of ``checkpoint`` per image of the whole validation split, averaged over ``eval.sigmas``."""
    clean = to_float(load_split(params.data.prepared_dir, "val")[0])
    return per_image_scores(checkpoint, clean, params, steps=1)[0]


def own_checkpoint(path: Path, params: Params) -> dict | None:
    """``path``'s state when the run ``params`` describe wrote it: the same params, data and training code
    (``resume.run_fingerprint``, as a resume checks), validated at the same ``resume.validation_yardstick`` (which
    picked its best epoch). None otherwise: a checkpoint an earlier run left in the folder is never taken for this
    run's."""
    from ddim_denoise.training.resume import run_fingerprint, validation_yardstick

    if not path.is_file():
        return None
    state = load_checkpoint(path)
    fingerprint = run_fingerprint(params, data_identity(read_manifest(params.data.prepared_dir)))
    if state.get("fingerprint") != fingerprint or state.get("validation") != validation_yardstick(params):
        return None
    return state


def train_and_score(base: Params, values: dict, folder: Path, run_name: str, run_tags: dict[str, str],
                    diverging_allowed: bool = False) -> tuple[np.ndarray | None, bool]:
    """Train ``base`` + ``values`` into ``folder`` (resuming a run left there) and score its best checkpoint per
    image on the whole validation split; with ``diverging_allowed`` a diverged training is scored too (the flag
    says so), or gives None when it diverged before its first validation."""
    from ddim_denoise.training.build import build_trainer

    params = validate_params(with_overrides(base, {**values, "train.out_dir": str(folder / "models"),
                                                   "train.resume": "auto"}), source="verification params")
    best = folder / "models" / BEST_CHECKPOINT
    try:
        build_trainer(params, run_name=run_name, run_tags=run_tags, training_dir=folder / "training").fit()
    except DivergedError as e:
        if not diverging_allowed:
            raise
        log.warning("%s: %s", run_name, e)  # the guard's own words: which step, which threshold
        return (validation_scores(best, params) if own_checkpoint(best, params) else None), True
    return validation_scores(best, params), False


def finished_training(params: Params) -> Path | None:
    """The best checkpoint of ``params``' own training (its ``train.out_dir``) when that training is finished and is
    this very run (``own_checkpoint``)."""
    last, best = (Path(params.train.out_dir) / name for name in (LAST_CHECKPOINT, BEST_CHECKPOINT))
    state = own_checkpoint(last, params)
    finished = state is not None and state.get("epoch", 0) >= params.train.epochs
    return best if finished and own_checkpoint(best, params) else None


def defaults_scores(budget: Params, folder: Path, run_tags: dict[str, str]) -> np.ndarray:
    """The defaults' per-image scores at this budget: from the budget file's own finished training when there is one
    (``finished_training``), else from a training of their own in ``folder``. Their diverging is an error: the
    budget file itself does not train."""
    finished = finished_training(budget)
    if finished is None:
        return train_and_score(budget, {}, folder, "verify-defaults", run_tags)[0]
    log.info("the defaults at this budget: %s, their finished training", finished)
    return validation_scores(finished, budget)


def verify_trial(study, trial, budget: Params, budget_file: Path, folder: Path,
                 out: Path | None = None) -> Verification:
    """Retrain ``trial``'s values and take the defaults at the budget of ``budget_file`` (``budget``, loaded),
    compare them, and store the verdict on the study (and as JSON in ``out``, a DVC metric)."""
    tags = {"sweep.study": study.study_name, "sweep.verify": str(trial.number)}
    defaults = defaults_scores(budget, folder / "defaults", tags)
    winner, diverged = train_and_score(budget, trial.params, folder / f"trial_{trial.number:04d}",
                                       f"verify-trial-{trial.number}", tags, diverging_allowed=True)
    verification = paired_verdict(trial.number, budget_fingerprint(budget), defaults, winner, diverged,
                                  project_path(budget_file))
    study.set_user_attr(VERIFICATION_ATTR, asdict(verification))
    if out is not None:
        atomic_write_text(out, json.dumps(asdict(verification), indent=2) + "\n")
    return verification


def adoption_refusal(study, trial) -> str | None:
    """Why ``trial`` may not be written into params.yaml (one line), or None when a verification found it better
    than the defaults at the budget of a params file that has not changed since, under the same code."""
    recorded = study.user_attrs.get(VERIFICATION_ATTR)
    if not recorded or recorded.get("trial") != trial.number:
        return (f"trial {trial.number} is not verified: run `{VERIFY_COMMAND}`, which retrains it and the defaults at "
                "a full training budget, and apply it only if it wins there")
    try:
        verification = Verification(**recorded)
    except TypeError:  # recorded by another version of this code
        return f"trial {trial.number}'s verification is in an older form: run `{VERIFY_COMMAND}` again"
    try:
        fingerprint = budget_fingerprint(load_params(project_root() / verification.budget))
    except ParamsError as e:
        return f"trial {trial.number} was verified at {verification.budget}'s budget, which cannot be read now ({e})"
    if verification.params_fingerprint != fingerprint:
        return (f"trial {trial.number} was verified under another {verification.budget} or code: run "
                f"`{VERIFY_COMMAND}` again")
    if not verification.verified:
        return f"{verification.line()}, so params.yaml keeps its values"
    return None
