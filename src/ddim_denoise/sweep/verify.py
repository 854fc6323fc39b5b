"""Verification before adoption: a search's winner, found at the search's short per-trial budget, is retrained at
the budget people train at (params.yaml's own) beside params.yaml's defaults at that same budget, both scored per
image on the whole lossless validation split. It counts as verified only when the paired difference (winner minus
defaults, one-step PSNR averaged over ``eval.sigmas``) is above zero by more than its 95% confidence interval. The
result is stored on the study (``VERIFICATION_ATTR``), and ``sweep best --apply`` applies only a verified winner
(``adoption_refusal``). A winner whose training diverges at that budget is not verified whatever it scores: its best
validated weights are scored all the same, so the verdict says how far short it fell.

Each side is trained once, with params.yaml's seed: the interval covers the choice of validation images, not the
spread between training runs, so a verified win smaller than that spread can still be luck.

Both trainings go to ``sweeps/<study>/verify/{defaults,trial_NNNN}/`` and resume when rerun after an interruption.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ddim_denoise.core.metrics import mean_ci95, to_float
from ddim_denoise.data.prepared import load_split
from ddim_denoise.pipeline.checkpoint import atomic_write_text
from ddim_denoise.pipeline.errors import DivergedError
from ddim_denoise.pipeline.params import Params, flatten, validate_params
from ddim_denoise.pipeline.stage_code import code_digest
from ddim_denoise.sweep.objective import per_image_scores
from ddim_denoise.sweep.space import with_overrides
from ddim_denoise.sweep.storage import fingerprint_of

VERIFICATION_ATTR = "verification"  # the study's user attribute holding the last ``Verification``
VERIFY_COMMAND = "ddim-denoise sweep verify"


@dataclass(frozen=True)
class Verification:
    trial: int
    params_fingerprint: str  # the budget and defaults it ran under: ``budget_fingerprint``
    n_images: int
    defaults_psnr: float
    defaults_ci95: float
    winner_psnr: float
    winner_ci95: float
    difference: float  # winner minus defaults, paired per image
    difference_ci95: float
    verified: bool
    winner_diverged: bool = False  # its training stopped as diverged; the scores are its best validated weights'

    def line(self) -> str:
        if self.winner_diverged:
            verdict = "not verified: its training diverged at this budget (lower its train.lr)"
        else:
            verdict = "verified: it wins" if self.verified else "not verified: no win beyond the 95% CI"
        return (f"trial {self.trial} at params.yaml's budget on {self.n_images:,} validation images: "
                f"{self.winner_psnr:.3f} ± {self.winner_ci95:.3f} dB against the defaults' "
                f"{self.defaults_psnr:.3f} ± {self.defaults_ci95:.3f} dB, paired difference "
                f"{self.difference:+.3f} ± {self.difference_ci95:.3f} dB; {verdict}")


def budget_fingerprint(base: Params) -> str:
    """What a verification's result rests on: params.yaml's values (the budget and the defaults) and the code."""
    values = {k: v for k, v in flatten(base).items() if not k.startswith("mlflow.")}
    return fingerprint_of({"params": values, "code": code_digest("sweep")})


def paired_verdict(trial: int, fingerprint: str, defaults: np.ndarray, winner: np.ndarray,
                   winner_diverged: bool = False) -> Verification:
    """The verdict from per-image scores of the same validation images: verified when the paired difference's 95%
    CI lies above zero and the winner trained without diverging."""
    difference, difference_ci = mean_ci95(winner - defaults)
    (defaults_mean, defaults_ci), (winner_mean, winner_ci) = mean_ci95(defaults), mean_ci95(winner)
    wins = bool(difference - difference_ci > 0) and not winner_diverged
    return Verification(trial, fingerprint, len(defaults), defaults_mean, defaults_ci, winner_mean, winner_ci,
                        difference, difference_ci, wins, winner_diverged)


def train_and_score(base: Params, values: dict, folder: Path, run_name: str, run_tags: dict[str, str],
                    diverging_allowed: bool = False) -> tuple[np.ndarray, bool]:
    """Train params.yaml + ``values`` into ``folder`` (resuming a run left there) and score its best checkpoint per
    image on the whole validation split; with ``diverging_allowed`` a diverged training is scored too (the flag
    says so) when it validated at least once."""
    from ddim_denoise.training.build import build_trainer

    params = validate_params(with_overrides(base, {**values, "train.out_dir": str(folder / "models"),
                                                   "train.resume": "auto"}), source="verification params")
    best = folder / "models" / "best.pt"
    try:
        build_trainer(params, run_name=run_name, run_tags=run_tags, training_dir=folder / "training").fit()
        diverged = False
    except DivergedError:
        if not (diverging_allowed and best.is_file()):
            raise
        diverged = True
    clean = to_float(load_split(params.data.prepared_dir, "val")[0])
    return per_image_scores(best, clean, params, steps=1)[0], diverged


def verify_trial(study, trial, base: Params, folder: Path, out: Path | None = None) -> Verification:
    """Retrain ``trial``'s values and params.yaml's defaults at params.yaml's budget, compare them, and store the
    verdict on the study (and as JSON in ``out``, a DVC metric). The defaults diverging is an error: params.yaml
    itself does not train."""
    tags = {"sweep.study": study.study_name, "sweep.verify": str(trial.number)}
    defaults, _ = train_and_score(base, {}, folder / "defaults", "verify-defaults", tags)
    winner, diverged = train_and_score(base, trial.params, folder / f"trial_{trial.number:04d}",
                                       f"verify-trial-{trial.number}", tags, diverging_allowed=True)
    verification = paired_verdict(trial.number, budget_fingerprint(base), defaults, winner, diverged)
    study.set_user_attr(VERIFICATION_ATTR, asdict(verification))
    if out is not None:
        atomic_write_text(out, json.dumps(asdict(verification), indent=2) + "\n")
    return verification


def adoption_refusal(study, trial, base: Params) -> str | None:
    """Why ``trial`` may not be written into params.yaml (one line), or None when a verification under this
    params.yaml found it better than the defaults."""
    recorded = study.user_attrs.get(VERIFICATION_ATTR)
    if not recorded or recorded.get("trial") != trial.number:
        return (f"trial {trial.number} is not verified: run `{VERIFY_COMMAND}`, which retrains it and the defaults at "
                "params.yaml's budget, and apply it only if it wins there")
    try:
        verification = Verification(**recorded)
    except TypeError:  # recorded by another version of this code
        return f"trial {trial.number}'s verification is in an older form: run `{VERIFY_COMMAND}` again"
    if verification.params_fingerprint != budget_fingerprint(base):
        return (f"trial {trial.number} was verified under another params.yaml or code: run `{VERIFY_COMMAND}` "
                "again")
    if not verification.verified:
        return f"{verification.line()}, so params.yaml keeps its values"
    return None
