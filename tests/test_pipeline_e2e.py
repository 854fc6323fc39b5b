"""`dvc repro` of the whole chain on a tiny configuration, in a temporary copy of the project."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cifar_fixtures import write_cifar_npz
from picture_fixtures import write_picture_folder

from ddim_denoise.pipeline.profiles import compose_params

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {"val_size": 8},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [16],
              "num_heads": 2, "groups": 4, "dropout": 0.0},
    "diffusion": {"T": 100},
    "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "val_images": 4, "log_every": 1, "checkpoint_every": 1,
              "device": "cpu"},
    "eval": {"n_images": 4, "bm3d_images": 1, "nlm_images": 2, "sigmas": [0.1, 0.3], "ddim_steps": 2,
             "batch_size": 4, "grid_images": 2, "workers": 1},
    "mlflow": {"log_model": True},  # evaluate logs and registers the pyfunc model
}


@pytest.fixture
def project(tmp_path):
    """A copy of the project (pipeline files and sources) with tiny params and tiny data, as its own git repo."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "data.dvc", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / ".dvc", proj / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    shutil.copytree(ROOT / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # A tiny profile, made the default: `dvc exp run` composes params.yaml from conf/ as in the project itself.
    conf = proj / "src" / "ddim_denoise" / "conf"
    (conf / "profile" / "tiny.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump({"profile": "tiny", **TINY}, sort_keys=False))
    config = conf / "config.yaml"
    config.write_text(re.sub(r"- profile: \w+", "- profile: tiny", config.read_text()))
    (proj / "params.yaml").write_text(yaml.safe_dump(compose_params(conf_dir=conf), sort_keys=False))
    write_cifar_npz(proj / "data" / "raw", n_train_per_batch=4, n_test=4)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*cmd, check=True):
        done = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=600)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny project")
    return proj, run


def mlflow_runs(proj: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddim-denoise")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_chain_and_tracks_it(project):
    proj, run = project
    out = run("dvc", "repro")
    for stage in ("prepare", "train", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out.stdout

    metrics = json.loads((proj / "evaluation" / "metrics.json").read_text())
    for sigma in ("sigma_0.1", "sigma_0.3"):
        assert {"noisy", "model_1step", "model_ddim2", "bm3d", "nlm"} <= set(metrics[sigma])
    report = (proj / "reports" / "report.md").read_text()
    assert "BM3D" in report and "9.56" in report  # the origin report's figure sits beside ours
    summary = json.loads((proj / "training" / "summary.json").read_text())

    client, runs = mlflow_runs(proj)
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    data = runs[0].data
    assert data.params["train.lr"] == "0.001" and data.tags.get("dataset_sha256")
    assert "test_psnr_model_1step_sigma0.1" in data.metrics and "val_psnr_mean" in data.metrics
    assert len(client.get_metric_history(runs[0].info.run_id, "lr")) >= 2  # the LR curve, per step
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"checkpoints", "evaluation", "reports", "training"} <= artifacts
    versions = client.search_model_versions("name='ddim-denoiser'")  # evaluate registered the model
    assert len(versions) == 1 and versions[0].run_id == summary["mlflow_run_id"]

    # Nothing changed: nothing reruns.
    assert "didn't change, skipping" in run("dvc", "repro").stdout

    # An experiment in a temporary copy logs into the workspace's MLflow store.
    run("dvc", "exp", "run", "--temp", "-S", "train.lr=0.002")
    _, runs = mlflow_runs(proj)
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.001", "0.002"]
    assert not list((proj / ".dvc" / "tmp").glob("exps/**/mlruns/mlflow.db"))


@pytest.mark.slow
def test_the_photos_profile_trains_evaluates_and_reports_on_a_folder_of_pictures(project):
    """docs/own-images.md's commands on a generated folder: one profile name, with the tiny sizes on top."""
    proj, run = project
    expected = write_picture_folder(proj / "data" / "photos")
    run("dvc", "add", "data/photos")
    sizes = {f"{section}.{key}": value for section in ("model", "diffusion", "train", "eval")
             for key, value in TINY[section].items()}
    sizes.update({"data.patch_size": 32, "data.patches_per_epoch": 16, "data.val_size": 4, "data.val_files": 1,
                  "data.test_files": 2, "eval.n_images": 2})
    overrides = [arg for key, value in sizes.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    run("dvc", "exp", "run", "-S", "profile=photos", *overrides)

    manifest = json.loads((proj / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["dataset"] == "folder" and len(manifest["split"]["test"]) == 2
    assert {item["file"] for item in manifest["left_out"]} == {n for n, what in expected.items() if what != "ok"}
    metrics = json.loads((proj / "evaluation" / "metrics.json").read_text())
    assert {"noisy", "model_1step", "model_ddim2", "bm3d", "nlm"} <= set(metrics["sigma_0.1"])
    assert "Gaussian denoising on your pictures (data/photos)" in (proj / "reports" / "report.md").read_text()
    _, runs = mlflow_runs(proj)
    assert runs[0].data.tags["data_test_files"] == ", ".join(manifest["split"]["test"])
