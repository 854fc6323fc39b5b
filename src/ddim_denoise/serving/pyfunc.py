"""The denoiser as an MLflow pyfunc model: logged with its checkpoint, registered, served over REST.

Input: a pandas DataFrame, one row per image, which ``mlflow models serve`` accepts as ``dataframe_split`` JSON.

- ``image`` (string): the base64 of an image file's bytes: PNG, JPEG, TIFF, WebP or .npy; 8- or 16-bit; gray, RGB
  or RGBA; any size (large images are denoised in tiles).
- ``sigma`` (double, optional): the noise level on the [0, 1] pixel scale (0.1 = 25.5/255); null or absent:
  estimated from the image.

Inference params (optional): ``steps`` (DDIM steps, default 1), ``eta`` (default 0.0), ``mono_noise`` (default
false: true when every colour image's noise is one draw copied to R, G and B, as ``ddim-denoise denoise --mono-noise``),
``detect_mono_noise`` (default false: decide that per image instead, as ``--detect-mono-noise``).

Output: one row per input, ``image`` (base64 of the denoised file, in the input's format, bit depth and channels,
alpha untouched) and ``sigma`` (the level used). A bad image or sigma answers HTTP 400 with the reason.

Serve and call (port 5001 here)::

    mlflow models serve -m models:/ddim-denoiser/1 --env-manager local -h 127.0.0.1 -p 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{
      "dataframe_split": {"columns": ["image", "sigma"],
                          "data": [["'"$(base64 -w0 noisy.png)"'", 0.1]]},
      "params": {"steps": 1}}' | python -c '
    import base64, json, sys
    row = json.load(sys.stdin)["predictions"][0]
    open("denoised.png", "wb").write(base64.b64decode(row["image"])); print("sigma", row["sigma"])'

The checkpoint travels as the model's artifact ``checkpoint`` and the package's code travels with it (``code_paths``;
``pyfunc_model.py`` is the models-from-code entry point, so nothing is unpickled on loading): the model runs wherever
its pip requirements are installed.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_MODEL_NAME = "denoiser"  # the model's name inside the run
# distributions the model needs at serving time, pinned to the versions it was logged with
SERVING_REQUIREMENTS = ("torch", "numpy", "pandas", "pillow", "imagecodecs", "tifffile", "scikit-image", "PyWavelets",
                        "pydantic", "pyyaml", "mlflow")


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("double", "sigma", required=False)]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("double", "sigma")]),
        params=ParamSchema([ParamSpec("steps", "long", 1), ParamSpec("eta", "double", 0.0),
                            ParamSpec("mono_noise", "boolean", False), ParamSpec("detect_mono_noise", "boolean", False)]),
    )


def input_example(side: int = 16, sigma: float = 0.1) -> pd.DataFrame:
    """A one-row request (a small gray-ramp PNG): stored with the model as a ready-made REST payload."""
    import imagecodecs

    ramp = np.linspace(0, 255, side * side, dtype=np.float64).reshape(side, side).round().astype(np.uint8)
    return pd.DataFrame({"image": [base64.b64encode(bytes(imagecodecs.png_encode(ramp))).decode("ascii")],
                         "sigma": [sigma]})


def _invalid(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # the scoring server answers 400


def _row_bytes(value, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return base64.b64decode("".join(str(value).split()), validate=True)  # `base64` wraps its lines at 76
    except (binascii.Error, ValueError):
        raise _invalid(f"row {row}: 'image' is not the base64 text of an image file") from None


def _row_sigma(value):
    """None (estimate) for a missing sigma: pandas turns JSON nulls into None or NaN. Anything else is validated
    later with the same rule as the command line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


class DenoiserModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: decodes each row's image, denoises it as ``ddim-denoise denoise`` would, re-encodes it."""

    def load_context(self, context):
        from ddim_denoise.denoising.denoiser import Denoiser

        self.denoiser = Denoiser.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from ddim_denoise.pipeline.errors import InputError
        from ddim_denoise.serving.denoise_files import DenoiseOptions, denoise_decoded
        from ddim_denoise.serving.image_io import decode_image, encode_image

        frame = pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise _invalid("the input needs an 'image' column (base64 of an image file) and optionally 'sigma'")
        sigmas = frame["sigma"] if "sigma" in frame.columns else [None] * len(frame)
        params = params or {}
        images, used = [], []
        for row, (value, sigma) in enumerate(zip(frame["image"], sigmas, strict=True)):
            try:
                options = DenoiseOptions(sigma=_row_sigma(sigma), steps=int(params.get("steps", 1)),
                                         eta=float(params.get("eta", 0.0)),
                                         mono_noise="auto" if params.get("detect_mono_noise") else
                                         bool(params.get("mono_noise", False))).validate()
                image = decode_image(_row_bytes(value, row), source="image")
                result = denoise_decoded(self.denoiser, image, options)
            except InputError as e:
                raise _invalid(f"row {row}: {e}") from None
            images.append(base64.b64encode(encode_image(result.rgb, image, options.quality)).decode("ascii"))
            used.append(result.sigma)
        return pd.DataFrame({"image": images, "sigma": np.asarray(used, dtype=np.float64)})


def serving_requirements() -> list[str]:
    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc_model(checkpoint_path: str | Path, registered_model_name: str | None = None,
                     metrics: dict[str, float] | None = None, name: str = DEFAULT_MODEL_NAME):
    """Log the checkpoint as a servable pyfunc model into the active MLflow run (MLflow starts one if none is).

    ``registered_model_name`` also registers it in the Model Registry (a new version per call), so it can be served
    as ``models:/<name>/<version>``; ``metrics`` (e.g. test PSNR) are logged on the run and linked to the model.
    Returns MLflow's ModelInfo (``model_uri``, ``registered_model_version``, ...).
    """
    import mlflow

    from ddim_denoise.denoising.denoiser import Denoiser

    checkpoint_path = Path(checkpoint_path)
    Denoiser.from_checkpoint(checkpoint_path, device="cpu")  # refuse a bad checkpoint before uploading it
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: nothing is pickled
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
        code_paths=[str(Path(__file__).parents[1])],  # the whole ddim_denoise package
        signature=model_signature(),
        input_example=input_example(),
        pip_requirements=serving_requirements(),
        registered_model_name=registered_model_name,
    )
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info


def register_evaluated_model(checkpoint_path: str | Path, run_id: str, registered_model_name: str,
                             metrics: dict[str, float] | None = None):
    """Log the evaluated checkpoint's EMA weights as a pyfunc model into the training's run and register it as a
    new version of ``registered_model_name`` with its test metrics. Never raises: a registry failure is a warning
    (the evaluation's own files and metrics already stand)."""
    import tempfile

    from ddim_denoise.pipeline.checkpoint import load_checkpoint, save_checkpoint
    from ddim_denoise.pipeline.tracking import SafeRun, active_run

    try:
        state = load_checkpoint(checkpoint_path)
        with tempfile.TemporaryDirectory() as tmp, active_run(SafeRun(run_id)) as active:
            if active is None:
                return None
            weights = Path(tmp) / "best.pt"  # EMA weights and params only: no optimizer state to ship
            save_checkpoint(weights, {"params": state["params"], "epoch": state.get("epoch"), "ema": state["ema"]})
            info = log_pyfunc_model(weights, registered_model_name=registered_model_name, metrics=metrics)
            log.info("registered %s version %s", registered_model_name, info.registered_model_version)
            return info
    except Exception as e:
        log.warning("model not registered in MLflow (%s: %s)", type(e).__name__, e)
        return None
