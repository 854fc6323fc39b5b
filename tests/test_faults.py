"""Faults during training: kill -9, half-written or truncated checkpoints, unwritable or full disks, a tracking
server that is down or goes down, and an interrupted `dvc repro`. Each must end in a resumable state or one clear
line (exit code 2), never in a lost epoch or a corrupt checkpoint."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
from cli_workspace import (
    TRAIN_IMAGES,
    cli,
    free_port,
    make_workspace,
    one_error_line,
    process_env,
    run,
    summary,
    with_train,
)
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.pipeline import tracking
from ddim_denoise.pipeline.checkpoint import load_checkpoint
from ddim_denoise.pipeline.errors import TrainingError
from ddim_denoise.pipeline.unsent_metrics import UnsentMetrics, unsent_metrics_file
from ddim_denoise.training.build import build_trainer

BATCH, EPOCHS = 8, 12
STEPS = EPOCHS * (TRAIN_IMAGES // BATCH)
FIRST_CHECKPOINT_TIMEOUT_S = 120
POLL_S = 0.01


@pytest.fixture
def workspace(tmp_path, tiny_params, monkeypatch):
    """A project folder (this test's working folder) with a local MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = make_workspace(tmp_path, tiny_params, {"train.epochs": EPOCHS, "train.batch_size": BATCH})
    return tmp_path, params


# --- kill -9 ---------------------------------------------------------------------------------------------------------
def start_and_kill_after_first_checkpoint(root: Path, env: dict) -> int:
    """Start `ddim-denoise train`, SIGKILL it the moment models/last.pt appears; return the epoch that file holds."""
    last = root / "models" / "last.pt"
    process = subprocess.Popen(cli("train"), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + FIRST_CHECKPOINT_TIMEOUT_S
        while not last.exists():
            assert process.poll() is None, "training ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(POLL_S)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    return load_checkpoint(last)["epoch"]


def test_kill_9_then_rerun_resumes_and_ends_like_an_uninterrupted_run(workspace):
    root, params = workspace
    env = process_env(os.environ["MLFLOW_TRACKING_URI"])
    straight = run(cli("train", "-S", "train.out_dir=straight"), root, env)
    assert straight.returncode == 0, straight.stderr

    killed_at_epoch = start_and_kill_after_first_checkpoint(root, env)
    assert 1 <= killed_at_epoch < EPOCHS, "the kill came too late to interrupt anything"
    killed_run_id = load_checkpoint(root / "models" / "last.pt")["mlflow_run_id"]
    # As if the kill had also hit a checkpoint write: its temporary file is left beside the real ones.
    stray = root / "models" / ".last.pt.k1ll3d.pt.tmp"
    stray.write_bytes(b"PK\x03\x04 half a zip")

    rerun = run(cli("train"), root, env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from models/last.pt at epoch {killed_at_epoch}" in rerun.stderr
    assert not stray.exists()
    resumed, reference = load_checkpoint(root / "models" / "last.pt"), load_checkpoint(root / "straight" / "last.pt")
    assert resumed["step"] == reference["step"] == summary(root)["steps"] == STEPS
    logged = [int(step) for step, *_ in resumed["history"]["steps"]]
    assert logged == list(range(1, STEPS + 1))  # the finished epochs kept, the rest redone once
    for key in reference["model"]:  # per-epoch seeding: the resumed run is the uninterrupted one, bit for bit
        assert torch.equal(resumed["model"][key], reference["model"][key]), key
    assert resumed["mlflow_run_id"] == killed_run_id  # and it went on logging into the same MLflow run
    run_info = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(killed_run_id).info
    assert run_info.status == "FINISHED"
    assert "marked KILLED" not in rerun.stderr  # resumed, so never taken for the killed process's run


def test_truncated_last_checkpoint_is_one_clear_line(workspace):
    root, params = workspace
    assert CliRunner().invoke(app, ["train", "-S", "train.epochs=1"]).exit_code == 0
    last = root / "models" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    line = one_error_line(CliRunner().invoke(app, ["train", "-S", "train.epochs=1"]))
    assert "models/last.pt" in line and "delete it or set train.resume=never" in line
    restarted = CliRunner().invoke(app, ["train", "-S", "train.epochs=1", "-S", "train.resume=never"])
    assert restarted.exit_code == 0, restarted.output
    assert load_checkpoint(last)["epoch"] == 1


# --- unwritable and full disks ---------------------------------------------------------------------------------------
def test_output_under_a_file_is_refused_before_any_work(workspace):
    root, params = workspace
    (root / "blocker").write_text("a file where a folder should be")
    line = one_error_line(CliRunner().invoke(app, ["train", "-S", "train.out_dir=blocker/models"]))
    assert "cannot write to blocker/models/" in line and "train.out_dir" in line
    assert not (root / "training").exists()  # nothing trained, nothing written


@pytest.fixture
def read_only_models(workspace):
    """models/ that takes no file: a read-only tmpfs where one can be mounted (root, whom folder permissions do not
    stop, as on CI), else a folder without write permission."""
    models = workspace[0] / "models"
    models.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(models)], capture_output=True,
                             text=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions, and no read-only tmpfs can be mounted here")
        models.chmod(0o555)
    yield models
    if mounted:
        subprocess.run(["umount", "-l", str(models)], check=True)


def test_read_only_output_folder_is_refused_before_any_work(workspace, read_only_models):
    line = one_error_line(CliRunner().invoke(app, ["train"]))
    assert "cannot write to models/" in line and ("Permission denied" in line or "Read-only file system" in line)
    assert not (workspace[0] / "training").exists()


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(workspace, monkeypatch):
    root, params = workspace
    save = torch.save

    def full_after_epoch_1(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch", 0) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_epoch_1)
    line = one_error_line(CliRunner().invoke(app, ["train"]), logs_allowed=True)
    assert "No space left on device" in line and "epoch 2" in line and "intact" in line
    assert load_checkpoint(root / "models" / "last.pt")["epoch"] == 1
    assert not list((root / "models").glob(".*.tmp"))


def test_a_lost_best_checkpoint_write_is_redone_by_the_rerun(workspace, monkeypatch):
    """The disk fills while best.pt is written: last.pt must still be the previous epoch's, so that the rerun
    redoes the epoch and writes the best.pt its summary names (else evaluate would score an older model)."""
    root, params = workspace
    save = torch.save
    failed = []

    def full_while_writing_the_epoch_2_best(obj, path, *args, **kwargs):
        if Path(path).name.startswith(".best.pt.") and obj.get("epoch") == 2 and not failed:
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_while_writing_the_epoch_2_best)
    first = build_trainer(with_train(params, epochs=2, checkpoint_every=5))  # epoch 2 writes best.pt and last.pt only
    with pytest.raises(TrainingError, match="could not write the epoch 2 checkpoint.*intact"):
        first.fit()
    assert failed and first.best_epoch == 2  # epoch 2 was a new best, and its write failed
    assert load_checkpoint(root / "models" / "last.pt")["epoch"] == 1
    summary = build_trainer(with_train(params, epochs=2, checkpoint_every=5)).fit()
    assert load_checkpoint(root / "models" / "best.pt")["epoch"] == summary["best_epoch"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root only), so the disk can really fill up."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}); the monkeypatched disk-full "
                    "test covers the error path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_really_full_disk_keeps_the_previous_checkpoint(workspace, small_disk):
    root, params = workspace

    def fill_the_disk(epoch, metrics):
        if epoch == 1:
            with open(small_disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError as e:
                    assert e.errno == errno.ENOSPC

    trainer = build_trainer(with_train(params, out_dir=str(small_disk / "models")), on_epoch_end=fill_the_disk)
    with pytest.raises(TrainingError, match="could not write the epoch 2 checkpoint.*intact"):
        trainer.fit()
    assert load_checkpoint(small_disk / "models" / "last.pt")["epoch"] == 1
    assert not list((small_disk / "models").glob(".*.tmp"))


# --- the tracking server ---------------------------------------------------------------------------------------------
def test_tracking_server_down_at_start_training_completes_untracked(workspace, monkeypatch, caplog):
    root, params = workspace
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    # MLflow's client retries a refused connection 7 times with backoff (~4 minutes) by default; one try is enough
    # to show what training does about it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with caplog.at_level(logging.WARNING):
        result = build_trainer(with_train(params, epochs=2)).fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("MLflow tracking unavailable" in w for w in warnings) == 1, warnings
    assert result["epochs"] == 2 and result["mlflow_run_id"] is None
    assert summary(root)["mlflow_run_id"] is None and load_checkpoint(root / "models" / "last.pt")["epoch"] == 2
    assert len((root / "training" / "steps.csv").read_text().splitlines()) == 1 + 2 * (TRAIN_IMAGES // BATCH)


@pytest.mark.parametrize("comes_back", [True, False], ids=["outage", "gone_for_good"])
def test_tracking_server_down_mid_run_buffers_and_replays(workspace, monkeypatch, caplog, comes_back):
    root, params = workspace
    log_batch = mlflow.MlflowClient.log_batch
    outage = {"on": False}

    def flaky_log_batch(self, *args, **kwargs):
        if outage["on"]:
            raise mlflow.exceptions.MlflowException("connection refused (simulated outage)")
        return log_batch(self, *args, **kwargs)

    def outage_during_epochs_2_and_3(epoch, metrics):
        if epoch == 1:
            outage["on"] = True
        elif epoch == 3 and comes_back:
            outage["on"] = False

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky_log_batch)
    with caplog.at_level(logging.WARNING):
        result = build_trainer(with_train(params, epochs=4), on_epoch_end=outage_during_epochs_2_and_3).fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("MLflow tracking failed" in w for w in warnings) == 1, warnings  # warned once, not per call
    assert result["epochs"] == 4 and summary(root)["steps"] == result["steps"]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    losses = client.get_metric_history(result["mlflow_run_id"], "train_loss")
    if comes_back:  # the buffered points were replayed: nothing lost, the run closed normally
        assert any("buffered entries were sent" in w for w in warnings)
        assert sorted(m.step for m in losses) == list(range(1, result["steps"] + 1))
        assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
        assert not list((root / "models").glob("mlflow_unsent_*"))
    else:  # MLflow holds what came before the outage; training/ still holds every point, models/ the unsent ones
        assert sorted(m.step for m in losses) == list(range(1, TRAIN_IMAGES // BATCH + 1))
        assert len((root / "training" / "steps.csv").read_text().splitlines()) == 1 + result["steps"]
        unsent = UnsentMetrics(unsent_metrics_file(root / "models", result["mlflow_run_id"])).read()
        assert sorted(m.step for m in unsent if m.key == "train_loss") == list(
            range(TRAIN_IMAGES // BATCH + 1, result["steps"] + 1))


def test_metrics_kept_on_disk_during_an_outage_reach_the_run_after_a_restart(workspace, monkeypatch, caplog):
    """The process that buffered them ends (a crash, a kill) before the server is back: the next process logging to
    the same run (a resumed training reopens it) sends them, with their steps, and removes the file."""
    root, _ = workspace
    folder = root / "models"
    outage = {"on": False}
    log_batch = mlflow.MlflowClient.log_batch

    def flaky_log_batch(self, *args, **kwargs):
        if outage["on"]:
            raise mlflow.exceptions.MlflowException("connection refused (simulated outage)")
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky_log_batch)
    first = tracking.start_run("outage", run_name="interrupted", unsent_dir=folder)
    first.log_metrics({"train_loss": 1.0}, step=1)
    outage["on"] = True
    for step in range(2, 6):
        first.log_metrics({"train_loss": 1.0 / step, "lr": 0.1}, step=step)
    unsent = unsent_metrics_file(folder, first.run_id)
    assert len(unsent.read_text().splitlines()) == 8
    with unsent.open("a") as f:
        f.write('{"key": "train_loss", "val')  # a crash in the middle of a line
    del first  # the process ends with the server still down

    outage["on"] = False
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(unsent.stem.removeprefix("mlflow_unsent_"), "train_loss")] == [1]
    with caplog.at_level(logging.INFO, logger=tracking.__name__):
        resumed = tracking.start_run("outage", run_id=unsent.stem.removeprefix("mlflow_unsent_"), unsent_dir=folder)
    assert sorted((m.step, m.value) for m in client.get_metric_history(resumed.run_id, "train_loss")) == [
        (step, 1.0 / step) for step in range(1, 6)]
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "lr")) == [2, 3, 4, 5]
    assert not unsent.exists() and "sent 8 metric points" in caplog.text


def test_a_restart_during_an_outage_keeps_its_run_and_its_points_reach_mlflow_once_it_is_back(workspace, monkeypatch,
                                                                                               caplog):
    """The usual order: MLflow goes down, training crashes, and the automatic restart comes while MLflow is still
    down. The restart stays the same MLflow run (its last.pt names it, for the next resume) and keeps its metric
    points on disk until MLflow is back."""
    root, params = workspace
    store = os.environ["MLFLOW_TRACKING_URI"]

    def crash_after_epoch_1(epoch, metrics):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        build_trainer(with_train(params, epochs=3), on_epoch_end=crash_after_epoch_1).fit()
    run_id = load_checkpoint(root / "models" / "last.pt")["mlflow_run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    during_outage = {}

    def back_after_epoch_2(epoch, metrics):
        if epoch == 2:
            during_outage["run in last.pt"] = load_checkpoint(root / "models" / "last.pt")["mlflow_run_id"]
            during_outage["points kept"] = len(UnsentMetrics(unsent_metrics_file(root / "models", run_id)).read())
            mlflow.set_tracking_uri(store)  # MLflow is back: the run's next call reaches it

    with caplog.at_level(logging.WARNING):
        result = build_trainer(with_train(params, epochs=3), on_epoch_end=back_after_epoch_2).fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert result["mlflow_run_id"] == during_outage["run in last.pt"] == run_id
    assert during_outage["points kept"] > TRAIN_IMAGES // BATCH  # epoch 2's loss and lr points
    assert not any("new run" in w for w in warnings) and any("tracking is back" in w for w in warnings), warnings
    client = mlflow.MlflowClient(store)
    losses = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(1, result["steps"] + 1))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not list((root / "models").glob("mlflow_unsent_*"))


def test_points_kept_for_other_runs_are_sent_to_them_at_start_or_removed_when_their_run_is_gone(workspace, caplog):
    """A run that ended during an outage and was never resumed (a new run took over its out_dir) left its points
    there: the next run to start there sends them to it."""
    from mlflow.entities import Metric

    folder = workspace[0] / "models"
    earlier = tracking.start_run("orphans", run_name="earlier").run_id
    deleted = tracking.start_run("orphans", run_name="deleted").run_id
    client = mlflow.MlflowClient()
    client.delete_run(deleted)
    never_there = "0" * 32
    for run_id in (earlier, deleted, never_there):
        UnsentMetrics(unsent_metrics_file(folder, run_id)).append([Metric("train_loss", 0.5, 1000, 7)])
    with caplog.at_level(logging.INFO, logger=tracking.__name__):
        new = tracking.start_run("orphans", run_name="new", unsent_dir=folder).run_id
    assert [(m.step, m.value) for m in client.get_metric_history(earlier, "train_loss")] == [(7, 0.5)]
    assert client.get_metric_history(new, "train_loss") == []
    assert not list(folder.glob("mlflow_unsent_*"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("does not hold" in w for w in warnings), warnings
    assert any(deleted in w for w in warnings) and any(never_there in w for w in warnings)


def test_the_unsent_metrics_file_is_capped_dropping_the_oldest_with_one_warning(tmp_path, caplog):
    from mlflow.entities import Metric

    unsent = UnsentMetrics(tmp_path / "unsent.jsonl", max_lines=10)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 31):
            unsent.append([Metric("train_loss", float(step), 0, step)])
    steps = [m.step for m in unsent.read()]
    # the newest, in order: a full file is cut to hold 90% of the cap (9 points) with the new one, so 9 or 10 remain
    assert 9 <= len(steps) <= 10 and steps == list(range(31 - len(steps), 31))
    assert sum("holds its cap of 10 metric points" in r.getMessage() for r in caplog.records) == 1


class RecordingClient:
    """Takes ``log_batch`` calls like an MlflowClient, refusing as invalid any batch with a point named ``bad``."""

    def __init__(self):
        self.logged = []

    def log_batch(self, run_id, metrics):
        if any(m.key == "bad" for m in metrics):
            raise mlflow.exceptions.MlflowException("Invalid metric (simulated)", error_code=INVALID_PARAMETER_VALUE)
        self.logged += [(run_id, m.key, m.step) for m in metrics]


def test_kept_points_are_sent_once_even_where_the_file_cannot_be_removed(tmp_path, monkeypatch):
    from mlflow.entities import Metric

    unsent = UnsentMetrics(tmp_path / "unsent.jsonl")
    unsent.append([Metric("train_loss", 0.5, 0, step) for step in (1, 2)])
    unlink = Path.unlink

    def refuse_to_remove(path, missing_ok=False):
        if path == unsent.path:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_to_remove)
    client = RecordingClient()
    assert unsent.send(client, "run") == 2 and unsent.send(client, "run") == 0
    assert client.logged == [("run", "train_loss", 1), ("run", "train_loss", 2)] and unsent.read() == []


def test_a_batch_the_server_refuses_as_invalid_is_dropped_with_one_warning(tmp_path, monkeypatch, caplog):
    """Sent again, it would be refused again: kept, it would hold back every point after it forever."""
    from mlflow.entities import Metric

    from ddim_denoise.pipeline import unsent_metrics

    monkeypatch.setattr(unsent_metrics, "BATCH_SIZE", 2)
    unsent = UnsentMetrics(tmp_path / "unsent.jsonl")
    unsent.append([Metric(key, 0.5, 0, step) for step, key in enumerate(["a", "b", "bad", "c", "d"], start=1)])
    client = RecordingClient()
    with caplog.at_level(logging.WARNING):
        assert unsent.send(client, "run") == 3
    assert client.logged == [("run", "a", 1), ("run", "b", 2), ("run", "d", 5)] and not unsent.path.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "refused 2 metric points" in warnings[0], warnings


def test_an_artifact_the_server_always_refuses_holds_back_no_metric(workspace, monkeypatch, caplog):
    """A proxy that refuses large uploads (HTTP 413) fails every checkpoint upload: the metrics logged after one
    must still arrive, the run must close normally, and the refused file stays on disk."""
    root, params = workspace

    def refuse(self, run_id, local_path, artifact_path=None):
        raise mlflow.exceptions.MlflowException("413 Request Entity Too Large (simulated proxy)")

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", refuse)
    with caplog.at_level(logging.WARNING):
        result = build_trainer(with_train(params, epochs=3, checkpoint_every=1)).fit()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("epoch_0001.pt" in w and "stays on disk" in w for w in warnings), warnings
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    losses = client.get_metric_history(result["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in losses) == list(range(1, result["steps"] + 1))
    assert client.get_run(result["mlflow_run_id"]).info.status == "FINISHED"
    assert (root / "models" / "epoch_0001.pt").is_file()


def test_a_resume_whose_mlflow_run_is_gone_logs_to_a_new_run(workspace, monkeypatch, caplog):
    """last.pt names an MLflow run that this tracking store does not hold (the run was purged, or the checkpoint came
    from another machine's store): the resumed run is tracked in a new MLflow run, with its params."""
    root, params = workspace

    def crash_after_epoch_1(epoch, metrics):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        build_trainer(with_train(params, epochs=2), on_epoch_end=crash_after_epoch_1).fit()
    old_run = load_checkpoint(root / "models" / "last.pt")["mlflow_run_id"]
    other_store = f"sqlite:///{root / 'other-mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other_store)
    with caplog.at_level(logging.WARNING):
        result = build_trainer(with_train(params, epochs=2)).fit()
    assert result["epochs"] == 2 and result["mlflow_run_id"] not in (None, old_run)
    assert any(old_run in r.getMessage() and "new run" in r.getMessage() for r in caplog.records)
    new_run = mlflow.MlflowClient(other_store).get_run(result["mlflow_run_id"])
    assert new_run.data.params["train.epochs"] == "2" and new_run.info.status == "FINISHED"


def test_tracking_fails_fast_unless_the_user_set_the_http_retries(workspace, monkeypatch):
    """A dead tracking server must cost training seconds, not MLflow's minutes of retries; a user's value wins."""
    from ddim_denoise.pipeline import tracking

    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)  # configure's one global change, not needed
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    for name in names:
        monkeypatch.setenv(name, "placeholder")  # so that the teardown also removes what configure sets
        monkeypatch.delenv(name)
    tracking.configure("fail-fast")
    assert [os.environ.get(name) for name in names] == ["1", "10"]
    monkeypatch.setenv(names[0], "5")
    monkeypatch.setenv(names[1], "120")
    tracking.configure("fail-fast")
    assert [os.environ[name] for name in names] == ["5", "120"]


# --- an interrupted dvc repro ----------------------------------------------------------------------------------------
DVC_PIPELINE = """\
stages:
  first:
    cmd: python -c "open('first.runs', 'a').write('ran\\n'); open('first.out', 'w').write('done')"
    outs:
      - first.out
  second:
    cmd: python second.py
    deps:
      - first.out
    outs:
      - progress:
          persist: true
"""
# The second stage records progress in its persisted output (as training does in models/), then fails once.
SECOND_STAGE = """\
from pathlib import Path

attempt = "attempt 2" if Path("crashed_once").exists() else "attempt 1"
progress = Path("progress")
progress.mkdir(exist_ok=True)
for part in ("part1", "part2"):
    if not (progress / part).exists():
        (progress / part).write_text(attempt)
        if attempt == "attempt 1":
            Path("crashed_once").write_text("")
            raise SystemExit("simulated crash")
"""


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("dvc") or "dvc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_interrupted_dvc_repro_continues_from_the_stage_that_failed(tmp_path):
    assert dvc("init", "--no-scm", cwd=tmp_path).returncode == 0
    (tmp_path / "dvc.yaml").write_text(DVC_PIPELINE)
    (tmp_path / "second.py").write_text(SECOND_STAGE)

    failed = dvc("repro", cwd=tmp_path)
    assert failed.returncode != 0 and "simulated crash" in failed.stdout + failed.stderr
    status = dvc("status", cwd=tmp_path).stdout
    assert "second:" in status and "first:" not in status  # the finished stage is recorded as up to date

    rerun = dvc("repro", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "'first' didn't change, skipping" in rerun.stdout
    assert (tmp_path / "first.runs").read_text() == "ran\n"  # the first stage ran once in all
    progress = {p.name: p.read_text() for p in (tmp_path / "progress").iterdir()}
    assert progress == {"part1": "attempt 1", "part2": "attempt 2"}  # the failed attempt's work kept, not redone
    assert "up to date" in dvc("status", cwd=tmp_path).stdout
