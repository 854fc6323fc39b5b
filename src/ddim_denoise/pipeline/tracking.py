"""MLflow tracking: where runs go, and logging that never kills training when the tracking server blinks.

Default store: SQLite backend ``mlruns/mlflow.db`` and artifacts under ``mlruns/artifacts``, both in the project
root. MLflow 3.x treats a bare ``./mlruns`` folder as a deprecated file store, so the URI is always set explicitly.
``MLFLOW_TRACKING_URI`` overrides it (a remote ``mlflow server``, for example).

``dvc exp run --temp`` and ``--queue`` execute in a copy of the repo under ``<root>/.dvc/tmp/exps/``; runs from
there must land in the workspace's store, not in the throw-away copy, so the project root is found above it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"


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


class SafeRun:
    """Logs to one MLflow run; if the tracking store fails, warns once and keeps training.

    Failed calls are kept in a local buffer and replayed on the next successful call, so a short outage loses no
    metric points. Artifacts are sent once, not buffered: a file the server always refuses (one too large for a
    proxy) would otherwise hold back every metric behind it, and the file stays on disk anyway. ``run_id`` is None
    when tracking could not start at all.
    """

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self._pending: list[tuple[str, tuple, dict]] = []
        self._warned = False

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.run_id is None:
            return
        from mlflow import MlflowClient

        self._pending.append((method, args, kwargs))
        client = MlflowClient()
        try:
            while self._pending:
                name, a, kw = self._pending[0]
                getattr(client, name)(self.run_id, *a, **kw)
                self._pending.pop(0)
            if self._warned:
                log.warning("MLflow tracking is back; buffered entries were sent")
                self._warned = False
        except Exception as e:  # any tracking failure: training goes on
            if not self._warned:
                log.warning("MLflow tracking failed (%s: %s); buffering locally and going on", type(e).__name__, e)
                self._warned = True

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
              tags: dict[str, str] | None = None) -> SafeRun:
    """Create (or reopen, given ``run_id``) a run; never raises: a dead tracking store yields a no-op SafeRun."""
    try:
        from mlflow import MlflowClient

        configure(experiment)
        client = MlflowClient()
        if run_id is not None:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return SafeRun(run_id)
        exp = client.get_experiment_by_name(experiment)
        run = client.create_run(exp.experiment_id, run_name=run_name, tags=tags or {})
        return SafeRun(run.info.run_id)
    except Exception as e:
        log.warning("MLflow tracking unavailable (%s: %s); the run goes on without it", type(e).__name__, e)
        return SafeRun(None)


@contextlib.contextmanager
def active_run(run: SafeRun):
    """Make ``run`` the active fluent run (for mlflow.pytorch.log_model and friends); tolerant of failures."""
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
