"""Evaluation, classical baselines, the report, and their CLI commands, on a tiny untrained model and 6 images."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.core.metrics import make_noisy, psnr_of_mean_mse, psnr_ssim, to_float
from ddim_denoise.data.prepared import MANIFEST_FORMAT
from ddim_denoise.denoising.denoiser import build_model
from ddim_denoise.evaluation import evaluate as evaluate_module
from ddim_denoise.evaluation.baselines import bm3d_denoise, map_images, nlm_denoise, resolve_workers
from ddim_denoise.evaluation.evaluate import (
    NOISY,
    NOISY_INPUT,
    TABLE_COLUMNS,
    Method,
    build_methods,
    evaluate,
    method_label,
    model_methods,
    run_methods,
    write_evaluation,
)
from ddim_denoise.evaluation.report import ORIGIN_REPORT, findings, write_report
from ddim_denoise.pipeline.checkpoint import save_checkpoint
from ddim_denoise.pipeline.files import GRID_FILE, MANIFEST_FILE, METRICS_FILE, TABLE_FILE
from ddim_denoise.pipeline.params import validate_params

N_TEST = 6
SIGMAS = [0.05, 0.1]  # low enough that mid-gray images almost never clip: noisy PSNR = -20 log10(sigma)
EXPECTED_METHODS = {"noisy": N_TEST, "model_1step": N_TEST, "model_ddim3": N_TEST, "model_1step_8bit": 4, "bm3d": 1,
                    "nlm": 3}


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_params):
    """A project folder with prepared test data, a tiny checkpoint, fake training files and params.yaml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tiny_params.model_dump()
    raw["eval"].update(n_images=N_TEST, sigmas=SIGMAS, bm3d_images=1, nlm_images=3, ddim_steps=3, grid_images=2,
                       clipped_images=4)
    params = validate_params(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    prepared = tmp_path / params.data.prepared_dir
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(prepared / "test_x.npy", rng.integers(110, 146, size=(N_TEST, 32, 32, 3), dtype=np.uint8))
    np.save(prepared / "test_y.npy", np.arange(N_TEST, dtype=np.uint8))
    (prepared / MANIFEST_FILE).write_text(json.dumps({"format": MANIFEST_FORMAT}))

    model, _ = build_model(params)
    state = model.state_dict()
    save_checkpoint(tmp_path / "models" / "best.pt", {"params": raw, "model": state, "ema": state})
    write_training_files(tmp_path / "training", run_id=None)
    return params


def write_training_files(training_dir, run_id):
    training_dir.mkdir(exist_ok=True)
    steps = pd.DataFrame({"step": range(1, 21), "epoch": [1] * 10 + [2] * 10,
                          "loss": np.linspace(1.0, 0.2, 20), "lr": np.linspace(1e-4, 1e-6, 20)})
    steps.to_csv(training_dir / "steps.csv", index=False)
    pd.DataFrame({"epoch": [1, 1, 2, 2], "sigma": [0.1, 0.3] * 2, "psnr": [20.0, 15.0, 22.0, 17.0],
                  "ssim": [0.6, 0.4, 0.7, 0.5]}).to_csv(training_dir / "val.csv", index=False)
    summary = {"mlflow_run_id": run_id, "parameters": 12345, "epochs": 2, "steps": 20, "train_images_seen": 160,
               "train_seconds": 3.5, "images_per_s": 45.7, "precision": "fp32", "device": "cpu",
               "validation_seconds": 1.25, "checkpoint_seconds": 0.5, "best_val_psnr": 22.0, "best_epoch": 2}
    (training_dir / "summary.json").write_text(json.dumps(summary))


def test_evaluate_writes_metrics_table_and_grid_with_analytic_noisy_psnr(workspace):
    table = evaluate(workspace, "models/best.pt")
    out = workspace.eval.out_dir

    csv = pd.read_csv(f"{out}/{TABLE_FILE}")
    assert list(csv.columns) == TABLE_COLUMNS
    assert len(csv) == len(SIGMAS) * len(EXPECTED_METHODS)
    for sigma in SIGMAS:
        rows = csv[np.isclose(csv.sigma, sigma)].set_index("method")
        assert dict(rows.n_images) == EXPECTED_METHODS
        # Unclipped Gaussian noise of std sigma on a [0, 1] scale: MSE = sigma^2, PSNR = -20 log10(sigma).
        assert rows.psnr["noisy"] == pytest.approx(-20 * math.log10(sigma), abs=0.15)
        assert math.isnan(rows.images_per_s["noisy"]) and rows.images_per_s["model_1step"] > 0
        assert rows.psnr["bm3d"] > rows.psnr["noisy"]  # the baselines get the true sigma and do denoise
        assert rows.psnr["nlm"] > rows.psnr["noisy"]
        # mid-gray images barely clip at these sigmas: the 8-bit copies score as the one-step model on the same images
        assert rows.psnr["model_1step_8bit"] == pytest.approx(rows.psnr_1step_same_images["model_1step_8bit"], abs=0.2)
    pd.testing.assert_frame_equal(table.reset_index(drop=True), csv, check_dtype=False, atol=1e-4)

    metrics = json.loads(open(f"{out}/{METRICS_FILE}").read())
    assert set(metrics) == {"sigma_0.05", "sigma_0.1", "mean_psnr_1step"}
    assert metrics["sigma_0.1"]["bm3d"]["n_images"] == 1
    assert metrics["sigma_0.1"]["model_1step"]["psnr"] == pytest.approx(
        csv.psnr[(csv.method == "model_1step") & np.isclose(csv.sigma, 0.1)].item(), abs=1e-3)
    assert metrics["mean_psnr_1step"] == pytest.approx(csv.psnr[csv.method == "model_1step"].mean(), abs=1e-3)
    assert open(f"{out}/{GRID_FILE}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_denoises_under_this_runs_eval_settings_not_the_checkpoints(workspace, monkeypatch):
    """eval.unclip_passes (the 8-bit row) is read from the Denoiser's params: those must be params.yaml's now, not
    the ones the checkpoint was trained under, or changing them reruns the stage to the same result."""
    from ddim_denoise.denoising.denoiser import Denoiser

    used = []
    build_methods = evaluate_module.build_methods
    monkeypatch.setattr(evaluate_module, "build_methods",
                        lambda denoiser, *args: used.append(denoiser.params.eval) or build_methods(denoiser, *args))
    changed = workspace.model_copy(deep=True)
    changed.eval.unclip_passes = workspace.eval.unclip_passes + 3
    assert Denoiser.from_checkpoint("models/best.pt").params.eval.unclip_passes == workspace.eval.unclip_passes
    evaluate(changed, "models/best.pt")
    assert used == [changed.eval]


def test_every_method_sees_the_same_noisy_input():
    clean = to_float(np.random.default_rng(1).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8))
    seen: dict[str, list[np.ndarray]] = {}

    def recorder(name):
        def fn(noisy, sigma):
            seen.setdefault(name, []).append(noisy.copy())
            return noisy
        return fn

    methods = {"a": Method(recorder("a")), "b": Method(recorder("b"), max_images=2), "c": Method(recorder("c"))}
    evaluation = run_methods(clean, [0.2, 0.4], methods, noise_seed=7, keep_images=2)
    for i, sigma in enumerate([0.2, 0.4]):
        expected = make_noisy(clean, sigma, seed=7)
        np.testing.assert_array_equal(seen["a"][i], expected)
        np.testing.assert_array_equal(seen["c"][i], expected)
        np.testing.assert_array_equal(seen["b"][i], expected[:2])  # a prefix of the same images, not fresh noise
    table = evaluation.table
    # Identical inputs and outputs give identical scores whatever the method.
    a, c = (table[table.method == m].psnr.to_numpy() for m in "ac")
    np.testing.assert_array_equal(a, c)
    # A method on a prefix is scored on that prefix only.
    b = table[(table.method == "b") & (table.sigma == 0.2)]
    assert b.n_images.item() == 2
    assert b.psnr.item() == pytest.approx(psnr_ssim(clean[:2], make_noisy(clean[:2], 0.2, 7))[0].mean())


def test_a_baseline_on_a_prefix_is_paired_with_the_model_on_the_same_images():
    # The one-step "model" gets worse image by image, so its mean over a prefix differs from its mean over all.
    clean = to_float(np.random.default_rng(2).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8))
    error = np.linspace(0.01, 0.2, len(clean), dtype=np.float32).reshape(-1, 1, 1, 1)
    model = lambda noisy, sigma: clean[: len(noisy)] + error[: len(noisy)]
    methods = {"model_1step": Method(model), "bm3d": Method(lambda noisy, sigma: noisy, max_images=2)}
    table = run_methods(clean, [0.1], methods, noise_seed=0).table.set_index("method")
    model_psnr, model_ssim = psnr_ssim(clean, clean + error)
    assert table.psnr_1step_same_images["bm3d"] == pytest.approx(model_psnr[:2].mean())
    assert table.ssim_1step_same_images["bm3d"] == pytest.approx(model_ssim[:2].mean())
    assert table.psnr_1step_same_images["model_1step"] == pytest.approx(table.psnr["model_1step"])
    assert table.psnr_1step_same_images["bm3d"] > table.psnr["model_1step"] + 1  # the first images are the easy ones
    assert "on the same 2 images: " + f"{model_psnr[:2].mean() - table.psnr['bm3d']:+.2f} dB" in " ".join(
        findings(table.reset_index()))


def test_the_ddim_tradeoff_compares_one_step_on_the_images_ddim_ran_on():
    """DDIM on eval.ddim_images covers the first images only: set against the one-step mean over all images, a DDIM
    that loses 1.34 dB on every image it denoised read as a 6.85 dB gain."""
    rows = [dict(sigma=0.2, method="model_1step", n_images=400, psnr=16.25, ssim=0.50,
                 psnr_1step_same_images=16.25, ssim_1step_same_images=0.50, images_per_s=100.0),
            dict(sigma=0.2, method="model_ddim10", n_images=100, psnr=23.10, ssim=0.79,
                 psnr_1step_same_images=24.44, ssim_1step_same_images=0.80, images_per_s=10.0)]
    notes = " ".join(findings(pd.DataFrame(rows)))
    assert "DDIM-10 minus one-step: -1.34 dB / -0.0100 SSIM at σ=0.2" in notes
    assert "does not gain PSNR at any σ" in notes


def test_multistep_methods_run_on_a_prefix_when_asked():
    class CountingDenoiser:
        calls: list[tuple[int, int]] = []
        stops: list[float] = []

        def denoise(self, noisy, sigma, steps, eta, batch_size, ddim_stop_sigma=0.0):
            self.calls.append((steps, len(noisy)))
            self.stops.append(ddim_stop_sigma)
            return noisy

    denoiser = CountingDenoiser()
    methods = model_methods(denoiser, [1, 10, 50], batch_size=4, multistep_images=3)
    assert list(methods) == ["model_1step", "model_ddim10", "model_ddim50"]
    clean = np.zeros((7, 8, 8, 3), np.float32)
    table = run_methods(clean, [0.1], {name: Method(m.fn, m.max_images) for name, m in methods.items()}, 0).table
    assert denoiser.calls == [(1, 7), (10, 3), (50, 3)]
    assert table.set_index("method").n_images.to_dict() == {"model_1step": 7, "model_ddim10": 3, "model_ddim50": 3}


def test_eval_ddim_stop_sigma_reaches_the_ddim_rows_and_names_them():
    class RecordingDenoiser:
        stops: list[float] = []

        def denoise(self, noisy, sigma, steps, eta, batch_size, ddim_stop_sigma=0.0):
            self.stops.append(ddim_stop_sigma)
            return noisy

    denoiser = RecordingDenoiser()
    cfg = validate_params({"eval": {"ddim_stop_sigma": 0.05, "bm3d_images": 0, "nlm_images": 0,
                                    "clipped_images": 0}}).eval
    methods = build_methods(denoiser, cfg)
    assert list(methods) == [NOISY, "model_1step", "model_ddim10_stop0.05"]
    assert method_label("model_ddim10_stop0.05") == "DDIM-10 to σ=0.05" and method_label("model_ddim10") == "DDIM-10"
    methods["model_ddim10_stop0.05"].fn(np.zeros((1, 8, 8, 3), np.float32), 0.1)
    assert denoiser.stops == [0.05]


def test_eval_ddim_images_limits_the_ddim_rows_alone():
    cfg = validate_params({"eval": {"ddim_images": 3, "bm3d_images": 0, "nlm_images": 0, "clipped_images": 0}}).eval
    methods = build_methods(None, cfg)  # building the methods calls nothing
    assert methods["model_ddim10"].max_images == 3 and methods["model_1step"].max_images is None
    assert build_methods(None, validate_params({}).eval)["model_ddim10"].max_images is None  # default: all images


def _worker_pid_image(image: np.ndarray) -> np.ndarray:
    """The id of the process that handled the image, as pixels in [0, 1) (Linux pids stay below 2**22)."""
    return np.full_like(image, os.getpid() / 2**22)


def test_baseline_worker_processes_start_once_and_serve_every_call():
    """Each call used to spawn its own pool: BM3D's measured speed counted seconds of start-up, and every sigma of an
    evaluation paid them again. Three calls on two workers are served by at most two processes, none of them this
    one."""
    images = np.zeros((6, 2, 2, 3), np.float32)
    pids = set()
    for _ in range(3):
        pids |= set(np.round(map_images(_worker_pid_image, images, workers=2) * 2**22).astype(int).ravel())
    assert len(pids) <= 2 and os.getpid() not in pids


@pytest.mark.parametrize("denoise", [bm3d_denoise, nlm_denoise])
def test_baselines_denoise_a_smooth_image(denoise):
    ramp = np.linspace(0.2, 0.8, 32, dtype=np.float32)
    clean = np.stack([np.broadcast_to(ramp, (32, 32)), np.broadcast_to(ramp[:, None], (32, 32)),
                      np.full((32, 32), 0.5, np.float32)], axis=-1)[None]
    noisy = make_noisy(clean, 0.1, seed=0)
    out = denoise(noisy, 0.1)
    assert out.shape == clean.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    gain = psnr_ssim(clean, out)[0].item() - psnr_ssim(clean, noisy)[0].item()
    assert gain > 5, f"{denoise.__name__} gained only {gain:.2f} dB on a smooth image"


def test_eval_workers_auto_is_one_per_core_this_process_may_use(monkeypatch):
    import os

    from ddim_denoise.pipeline.params import ParamsError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)  # e.g. a container's share
    assert resolve_workers("auto") == 3 and resolve_workers(4) == 4
    assert validate_params({}).eval.workers == "auto"
    for bad in (0, "many"):
        with pytest.raises(ParamsError, match="eval.workers"):
            validate_params({"eval": {"workers": bad}})


def test_cli_evaluate_and_report_log_into_the_training_run(workspace, tmp_path):
    from mlflow import MlflowClient

    from ddim_denoise.pipeline.tracking import start_run

    run = start_run(workspace.mlflow.experiment, run_name="train")
    assert run.run_id is not None
    write_training_files(tmp_path / "training", run_id=run.run_id)

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output

    report_dir = tmp_path / workspace.report.out_dir
    text = (report_dir / "report.md").read_text()
    for label in ("noisy input", "one-step", "DDIM-3", "BM3D", "NLM", "origin report"):
        assert label in text
    for psnr, ssim in ORIGIN_REPORT.values():
        assert f"{psnr:.2f} / {ssim:.4f}" in text
    assert "12,345" in text and "45.7 images/s" in text  # from training/summary.json
    assert "| validation / checkpoint writes | 1.2 s / 0.5 s |" in text
    assert "DDIM-3 minus one-step" in text
    for name in ("psnr_vs_sigma", "loss", "lr", "val_psnr", "grid"):
        assert (report_dir / "figures" / f"{name}.png").is_file()
        assert f"figures/{name}.png" in text

    client = MlflowClient()
    metrics = client.get_run(run.run_id).data.metrics
    assert "test_psnr_model_1step_sigma0.1" in metrics and "test_ssim_bm3d_sigma0.05" in metrics
    assert metrics["test_psnr_noisy_sigma0.1"] == pytest.approx(20.0, abs=0.15)
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"evaluation", "reports"} <= artifacts
    logged = {a.path for a in client.list_artifacts(run.run_id, "evaluation")}
    assert {f"evaluation/{n}" for n in (METRICS_FILE, TABLE_FILE, GRID_FILE)} <= logged


def test_report_without_run_id_warns_and_still_writes(workspace, tmp_path, caplog):
    clean = to_float(np.full((3, 8, 8, 3), 128, np.uint8))
    methods = {"noisy": NOISY_INPUT, "model_1step": Method(lambda x, s: np.full_like(x, 0.5))}
    write_evaluation(run_methods(clean, [0.2, 0.5], methods, 0, keep_images=1), workspace.eval.out_dir,
                     ["clean", "noisy", "model_1step"])
    result = CliRunner().invoke(app, ["report", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert "no MLflow run id" in caplog.text
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "9.56 / 0.4123" in text and "7.73 / 0.2872" in text
    assert "above the input" in text  # a perfect mid-gray estimate beats its noisy input


def test_report_needs_the_evaluation_first(workspace):
    from ddim_denoise.pipeline.errors import DataError

    with pytest.raises(DataError, match="evaluate"):
        write_report(workspace)


def test_psnr_of_the_mean_mse_is_what_the_published_figures_use():
    """Two images at 20 and 40 dB: MSE 0.01 and 0.0001, so the mean MSE gives 22.97 dB where the mean PSNR is 30."""
    value, ci = psnr_of_mean_mse(np.array([20.0, 40.0]))
    assert value == pytest.approx(-10 * np.log10(0.00505)) and ci > 0
    assert psnr_of_mean_mse(np.full(5, 25.0)) == pytest.approx((25.0, 0.0))

