"""What a sweep leaves behind, rebuilt from the study after every run of ``sweep run``: ``trials.csv``,
``best_params.yaml``, ``summary.json`` (DVC metrics) and ``plots/``; and the command that trains the chosen trial
for real.

Everything is derived from the study in storage, so several workers writing the same folder, or a resumed search,
always end with reports of the whole study.
"""

from __future__ import annotations

import json
import logging
import shlex
import warnings
from pathlib import Path

import yaml

from ddim_denoise.pipeline.checkpoint import atomic_path, atomic_write_text
from ddim_denoise.sweep.storage import WORKER_ATTR, SweepError

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.csv"
BEST_FILE = "best_params.yaml"
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"
SECOND_OBJECTIVE = "train_images_per_s"  # with --multi-objective, maximised beside the validation metric
CONTOUR_PARAMS = 3  # contour plots of the most important parameters only: all pairs of 10 would be unreadable


def state_counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {state.name.lower(): sum(t.state == state for t in trials)
            for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}


def chosen_trial(study, number: int | None = None):
    """Trial ``number``, or the best: the best value, or (multi-objective) the Pareto trial with the best first
    objective. None when no trial completed."""
    from optuna.trial import TrialState

    if number is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not match or match[0].state != TrialState.COMPLETE:
            state = match[0].state.name if match else "absent"
            raise SweepError(f"trial {number} of study {study.study_name!r} is {state}: pick a COMPLETE trial "
                             f"(see {TRIALS_FILE})")
        return match[0]
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])


BASELINE_ATTR = "baseline_params_yaml"  # marks the trial that ran params.yaml's own values
ENQUEUED_ATTR = "enqueued"  # the space file's objective.enqueue entry a trial ran, e.g. "train.lr=0.001"


def format_value(value) -> str:
    """A value as YAML reads it back unchanged (floats in full precision: the trial ran with exactly that)."""
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).splitlines()[0]
    return repr(value) if isinstance(value, float) else str(value)


def format_changes(values: dict) -> str:
    return ", ".join(f"{key}={format_value(value)}" for key, value in values.items())


def dvc_exp_command(values: dict) -> str:
    return "dvc exp run " + " ".join(f"-S {shlex.quote(f'{key}={format_value(v)}')}" for key, v in values.items())


def summary(study, metric: str) -> dict:
    counts = state_counts(study)
    best = chosen_trial(study)
    out = {"study": study.study_name, "metric": metric, "trials": counts}
    if best is not None:
        numbers = {k: v for k, v in best.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out["best"] = {"trial": best.number, "value": best.values[0], **numbers}
        if len(best.values) > 1:
            out["best"][SECOND_OBJECTIVE] = best.values[1]
    baseline = next((t for t in study.get_trials(deepcopy=False)
                     if t.user_attrs.get(BASELINE_ATTR) and t.values), None)
    if baseline is not None:  # params.yaml's own values at the same budget (trial 0 of every study)
        out["baseline"] = {"trial": baseline.number, "value": baseline.values[0]}
        if best is not None:
            out["best_minus_baseline"] = best.values[0] - baseline.values[0]
    return out


def trials_table(study):
    """One row per trial: number, state, value(s), duration, params and numeric/text user attributes."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params", "user_attrs"))
    if frame.empty:
        return frame
    frame = frame.drop(columns=[c for c in frame.columns if c == f"user_attrs_{WORKER_ATTR}"])
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds().round(1)
        frame = frame.rename(columns={"duration": "duration_s"})
    return frame


def best_params_document(study, trial, metric: str) -> dict:
    values = dict(trial.params)
    doc = {"study": study.study_name, "trial": trial.number, "metric": metric, "value": trial.values[0]}
    if len(trial.values) > 1:
        doc[SECOND_OBJECTIVE] = trial.values[1]
    doc.update({"params": values, "command": dvc_exp_command(values),
                "user_attrs": {k: v for k, v in trial.user_attrs.items() if k != WORKER_ATTR}})
    return doc


def write_reports(study, out_dir: Path, metric: str, plots: bool = True) -> tuple[dict, list[Path]]:
    """Write every report into ``out_dir``; return the summary (also written as summary.json) and the files.
    ``plots=False`` skips the plots (seconds of rendering), for the refresh after each trial."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = summary(study, metric)
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / TRIALS_FILE, trials_table(study).to_csv(index=False))
    written = [out_dir / SUMMARY_FILE, out_dir / TRIALS_FILE]
    best = chosen_trial(study)
    if best is not None:
        atomic_write_text(out_dir / BEST_FILE, yaml.safe_dump(best_params_document(study, best, metric),
                                                              sort_keys=False, width=120))
        written.append(out_dir / BEST_FILE)
    return result, written + (save_plots(study, out_dir / PLOTS_DIR, metric) if plots else [])


def save_plots(study, folder: Path, metric: str) -> list[Path]:
    """Optuna's matplotlib plots of the study; each is skipped with a warning when the study cannot support it yet
    (e.g. importances need two completed trials)."""
    import matplotlib
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []  # every plot needs completed trials
    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    folder.mkdir(parents=True, exist_ok=True)
    multi = len(study.directions) > 1
    target = {"target": (lambda t: t.values[0]), "target_name": metric} if multi else {"target_name": metric}
    jobs = {"optimization_history": lambda: plots.plot_optimization_history(study, **target),
            "param_importances": lambda: plots.plot_param_importances(study, **target),
            "slice": lambda: plots.plot_slice(study, **target)}
    if multi:
        jobs["pareto_front"] = lambda: plots.plot_pareto_front(study, target_names=[metric, SECOND_OBJECTIVE])
    else:
        jobs["intermediate_values"] = lambda: plots.plot_intermediate_values(study)
    important = _most_important_params(study, target)
    if len(important) >= 2:
        jobs["contour"] = lambda: plots.plot_contour(study, params=important, **target)
    written = []
    for name, make in jobs.items():
        path = folder / f"{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning, matplotlib layout notes
                figure = _figure_of(make())
                with atomic_path(path) as tmp:
                    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            written.append(path)
        except Exception as e:  # too few trials for this plot, or a parameter it cannot draw
            log.info("sweep plot %s skipped: %s: %s", name, type(e).__name__, e)
        finally:
            import matplotlib.pyplot as plt

            plt.close("all")
    return written


def _most_important_params(study, target: dict) -> list[str]:
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = {"target": target["target"]} if "target" in target else {}
            ranked = optuna.importance.get_param_importances(study, **kwargs)
        return list(ranked)[:CONTOUR_PARAMS]
    except Exception:
        return []


def _figure_of(axes):
    import numpy as np

    first = np.asarray(axes, dtype=object).flat[0]
    return first.figure


def describe(study, trial, metric: str) -> str:
    """Human-readable lines about a chosen trial, for ``sweep best``."""
    counts = state_counts(study)
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {state}" for state, n in counts.items() if n)]
    if trial is None:
        lines.append("no completed trial yet")
        return "\n".join(lines)
    value = f"{metric} {trial.values[0]:.4f}"
    if len(trial.values) > 1:
        value += f", {SECOND_OBJECTIVE} {trial.values[1]:.1f}"
    attrs = trial.user_attrs
    extras = [f"{key} {attrs[key]:.4f}" for key in ("val_ssim_mean", "ddim_psnr_mean") if key in attrs]
    if "ddim_steps" in attrs and "ddim_psnr_mean" in attrs:
        extras[-1] += f" ({attrs['ddim_steps']}-step DDIM)"
    lines.append(f"trial {trial.number}: {value}" + (f" ({', '.join(extras)})" if extras else ""))
    lines += [f"  {key} = {format_value(v)}" for key, v in trial.params.items()]
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda t: -t.values[0])
        lines.append("Pareto front (pick one with --trial N): " + "; ".join(
            f"trial {t.number}: {t.values[0]:.4f}, {t.values[1]:.1f} img/s" for t in front))
    return "\n".join(lines)

