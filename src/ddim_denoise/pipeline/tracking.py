"""MLflow tracking: where runs go, and logging that never kills training when the tracking server blinks.

Default store: SQLite backend ``mlruns/mlflow.db`` and artifacts under ``mlruns/artifacts``, both in the project
root. MLflow 3.x treats a bare ``./mlruns`` folder as a deprecated file store, so the URI is always set explicitly.
``MLFLOW_TRACKING_URI`` overrides it (a remote ``mlflow server``, for example).

``dvc exp run --temp`` and ``--queue`` execute in a copy of the repo under ``<root>/.dvc/tmp/exps/``; runs from
there must land in the workspace's store, not in the throw-away copy, so the project root is found above it.

Runs a person can tell apart: a training run is named after what it was (``training_run_name``: the DVC experiment,
the params profile, the key params) and tagged ``profile`` / ``dvc_exp_name``. A run records the ``host``, ``pid``
and ``process_start`` of the process writing to it; a process killed outside Python (kill -9, the OOM killer,
a power cut) never ends its run, so each ``start_run`` marks this host's RUNNING runs whose process has ended as KILLED.
A run reopened to resume takes the reopening process's identity first, so it is never one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

from ddim_denoise.pipeline.unsent_metrics import UnsentMetrics, unsent_metrics_file, unsent_metrics_files

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"

# `dvc exp run` sets this for every stage command of an experiment (dvc/env.py, the experiment queue's run_env).
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
PROFILE_TAG = "profile"
DVC_EXP_NAME_TAG = "dvc_exp_name"
HOST_TAG = "host"
PID_TAG = "pid"
PROCESS_START_TAG = "process_start"


def project_root(start: Path | None = None) -> Path:
    """The workspace root: the folder holding dvc.yaml/params.yaml, skipping DVC's temporary experiment copies."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".dvc").is_dir():
            return candidate
    return here


def default_tracking_uri(root: Path | None = None) -> str:
    root = root or project_root()
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlruns' / DB_NAME}"


def artifact_location(root: Path | None = None) -> str:
    return ((root or project_root()) / "mlruns" / "artifacts").as_uri()


def configure(experiment: str) -> str:
    """Point MLflow at the project's store (or $MLFLOW_TRACKING_URI) and select the experiment; return the URI."""
    import mlflow

    # MLflow's HTTP client retries a dead server 7 times with backoff (minutes); training only needs to know fast.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        local_store = uri.startswith("sqlite:") or uri.startswith("file:")
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location() if local_store else None)
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel worker
            pass
    mlflow.set_experiment(experiment)
    return uri


def dvc_experiment_name() -> str | None:
    """The experiment's name when this process runs under ``dvc exp run``; None otherwise."""
    return os.environ.get(DVC_EXP_NAME_ENV) or None


def short_number(value: float) -> str:
    """2e-3, 8e-4, 2.5e-4: a learning rate in as few characters as it takes (three significant digits at most)."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def training_run_name(params) -> str:
    """What a training run was, in a line the MLflow UI shows: ``quick ch32 e3 b16 lr2e-3`` (profile, then
    model.base_channels, train.epochs, train.batch_size, train.lr); under ``dvc exp run`` the experiment's name
    first: ``bushy-vole (quick ch32 e3 b16 lr2e-3)``. Without a profile the key params follow ``train``."""
    key_params = (f"ch{params.model.base_channels} e{params.train.epochs} b{params.train.batch_size} "
                  f"lr{short_number(params.train.lr)}")
    profile = params.profile
    described = f"{profile} {key_params}" if profile else key_params
    experiment = dvc_experiment_name()
    if experiment:
        return f"{experiment} ({described})"
    return described if profile else f"train {key_params}"


def training_run_tags(params) -> dict[str, str]:
    """Tags that say which recipe a training run followed (the DVC experiment name is added by ``start_run``)."""
    return {PROFILE_TAG: params.profile} if params.profile else {}


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may itself hold spaces and parentheses):
    [0] is the state (field 3), [19] the start time (field 22); None where it cannot be read (not Linux, no pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """``<boot id>:<start time in clock ticks since boot>`` of process ``pid`` (Linux), or None where that cannot
    be read. A pid is reused once its process ends; this pair is not, so it tells a new process from the old one."""
    fields = _stat_fields(pid)
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return f"{boot_id}:{fields[19]}" if fields is not None and len(fields) > 19 else None


def process_tags() -> dict[str, str]:
    """Who writes to a run: this host, pid and (where known) process start."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    started = process_start(os.getpid())
    if started:
        tags[PROCESS_START_TAG] = started
    return tags


def process_alive(pid: int, recorded_start: str | None) -> bool:
    """Whether the process that recorded ``pid`` (and ``recorded_start``, when known) still runs on this host."""
    if os.name == "nt":  # os.kill terminates a process there whatever the signal: cannot ask safely
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _stat_fields(pid)
    if fields and fields[0] == "Z":  # exited, waiting for its parent to collect it
        return False
    if recorded_start is not None:
        current = process_start(pid)
        if current is not None and current != recorded_start:  # the pid now belongs to another process
            return False
    return True


def mark_killed_runs(client, experiment_id: str) -> list[str]:
    """Set status KILLED on this host's RUNNING runs of the experiment whose process has ended; return their ids.
    Runs of other hosts, and runs without a pid tag, are left as they are: from here nobody can tell."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' "
                              f"and tags.`{HOST_TAG}` = '{host}'")
    killed = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if process_alive(pid, tags.get(PROCESS_START_TAG)):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        log.info("MLflow run %s (%s) was left RUNNING by process %d, which has ended: marked KILLED",
                 run.info.run_name, run.info.run_id, pid)
        killed.append(run.info.run_id)
    return killed


class SafeRun:
    """Logs to one MLflow run; if the tracking store fails, warns once and keeps training.

    Failed calls are kept in a local buffer and replayed on the next successful call, so a short outage loses no
    metric points. Given ``unsent_dir`` (training passes ``train.out_dir``), the metric points of failed calls are
    kept on disk there instead (``unsent_metrics``), so they outlive the process: a later SafeRun of the same run
    (a resumed training's) sends them. Artifacts are sent once, not buffered: a file the server always refuses (one
    too large for a proxy) would otherwise hold back every metric behind it, and the file stays on disk anyway.
    ``run_id`` is None when tracking could not start at all, or the run to reopen is gone (``start_run``).
    """

    def __init__(self, run_id: str | None, unsent_dir: str | Path | None = None):
        self.run_id = run_id
        self._pending: list[tuple[str, tuple, dict]] = []
        self._unsent = (UnsentMetrics(unsent_metrics_file(unsent_dir, run_id))
                        if run_id is not None and unsent_dir is not None else None)
        self._warned = False

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.run_id is None:
            return
        self._pending.append((method, args, kwargs))
        self.send_buffered()

    def send_buffered(self) -> None:
        """Send what earlier calls could not: the points kept on disk (by this process or an earlier one), then the
        calls kept in memory, in order."""
        if self.run_id is None:
            return
        from mlflow import MlflowClient

        client = MlflowClient()
        try:
            if self._unsent is not None and (sent := self._unsent.send(client, self.run_id)):
                log.info("sent %d metric points kept in %s while MLflow was unreachable", sent, self._unsent.path)
            while self._pending:
                name, a, kw = self._pending[0]
                getattr(client, name)(self.run_id, *a, **kw)
                self._pending.pop(0)
            if self._warned:
                log.warning("MLflow tracking is back; buffered entries were sent")
                self._warned = False
        except Exception as e:  # any tracking failure: training goes on
            self._keep_metrics_on_disk()
            if not self._warned:
                where = f"in {self._unsent.path}" if self._unsent is not None else "locally"
                log.warning("MLflow tracking failed (%s: %s); buffering %s and going on", type(e).__name__, e, where)
                self._warned = True

    def _keep_metrics_on_disk(self) -> None:
        """Move the buffered calls that log metrics only to the unsent-metrics file; others stay in memory (and so
        does a call the file could not take)."""
        if self._unsent is None:
            return
        in_memory = []
        for name, a, kw in self._pending:
            if name == "log_batch" and not a and set(kw) == {"metrics"}:
                try:
                    self._unsent.append(kw["metrics"])
                    continue
                except OSError as e:
                    log.warning("could not keep MLflow metrics in %s (%s); keeping them in memory", self._unsent.path,
                                e.strerror or e)
            in_memory.append((name, a, kw))
        self._pending = in_memory

    def reopen_later(self, owner: dict[str, str]) -> SafeRun:
        """For a run that MLflow was unreachable to reopen: queue what reopening does (``owner``, this process's
        identity, then status RUNNING) ahead of every later call, so that the first call to reach MLflow does it.
        Until then the run's metric points are kept, on disk given ``unsent_dir``."""
        from mlflow.entities import RunTag

        if owner:
            self._pending.append(("log_batch", (), {"tags": [RunTag(k, v) for k, v in owner.items()]}))
        self._pending.append(("update_run", (), {"status": "RUNNING"}))
        self._warned = True  # start_run said MLflow is unreachable; the next word is that it is back
        return self

    def log_params(self, params: dict) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log_batch", params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import RunTag

        self._call("log_batch", tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._upload("log_artifact", path, artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._upload("log_artifacts", path, artifact_path)

    def _upload(self, method: str, path: str | Path, artifact_path: str | None) -> None:
        if self.run_id is None:
            return
        from mlflow import MlflowClient

        try:
            getattr(MlflowClient(), method)(self.run_id, str(path), artifact_path)
        except Exception as e:  # training goes on, and so do the metrics
            log.warning("MLflow did not store %s (%s: %s); it stays on disk", path, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._call("set_terminated", status)


def start_run(experiment: str, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None, shared: bool = False,
              unsent_dir: str | Path | None = None) -> SafeRun:
    """Create (or reopen, given ``run_id``) a run, then mark this host's runs of ended processes KILLED; never
    raises: a dead tracking store yields a no-op SafeRun, or, for a run to reopen, a SafeRun of that run that reopens
    it once MLflow is back (``SafeRun.reopen_later``). A run the store does not hold (deleted, or from another store)
    yields a no-op SafeRun. A ``shared`` run (a sweep's parent, which several workers reopen) records no process: one
    of them ending does not end it. ``unsent_dir``: see ``SafeRun``; a reopened run first gets the metric points an
    earlier process kept there, and the points kept there for other runs are sent to them."""
    owner = {} if shared else process_tags()
    try:
        from mlflow import MlflowClient

        configure(experiment)
        client = MlflowClient()
        if run_id is not None:
            experiment_id = _reopen(client, run_id, owner)
        else:
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
            dvc_experiment = dvc_experiment_name()
            identity = {**owner, **({DVC_EXP_NAME_TAG: dvc_experiment} if dvc_experiment else {})}
            run_id = client.create_run(experiment_id, run_name=run_name, tags={**identity, **(tags or {})}).info.run_id
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if run_id is None:
            log.warning("MLflow tracking unavailable (%s); the run goes on without it", reason)
            return SafeRun(None)
        if run_is_gone(e):
            log.warning("MLflow run %s cannot be reopened (%s)", run_id, reason)
            return SafeRun(None)
        log.warning("MLflow tracking unavailable (%s); run %s is reopened once it is back, and until then its metric "
                    "points are kept %s", reason, run_id, f"in {unsent_dir}/" if unsent_dir is not None else "locally")
        return SafeRun(run_id, unsent_dir).reopen_later(owner)
    try:
        mark_killed_runs(client, experiment_id)
    except Exception as e:  # stale statuses are cosmetic: the new run goes on
        log.warning("MLflow: could not check for runs of ended processes (%s: %s)", type(e).__name__, e)
    if unsent_dir is not None:
        send_unsent_metrics_of_other_runs(client, unsent_dir, run_id)
    run = SafeRun(run_id, unsent_dir)
    run.send_buffered()  # a reopened run's points from before a restart; nothing to do for a new run
    return run


def _reopen(client, run_id: str, owner: dict[str, str]) -> str:
    """Take up run ``run_id`` again, as process ``owner`` (none for a shared run); return its experiment's id."""
    from mlflow.entities import RunTag

    run = client.get_run(run_id)
    # This process's identity before the status: a run reopened to resume is then never taken for the ended
    # process's run, by mark_killed_runs or by another process starting meanwhile.
    if owner:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner.items()])
    client.update_run(run_id, status="RUNNING")
    return run.info.experiment_id


def run_is_gone(error: BaseException) -> bool:
    """Whether ``error`` says that the tracking store holds no run to reopen: none of that id (never there, or purged:
    RESOURCE_DOES_NOT_EXIST), or a deleted one (changing it is INVALID_PARAMETER_VALUE). Not so for a store that could
    not be reached: MLflow reports a refused connection or a timeout as an MlflowException with INTERNAL_ERROR, a
    proxy's 502 / 503 as INTERNAL_ERROR / TEMPORARILY_UNAVAILABLE, and a database it cannot open as SQLAlchemy's."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in ("RESOURCE_DOES_NOT_EXIST",
                                                                       "INVALID_PARAMETER_VALUE")


def send_unsent_metrics_of_other_runs(client, folder: str | Path, run_id: str) -> None:
    """Send the metric points kept in ``folder`` for runs other than ``run_id`` (whose SafeRun sends its own) to their
    runs, removing each file once sent: a run that ended during an outage and was never resumed left them. A file
    whose run the store does not hold is removed with a warning: its points have nowhere to go."""
    for other_run, path in unsent_metrics_files(folder).items():
        if other_run == run_id:
            continue
        unsent = UnsentMetrics(path)
        try:
            if not _run_exists(client, other_run):
                log.warning("%s holds metric points of MLflow run %s, which this tracking store does not hold "
                            "(deleted, or from another store): removing it", path, other_run)
                unsent.clear()
            elif sent := unsent.send(client, other_run):
                log.info("sent %d metric points kept in %s to MLflow run %s", sent, path, other_run)
        except Exception as e:  # kept for the next start
            log.warning("MLflow: could not send the metric points kept in %s (%s: %s)", path, type(e).__name__, e)


def _run_exists(client, run_id: str) -> bool:
    """Whether the store holds run ``run_id``, not deleted."""
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception as e:
        if run_is_gone(e):
            return False
        raise


@contextlib.contextmanager
def active_run(run: SafeRun):
    """Make ``run`` the active fluent run (for mlflow.pyfunc.log_model and friends); tolerant of failures."""
    import mlflow

    if run.run_id is None:
        yield None
        return
    try:
        ctx = mlflow.start_run(run_id=run.run_id)
    except Exception as e:
        log.warning("MLflow: cannot reopen run %s (%s)", run.run_id, e)
        yield None
        return
    with ctx as active:
        yield active
