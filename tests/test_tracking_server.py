"""The shared tracking setup a team runs: PostgreSQL, an ``mlflow server`` on it with its own artifact store, training
pointed at it with MLFLOW_TRACKING_URI, and Optuna sweep workers keeping their study in the same PostgreSQL.

Needs PostgreSQL's programs (Debian: ``apt-get install -y postgresql``); skipped, with that reason, without them.
"""

from __future__ import annotations

import subprocess

import mlflow
import optuna
import pytest
import yaml
from cli_workspace import TRAIN_IMAGES, cli, make_workspace, process_env, run, summary
from services import mlflow_server, postgres_bin_dir, postgres_server

from ddim_denoise.pipeline.params import flatten
from ddim_denoise.sweep.storage import WORKER_ATTR
from ddim_denoise.sweep.tracking import PARENT_RUN_ATTR

pytestmark = pytest.mark.postgres

WORKERS = 2
WORKER_TIMEOUT_S = 300
SPACE = {  # one searched key and a one-epoch budget: the test is about where trials are stored, not what they learn
    "parameters": {"train.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True}},
    "budget": {"train.epochs": 1, "train.max_train_images": 16, "train.val_images": 4, "train.checkpoint_every": 100},
    "pruner": {"default": "none"},
    "sampler": {"seed": None, "n_startup_trials": WORKERS},
}


@pytest.fixture(scope="module")
def postgres():
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl not found: apt-get install -y postgresql")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """``mlflow server --backend-store-uri postgresql://... --artifacts-destination <folder>``: (URL, folder)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(postgres.create_database("mlflow"), folder / "artifacts", folder / "server.log") as url:
        yield url, folder / "artifacts"


def test_training_logs_its_run_params_metrics_and_files_to_the_server(tracking_server, tmp_path, tiny_params):
    url, artifacts = tracking_server
    params = make_workspace(tmp_path, tiny_params, {"mlflow.experiment": "server", "mlflow.log_model": True})
    trained = run(cli("train"), tmp_path, process_env(url))
    assert trained.returncode == 0, trained.stderr
    result = summary(tmp_path)

    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("server")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [result["mlflow_run_id"]]
    logged = client.get_run(result["mlflow_run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {key: str(value) for key, value in flatten(params).items()}
    assert logged.data.tags["fingerprint"] and logged.data.tags["dataset_sha256"]
    steps = params.train.epochs * (TRAIN_IMAGES // params.train.batch_size)
    losses = client.get_metric_history(logged.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(1, steps + 1))
    assert logged.data.metrics["best_val_psnr"] == pytest.approx(result["best_val_psnr"], abs=1e-3)
    # Files went through the server into its artifact store, not into this folder.
    assert {f.path for f in client.list_artifacts(logged.info.run_id, "training")} >= {
        "training/summary.json", "training/steps.csv", "training/val.csv"}
    assert "checkpoints/best.pt" in {f.path for f in client.list_artifacts(logged.info.run_id, "checkpoints")}
    assert list(artifacts.rglob("summary.json")) and list(artifacts.rglob("best.pt"))
    assert not (tmp_path / "mlruns" / "artifacts").exists()
    # training logs no model of its own: evaluate logs the code-based pyfunc model into this run
    assert len(client.search_logged_models(experiment_ids=[experiment.experiment_id])) == 0


def test_sweep_workers_share_one_study_in_postgresql(postgres, tracking_server, tmp_path, tiny_params):
    url, _ = tracking_server
    storage = postgres.create_database("optuna")
    make_workspace(tmp_path, tiny_params, {"mlflow.experiment": "sweep"})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    command = cli("sweep", "run", "--trials", "1", "--study", "shared", "--storage", storage, "--space", "space.yaml")
    workers = [subprocess.Popen(command, cwd=tmp_path, env=process_env(url), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(WORKERS)]
    try:
        outputs = [worker.communicate(timeout=WORKER_TIMEOUT_S)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n".join(o[-2000:] for o in outputs)

    study = optuna.load_study(study_name="shared", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * WORKERS
    assert sorted(t.user_attrs[WORKER_ATTR]["pid"] for t in study.trials) == sorted(w.pid for w in workers)
    client = mlflow.MlflowClient(url)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    nested = client.search_runs([client.get_experiment_by_name("sweep").experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(nested) == WORKERS and all(r.info.status == "FINISHED" for r in nested)
