"""Export (ONNX / TorchScript parity with PyTorch), the MLflow pyfunc model, model resolution and REST serving."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from denoise_fixtures import (
    decode_bytes_with_reference,
    decode_with_reference,
    encode_with_reference,
    noisy_photo,
    quantize,
    write_tiny_checkpoint,
)
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.data.image_io import decode_image
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.serving.export import (
    check_parity,
    export_model,
    load_exported,
    one_step_module,
    parity_batches,
    run_eager,
    verify_export,
)
from ddim_denoise.serving.model_server import served_model

REGISTERED_NAME = "ddim-denoiser-test"
SERVER_START_TIMEOUT_S = 180  # a cold `mlflow models serve` imports mlflow and torch on 2 shared cores


@pytest.fixture
def checkpoint(tmp_path, tiny_params):
    return write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A private SQLite tracking store and registry with its artifacts under a temporary folder; the project's
    mlruns/ is never touched, and MLflow's process-wide settings are restored afterwards."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.setattr(utils, "_tracking_uri", None)
        patch.setattr(fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.create_experiment("export-serve", artifact_location=(root / "artifacts").as_uri())
        yield {"uri": uri, "experiment_id": experiment_id}


def rgb_png16(height=23, width=30, sigma=0.1, seed=0) -> bytes:
    return encode_with_reference("png", quantize(np.clip(noisy_photo(height, width, sigma, seed), 0, 1), np.uint16))


# --- export ----------------------------------------------------------------------------------------------------------

def test_exported_onnx_and_torchscript_match_pytorch(tmp_path, checkpoint):
    reference = run_eager(one_step_module(checkpoint))
    for fmt, name in (("onnx", "denoiser.onnx"), ("torchscript", "denoiser.pt")):
        path = export_model(checkpoint, fmt, tmp_path / name)
        report = verify_export(path, checkpoint, fmt)  # noisy photos, three shapes, some not multiples of 2
        assert report.passed, str(report)
        assert {shape[2:] for shape in report.shapes} >= {(48, 48), (45, 53)}
        # dynamic batch and size beyond the traced 2x3x32x32
        runner = load_exported(path)
        images = np.clip(noisy_photo(19, 33)[None], 0, 1).transpose(0, 3, 1, 2).repeat(5, axis=0)
        out = runner(images, np.linspace(0.05, 0.3, 5, dtype=np.float32))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        assert check_parity(runner, reference, [(images, np.full(5, 0.1, np.float32))]).passed


def test_exported_module_is_the_denoisers_one_step_estimate(checkpoint):
    denoiser = Denoiser.from_checkpoint(checkpoint, device="cpu", amp="off")  # the export is fp32
    images = noisy_photo(21, 26)[None].repeat(2, axis=0)
    sigma = np.array([0.05, 0.2], dtype=np.float32)
    expected = denoiser.denoise(images, sigma, steps=1)
    got = run_eager(one_step_module(checkpoint))(images.transpose(0, 3, 1, 2), sigma).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(expected - np.clip(images, 0, 1)).mean() > 1e-3  # the jittered model does change the image


def test_export_command_writes_and_checks_the_file(tmp_path, checkpoint):
    out = tmp_path / "exported" / "denoiser.pt"
    result = CliRunner().invoke(app, ["export", "-c", str(checkpoint), "--format", "torchscript", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "parity passed" in result.output
    bad = CliRunner().invoke(app, ["export", "-c", str(checkpoint), "--format", "tflite", "--out", str(out)])
    assert bad.exit_code == 2 and bad.output.strip().startswith("error: unknown export format")


def test_export_never_writes_over_its_checkpoint_nor_an_unforced_file(tmp_path, checkpoint, monkeypatch):
    """``export -c ckpt.pt --out ckpt.pt`` exited 0 and the checkpoint was gone; an existing file was replaced
    unasked. Both are refused before the model loads, and the files keep their bytes."""
    import ddim_denoise.serving.export as export_module

    original = checkpoint.read_bytes()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "hard.pt").hardlink_to(checkpoint)
    (tmp_path / "links" / "soft.pt").symlink_to(checkpoint)
    existing = tmp_path / "denoiser.pt"
    existing.write_bytes(b"an earlier export")
    monkeypatch.setattr(export_module, "one_step_module", lambda *args: pytest.fail("the model was loaded"))
    for out, extra, message in [(checkpoint, [], "is the checkpoint being exported"),
                                (checkpoint, ["--force"], "is the checkpoint being exported"),
                                (tmp_path / "links" / "hard.pt", ["--force"], "is the checkpoint being exported"),
                                (tmp_path / "links" / "soft.pt", ["--force"], "is the checkpoint being exported"),
                                (tmp_path / "." / checkpoint.name, [], "is the checkpoint being exported"),
                                (existing, [], "already exists; pass --force"),
                                (tmp_path / "links", ["--force"], "is a folder")]:
        result = CliRunner().invoke(app, ["export", "-c", str(checkpoint), "--format", "torchscript",
                                          "--out", str(out), *extra])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert checkpoint.read_bytes() == original and existing.read_bytes() == b"an earlier export"

    monkeypatch.undo()
    forced = CliRunner().invoke(app, ["export", "-c", str(checkpoint), "--format", "torchscript",
                                      "--out", str(existing), "--force", "--no-check"])
    assert forced.exit_code == 0, forced.output
    assert existing.read_bytes() != b"an earlier export" and checkpoint.read_bytes() == original


def test_parity_batches_are_noisy_photos():
    batches = parity_batches()
    assert all(images.dtype == np.float32 and images.shape[1] == 3 for images, _ in batches)
    assert any(images.min() < 0 or images.max() > 1 for images, _ in batches)  # noisy and unclipped, as served


# --- MLflow pyfunc model --------------------------------------------------------------------------------------------

def log_model(mlflow_store, checkpoint, metrics=None):
    import mlflow

    from ddim_denoise.serving.pyfunc import log_pyfunc_model

    with mlflow.start_run(experiment_id=mlflow_store["experiment_id"]) as run:
        info = log_pyfunc_model(checkpoint, registered_model_name=REGISTERED_NAME, metrics=metrics)
    return run, info


def test_pyfunc_model_logs_registers_loads_and_denoises(mlflow_store, checkpoint):
    import mlflow
    from mlflow.exceptions import MlflowException

    run, info = log_model(mlflow_store, checkpoint, metrics={"test_psnr": 31.5})
    assert mlflow.get_run(run.info.run_id).data.metrics["test_psnr"] == 31.5
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/{info.registered_model_version}")
    png16 = rgb_png16()
    gray = encode_with_reference("png", quantize(np.clip(noisy_photo(20, 20).mean(-1), 0, 1), np.uint8))
    frame = pd.DataFrame({"image": [base64.b64encode(png16).decode(), base64.b64encode(gray).decode()],
                          "sigma": [0.1, None]})
    out = model.predict(frame)
    assert list(out.columns) == ["image", "sigma"] and out["sigma"][0] == pytest.approx(0.1)
    assert 0 < out["sigma"][1] <= 1  # estimated

    stored = decode_bytes_with_reference(base64.b64decode(out["image"][0]))
    denoiser = Denoiser.from_checkpoint(checkpoint, device="cpu")
    expected = denoiser.denoise(decode_image(png16).rgb[None], 0.1)[0]
    np.testing.assert_array_equal(stored, quantize(expected, np.uint16))  # 16-bit in, 16-bit out
    assert decode_bytes_with_reference(base64.b64decode(out["image"][1])).shape == (20, 20)  # gray stays gray
    mono = model.predict(frame.iloc[:1], params={"mono_noise": True})
    expected_mono = denoiser.denoise(decode_image(png16).rgb[None], 0.1, mono_noise=True)[0]
    np.testing.assert_array_equal(decode_bytes_with_reference(base64.b64decode(mono["image"][0])),
                                  quantize(expected_mono, np.uint16))
    assert not np.array_equal(expected_mono, expected)  # the option changes the answer

    for bad_frame, message in [(pd.DataFrame({"image": ["aGVsbG8="], "sigma": [0.1]}), "not a PNG"),
                               (pd.DataFrame({"image": [frame["image"][0]], "sigma": [1.5]}), "sigma must lie")]:
        with pytest.raises(MlflowException, match=message):
            model.predict(bad_frame)


def test_the_evaluated_model_is_logged_as_code_with_exactly_pinned_requirements(mlflow_store, checkpoint):
    """What evaluate logs into the training's run (its only model): loading it unpickles nothing, and serving it in a
    fresh environment installs pinned versions only, never a package named ddim-denoise from an index."""
    import mlflow
    import yaml

    from ddim_denoise.serving.pyfunc import log_evaluated_model

    run_id = mlflow.MlflowClient().create_run(mlflow_store["experiment_id"]).info.run_id
    info = log_evaluated_model(checkpoint, run_id, None, {"test_psnr": 30.0})  # logged, not registered
    assert info.registered_model_version is None and mlflow.get_run(run_id).data.metrics["test_psnr"] == 30.0
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert mlmodel["metadata"] == {"trained_on": "CIFAR-10 (32x32 thumbnails)", "training_image_side": 32,
                                   "data_source": "cifar10"}  # what the served model was trained on
    flavors = mlmodel["flavors"]
    assert set(flavors) == {"python_function"}  # no pytorch flavour (a pickled nn.Module)
    pyfunc = flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(pyfunc["model_code_path"]).name == "pyfunc_model.py"
    assert "python_model" not in pyfunc and not list(folder.rglob("*.pkl"))  # a cloudpickled PythonModel's marks
    assert (folder / "code" / "ddim_denoise" / "serving" / "pyfunc.py").is_file()  # the package travels with it
    requirements = (folder / "requirements.txt").read_text().split()
    conda_pip = next(d["pip"] for d in yaml.safe_load((folder / "conda.yaml").read_text())["dependencies"]
                     if isinstance(d, dict))
    for requirement in (*requirements, *conda_pip):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.]*", requirement), requirement
        assert requirement.split("==")[0].lower().replace("_", "-") != "ddim-denoise", requirement
    assert "scipy" in {r.split("==")[0] for r in requirements}  # denoising/clipping.py imports it


def test_a_serving_requirement_that_is_not_installed_is_refused_not_left_unpinned(monkeypatch):
    from ddim_denoise.serving import pyfunc

    monkeypatch.setattr(pyfunc, "SERVING_REQUIREMENTS", ("numpy", "no-such-distribution-here"))
    with pytest.raises(RuntimeError, match="no-such-distribution-here is not installed"):
        pyfunc.serving_requirements()


def test_denoise_command_takes_the_checkpoint_from_a_run_or_a_registered_model(mlflow_store, checkpoint, tmp_path):
    import mlflow

    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    image.write_bytes(rgb_png16())
    best = tmp_path / "best.pt"
    best.write_bytes(checkpoint.read_bytes())
    with mlflow.start_run(experiment_id=mlflow_store["experiment_id"]) as run:
        mlflow.log_artifact(str(best), "checkpoints")  # as training logs it
    _, info = log_model(mlflow_store, checkpoint)
    outputs = {}
    model_uri = f"models:/{REGISTERED_NAME}/{info.registered_model_version}"
    for source in (["--run-id", run.info.run_id], ["--model-uri", model_uri], ["-c", str(checkpoint)]):
        out = tmp_path / source[0].strip("-")
        result = CliRunner().invoke(app, ["denoise", str(image), "-o", str(out), "--sigma", "0.1", *source,
                                          "--no-progress"])
        assert result.exit_code == 0, result.output
        outputs[source[0]] = decode_with_reference(out / "photo.png")
    assert all(np.array_equal(o, outputs["-c"]) for o in outputs.values())  # the same weights each way

    for source, message in [(["--run-id", "0123456789abcdef"], "--run-id"),
                            (["--model-uri", f"models:/{REGISTERED_NAME}/999"], "--model-uri")]:
        result = CliRunner().invoke(app, ["denoise", str(image), "-o", str(tmp_path / "x"), "--sigma", "0.1", *source])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_the_pyfunc_model_takes_base64_wrapped_in_lines(checkpoint):
    """Plain ``base64`` (not ``base64 -w0``) wraps its output every 76 characters: it was refused as not base64."""
    from types import SimpleNamespace

    from ddim_denoise.serving.pyfunc import CHECKPOINT_ARTIFACT, DenoiserModel

    model = DenoiserModel()
    model.load_context(SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}))
    png = rgb_png16(8, 8)
    wrapped = base64.encodebytes(png).decode("ascii")
    assert wrapped.strip().count("\n") >= 2
    out = model.predict(None, pd.DataFrame({"image": [wrapped], "sigma": [0.1]}))
    expected = model.predict(None, pd.DataFrame({"image": [base64.b64encode(png).decode("ascii")], "sigma": [0.1]}))
    assert out["image"][0] == expected["image"][0]


def loaded_model(checkpoint):
    from types import SimpleNamespace

    from ddim_denoise.serving.pyfunc import CHECKPOINT_ARTIFACT, DenoiserModel

    model = DenoiserModel()
    model.load_context(SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}))
    return model


def gray_png(height: int, width: int) -> str:
    """base64 of a flat 8-bit gray PNG: a few hundred bytes, whatever its size."""
    return base64.b64encode(encode_with_reference("png", np.full((height, width), 128, np.uint8))).decode("ascii")


def test_the_pyfunc_model_refuses_requests_over_its_limits_before_any_work(checkpoint, monkeypatch):
    """Rows, base64 length, pixels per image and per request, steps: each refused with the reason and the setting,
    before anything is denoised (and base64 or pixels decoded where the refusal is about them)."""
    import imagecodecs
    from mlflow.exceptions import MlflowException

    import ddim_denoise.serving.denoise_files as denoise_files_module
    from ddim_denoise.pipeline.errors import InputError
    from ddim_denoise.serving.pyfunc import LIMIT_VARIABLES

    limits = {"max_rows": 2, "max_base64_chars": 2000, "max_image_pixels": 1000, "max_request_pixels": 1500,
              "max_steps": 3}
    for name, value in limits.items():
        monkeypatch.setenv(LIMIT_VARIABLES[name], str(value))
    model = loaded_model(checkpoint)
    within = model.predict(None, pd.DataFrame({"image": [gray_png(20, 40)], "sigma": [0.1]}), {"steps": 3})
    assert within.shape == (1, 2)

    monkeypatch.setattr(denoise_files_module, "denoise_decoded", lambda *args, **kwargs: pytest.fail("denoised"))
    monkeypatch.setattr(imagecodecs, "png_decode", lambda *args, **kwargs: pytest.fail("pixels decoded"))
    cases = [({"image": [gray_png(8, 8)] * 3}, {}, "the request has 3 rows, over the limit of 2 (the server's "
                                                   "DDIM_DENOISE_MAX_ROWS); send fewer images per request"),
             ({"image": ["A" * 2004]}, {}, "row 0: the image's base64 text has 2,004 characters, over the limit of "
                                           "2,000 (the server's DDIM_DENOISE_MAX_BASE64_CHARS)"),
             ({"image": [gray_png(8, 8), gray_png(100, 100)]}, {}, "row 1: image: the image has 10,000 pixels, over "
                                                                   "the limit of 1,000; crop or downscale it, or "
                                                                   "raise the server's DDIM_DENOISE_MAX_IMAGE_PIXELS"),
             ({"image": [gray_png(20, 40)] * 2}, {}, "the request's images have 1,600 pixels in all, over the limit "
                                                     "of 1,500 (the server's DDIM_DENOISE_MAX_REQUEST_PIXELS)"),
             ({"image": [gray_png(8, 8)]}, {"steps": 4}, "steps is 4, over the limit of 3 (the server's "
                                                         "DDIM_DENOISE_MAX_STEPS)"),
             ({"image": [gray_png(8, 8)] * 2, "sigma": [0.1, 1.5]}, {}, "row 1: sigma must lie in")]
    for index, (columns, params, message) in enumerate(cases):
        with monkeypatch.context() as no_base64:
            if index < 2:  # refused before any base64 is decoded; the others need the headers
                no_base64.setattr(base64, "b64decode", lambda *args, **kwargs: pytest.fail("base64 decoded"))
            with pytest.raises(MlflowException, match=re.escape(message)) as refused:
                model.predict(None, pd.DataFrame(columns), params)
        assert refused.value.get_http_status_code() == 400

    monkeypatch.setenv(LIMIT_VARIABLES["max_rows"], "many")
    with pytest.raises(InputError, match="DDIM_DENOISE_MAX_ROWS='many': expected a whole number >= 1"):
        loaded_model(checkpoint)


def test_a_run_artifact_without_a_run_id_is_refused(tmp_path, checkpoint):
    """``--run-artifact`` names a checkpoint in a training run; without ``--run-id`` it was silently ignored."""
    image = tmp_path / "photo.png"
    image.write_bytes(rgb_png16())
    result = CliRunner().invoke(app, ["denoise", str(image), "-o", str(tmp_path / "out"), "--sigma", "0.1",
                                      "-c", str(checkpoint), "--run-artifact", "checkpoints/last.pt"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "give --run-id too" in lines[0], result.output
    assert not (tmp_path / "out").exists()


# --- REST serving ---------------------------------------------------------------------------------------------------

def post_json(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_denoises_over_rest(mlflow_store, checkpoint, tmp_path):
    _, info = log_model(mlflow_store, checkpoint)
    env = {"MLFLOW_TRACKING_URI": mlflow_store["uri"], "DDIM_DENOISE_MAX_IMAGE_PIXELS": "10000"}
    with served_model(f"models:/{REGISTERED_NAME}/{info.registered_model_version}", env,
                      log=tmp_path / "server.log", start_timeout_s=SERVER_START_TIMEOUT_S) as server:
        url = server.url
        png16 = rgb_png16()
        status, body = post_json(url, {"dataframe_split": {"columns": ["image", "sigma"],
                                                           "data": [[base64.b64encode(png16).decode(), 0.1]]},
                                       "params": {"steps": 1}})
        assert status == 200, body
        row = body["predictions"][0]
        expected = Denoiser.from_checkpoint(checkpoint, device="cpu").denoise(decode_image(png16).rgb[None], 0.1)[0]
        np.testing.assert_array_equal(decode_bytes_with_reference(base64.b64decode(row["image"])),
                                      quantize(expected, np.uint16))
        assert row["sigma"] == pytest.approx(0.1)

        status, body = post_json(url, {"dataframe_split": {"columns": ["image", "sigma"],
                                                           "data": [[base64.b64encode(b"text").decode(), 0.1]]}})
        assert status == 400 and "not a PNG" in body.get("message", ""), body

        status, body = post_json(url, {"dataframe_split": {"columns": ["image"], "data": [[gray_png(200, 200)]]}})
        assert status == 400 and "the image has 40,000 pixels, over the limit of 10,000; crop or downscale it, or " \
                                 "raise the server's DDIM_DENOISE_MAX_IMAGE_PIXELS" in body.get("message", ""), body
