"""MLflow runs a person can tell apart: training runs named after what they were (DVC experiment, profile, key
params), and runs whose process was killed marked KILLED at the next start instead of staying RUNNING for ever."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import mlflow
import pytest

from ddim_denoise.pipeline import tracking

EXPERIMENT = "runs-test"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A local MLflow store as this test's MLFLOW_TRACKING_URI; outside any DVC experiment."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.DVC_EXP_NAME_ENV, raising=False)
    mlflow.set_tracking_uri(uri)  # this process may have pointed MLflow at an earlier test's store
    return uri


def run_left_by_an_ended_process(uri: str) -> str:
    """The id of a run started by another process that then ended without finishing it (as kill -9 leaves one)."""
    code = (f"from ddim_denoise.pipeline.tracking import start_run; "
            f"print(start_run({EXPERIMENT!r}, run_name='ended').run_id)")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    ended = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert ended.returncode == 0, ended.stderr
    run_id = ended.stdout.strip().splitlines()[-1]
    assert status(run_id) == "RUNNING"
    return run_id


def as_left_by_an_ended_process(run_id: str) -> str:
    """Give a run of this process the pid of a child process that has ended (quicker than a child that logs)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    mlflow.MlflowClient().set_tag(run_id, tracking.PID_TAG, str(child.pid))
    return run_id


def status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def killed_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "marked KILLED" in r.getMessage()]


# --- run names --------------------------------------------------------------------------------------------------------
def test_a_training_run_is_named_after_its_dvc_experiment_profile_and_key_params(store, tiny_params, monkeypatch):
    params = tiny_params.model_copy(update={"profile": "quick"})  # the top-level key, where params.yaml has it
    params.train.epochs, params.train.batch_size, params.train.lr = 3, 16, 2e-3
    assert tracking.training_run_name(params) == "quick ch8 e3 b16 lr2e-3"

    monkeypatch.setenv(tracking.DVC_EXP_NAME_ENV, "bushy-vole")  # as `dvc exp run` sets it for its stages
    name = tracking.training_run_name(params)
    assert name == "bushy-vole (quick ch8 e3 b16 lr2e-3)"
    run = tracking.start_run(EXPERIMENT, run_name=name, tags=tracking.training_run_tags(params))
    recorded = mlflow.MlflowClient().get_run(run.run_id)
    assert recorded.info.run_name == name
    assert recorded.data.tags["profile"] == "quick" and recorded.data.tags["dvc_exp_name"] == "bushy-vole"


def test_without_a_profile_or_dvc_experiment_the_name_still_says_the_key_params(store, tiny_params):
    params = tiny_params.model_copy(deep=True)
    params.train.lr = 2.5e-4
    assert tracking.training_run_name(params) == "train ch8 e2 b8 lr2.5e-4"
    assert tracking.training_run_tags(params) == {}


# --- KILLED -----------------------------------------------------------------------------------------------------------
def test_a_run_left_running_by_an_ended_process_is_marked_killed_at_the_next_start(store, caplog):
    orphan = run_left_by_an_ended_process(store)
    with caplog.at_level(logging.INFO, logger=tracking.__name__):
        new = tracking.start_run(EXPERIMENT, run_name="next")
    assert status(orphan) == "KILLED"
    assert status(new.run_id) == "RUNNING"
    assert len(killed_lines(caplog)) == 1 and orphan in killed_lines(caplog)[0]


def test_a_live_process_run_stays_running(store, caplog):
    live = tracking.start_run(EXPERIMENT, run_name="live")  # this test's own process: alive
    with caplog.at_level(logging.INFO, logger=tracking.__name__):
        tracking.start_run(EXPERIMENT, run_name="next")
    assert status(live.run_id) == "RUNNING"
    assert killed_lines(caplog) == []


def test_a_run_whose_pid_now_belongs_to_another_process_is_marked_killed(store):
    if tracking.process_start(os.getpid()) is None:
        pytest.skip("process start times are not readable here (no /proc)")
    # this process's pid, but recorded by a process that started at another time: the pid was reused
    reused = tracking.start_run(EXPERIMENT, run_name="reused", tags={tracking.PROCESS_START_TAG: "another-boot:1"})
    tracking.start_run(EXPERIMENT, run_name="next")
    assert status(reused.run_id) == "KILLED"


def test_runs_of_other_hosts_are_left_alone(store):
    orphan = as_left_by_an_ended_process(tracking.start_run(EXPERIMENT, run_name="elsewhere").run_id)
    mlflow.MlflowClient().set_tag(orphan, tracking.HOST_TAG, "another-host")
    tracking.start_run(EXPERIMENT, run_name="next")
    assert status(orphan) == "RUNNING"


def test_a_resumed_run_is_not_marked_killed_and_finishes(store, caplog):
    orphan = as_left_by_an_ended_process(tracking.start_run(EXPERIMENT, run_name="interrupted").run_id)
    with caplog.at_level(logging.INFO, logger=tracking.__name__):
        resumed = tracking.start_run(EXPERIMENT, run_id=orphan)
        assert resumed.run_id == orphan and status(orphan) == "RUNNING"
        tracking.start_run(EXPERIMENT, run_name="another")  # another process starting while it runs
    assert status(orphan) == "RUNNING"
    assert killed_lines(caplog) == []
    resumed.finish()
    assert status(orphan) == "FINISHED"


def test_a_shared_run_records_no_process_so_none_of_its_processes_ending_marks_it_killed(store):
    """A sweep's parent run: the workers that reopen it come and go while the study runs."""
    parent = tracking.start_run(EXPERIMENT, run_name="sweep:s", shared=True)
    tracking.start_run(EXPERIMENT, run_id=parent.run_id, shared=True)  # another worker joins
    assert tracking.PID_TAG not in mlflow.MlflowClient().get_run(parent.run_id).data.tags
