"""A sweep's MLflow records: one parent run per study, each trial a nested run tagged with its outcome.

The Trainer creates and fills each trial's run (params, per-epoch validation metrics, status); this module adds
what only the sweep knows: the parent run (reused when the study resumes, its id kept in the study's user
attributes), the outcome tags (``state`` = COMPLETE / PRUNED / FAIL, ``error``), the objective value, and the
study's reports as the parent's artifacts. Like ``tracking``, nothing here ever stops a search when MLflow fails.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ddim_denoise.pipeline import tracking
from ddim_denoise.sweep.storage import FAIL_REASON_ATTR, wait_for_attr

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ID_ATTR = "mlflow_run_id"
STUDY_TAG = "sweep.study"
TRIAL_TAG = "sweep.trial"
STATE_TAG = "state"


def parent_run_name(study_name: str) -> str:
    return f"sweep:{study_name}"


def open_parent_run(study, experiment: str, created: bool, storage_label: str) -> tracking.SafeRun:
    """The study's parent run: reopened when recorded, else created by the study's creator (other workers wait for
    it, so simultaneous workers nest their trials under the same parent). Shared: no worker's end marks it KILLED."""
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id is None and not created:
        run_id = wait_for_attr(study, PARENT_RUN_ATTR)
    if run_id is not None:
        run = tracking.start_run(experiment, run_id=run_id, shared=True)
        if run.run_id is not None:
            return run
        log.warning("the study's parent run %s is not in this MLflow store: starting a new one", run_id)
    run = tracking.start_run(experiment, run_name=parent_run_name(study.study_name),
                             tags={STUDY_TAG: study.study_name, "sweep.storage": storage_label}, shared=True)
    if run.run_id is not None:
        study.set_user_attr(PARENT_RUN_ATTR, run.run_id)
    return run


def trial_run_tags(parent_run_id: str | None, study_name: str, number: int) -> dict[str, str]:
    tags = {STUDY_TAG: study_name, TRIAL_TAG: str(number)}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return tags


def record_outcome(run_id: str | None, state: str, *, metrics: dict[str, float] | None = None,
                   tags: dict[str, str] | None = None, status: str | None = None) -> None:
    """Tag a trial's run with its Optuna state, add final metrics, and optionally set its MLflow status."""
    if run_id is None:
        return
    run = tracking.SafeRun(run_id)
    run.set_tags({STATE_TAG: state, **(tags or {})})
    if metrics:
        run.log_metrics(metrics)
    if status:
        run.finish(status)


def record_failure_without_run(experiment: str, parent_run_id: str | None, study_name: str, number: int,
                               sampled: dict, reason: str) -> str | None:
    """A trial that failed before the Trainer opened its run (invalid params, a bad combination) still gets a
    nested run, so MLflow shows every trial of the study and why it failed."""
    run = tracking.start_run(experiment, run_name=f"trial-{number}",
                             tags=trial_run_tags(parent_run_id, study_name, number))
    run.log_params(sampled)
    record_outcome(run.run_id, "FAIL", tags={"error": reason}, status="FAILED")
    return run.run_id


def find_trial_run(parent_run_id: str, number: int) -> str | None:
    """The nested run of trial ``number`` (found by tags: a killed worker may never have recorded its id)."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                  f"and tags.`{TRIAL_TAG}` = '{number}'", max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception as e:
        log.warning("MLflow: cannot look up trial %d's run (%s: %s)", number, type(e).__name__, e)
        return None


def record_dead_trial(study, trial) -> None:
    """Callback for trials failed because their worker died (heartbeat or dead process): fail their run too."""
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    run_id = trial.user_attrs.get(RUN_ID_ATTR) or (find_trial_run(parent, trial.number) if parent else None)
    reason = trial.user_attrs.get(FAIL_REASON_ATTR) or "its worker stopped sending heartbeats"
    record_outcome(run_id, "FAIL", tags={"error": reason}, status="FAILED")


def log_study_outputs(run: tracking.SafeRun, files: list[Path], metrics: dict[str, float], step: int) -> None:
    """The sweep's reports (trials.csv, best_params.yaml, summary.json, plots) as the parent run's artifacts, and
    its summary metrics at ``step`` (the number of finished trials, so resumed runs extend the curves)."""
    run.log_metrics(metrics, step=step)
    for path in files:
        run.log_artifact(path, path.parent.name if path.suffix == ".png" else None)
