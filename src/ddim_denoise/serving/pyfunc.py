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

What the model was trained on is in the MLmodel file's ``metadata`` (``model_metadata``: ``trained_on`` in words,
``training_image_side``, ``data_source``; ``mlflow.models.get_model_info(uri).metadata``), and is logged at INFO as
the model loads. A model trained on CIFAR-10 logs a warning (on the server's stderr), once per serving process, when
asked for a picture far larger than its thumbnails (``denoising/trained_on.py``). The response is unchanged.

Each request is bounded before any image is decoded (``RequestLimits``, set by environment variables of the serving
process): rows, base64 characters per image (checked before base64 decoding), pixels per image and per request (read
from the image headers), DDIM steps. A request over a limit answers HTTP 400 naming it.

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
import os
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Mapping

import mlflow.pyfunc
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"
DEFAULT_MODEL_NAME = "denoiser"  # the model's name inside the run
# The distributions the package's code imports while the model loads and predicts, pinned to the versions it was
# logged with (``serving_requirements``). The package itself travels as code (``code_paths``), never as a
# requirement: a name on a package index is anyone's to publish.
SERVING_REQUIREMENTS = ("torch", "numpy", "scipy", "pandas", "pillow", "imagecodecs", "tifffile", "pydantic", "pyyaml",
                        "mlflow")


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("double", "sigma", required=False)]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("double", "sigma")]),
        params=ParamSchema([ParamSpec("steps", "long", 1), ParamSpec("eta", "double", 0.0),
                            ParamSpec("mono_noise", "boolean", False),
                            ParamSpec("detect_mono_noise", "boolean", False)]),
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


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the server. Rows are denoised one after another, so memory in flight is about one
    image's, and a request's time grows with its pixels times its steps."""

    max_rows: int = 64  # images per request
    # 64 Mi characters of base64 = 48 MiB of file: a noisy 16-megapixel 8-bit RGB PNG (noise hardly compresses).
    # The server holds the JSON text, the DataFrame's strings and the decoded bytes of every row at once.
    max_base64_chars: int = 64 * 2**20
    # 16 megapixels per image: a modern photo, and about 1 GB in flight (float32 RGB, tile accumulators, output);
    # larger images are for the command line (`ddim-denoise denoise --max-pixels`)
    max_image_pixels: int = 16_000_000
    max_request_pixels: int = 32_000_000  # the request's total: bounds its time at one step
    max_steps: int = 50  # DDIM steps: each is a full model pass over every pixel (10-50 is DDIM's usual range)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "RequestLimits":
        """The defaults, each overridden by its environment variable (``LIMIT_VARIABLES``) when set."""
        from ddim_denoise.pipeline.errors import InputError

        values = {}
        for name, variable in LIMIT_VARIABLES.items():
            text = environ.get(variable)
            if text is None:
                continue
            try:
                values[name] = int(text)
            except ValueError:
                values[name] = 0
            if values[name] < 1:
                raise InputError(f"{variable}={text!r}: expected a whole number >= 1 (default {getattr(cls, name)})")
        return cls(**values)

    def decode_limits(self):
        from ddim_denoise.data.image_io import DecodeLimits

        return DecodeLimits(self.max_image_pixels, setting=_setting("max_image_pixels"))


LIMIT_VARIABLES = {field.name: f"DDIM_DENOISE_{field.name.upper()}" for field in fields(RequestLimits)}


def _setting(limit: str) -> str:
    return f"the server's {LIMIT_VARIABLES[limit]}"


def _over(what: str, limits: RequestLimits, limit: str, fix: str):
    """The HTTP 400 for a request over a limit: what it asked, the limit, the variable that sets it, the fix."""
    return _invalid(f"{what}, over the limit of {getattr(limits, limit):,} ({_setting(limit)}); {fix}")


def _row_bytes(value, row: int, limits: RequestLimits) -> bytes:
    """The image file's bytes of one row, its base64 length checked before decoding."""
    if isinstance(value, (bytes, bytearray)):  # a Python caller's raw bytes: counted as their base64 would be
        size = 4 * math.ceil(len(value) / 3)
    else:
        value = str(value)
        size = len(value)
    if size > limits.max_base64_chars:
        raise _over(f"row {row}: the image's base64 text has {size:,} characters", limits, "max_base64_chars",
                    "send a smaller file, or use the command line for large images")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return base64.b64decode("".join(value.split()), validate=True)  # `base64` wraps its lines at 76
    except (binascii.Error, ValueError):
        raise _invalid(f"row {row}: 'image' is not the base64 text of an image file") from None


def _row_sigma(value):
    """None (estimate) for a missing sigma: pandas turns JSON nulls into None or NaN. Anything else is validated
    later with the same rule as the command line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def model_metadata(params) -> dict:
    """The MLmodel file's ``metadata``: which data the checkpoint's model was trained on, and at what size."""
    from ddim_denoise.denoising.trained_on import trained_on, training_side

    return {"trained_on": trained_on(params), "training_image_side": training_side(params),
            "data_source": params.data.source}


class DenoiserModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: decodes each row's image, denoises it as ``ddim-denoise denoise`` would, re-encodes it."""

    def load_context(self, context):
        from ddim_denoise.denoising.denoiser import Denoiser
        from ddim_denoise.denoising.trained_on import trained_on

        self.denoiser = Denoiser.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        log.info("serving a model trained on %s", trained_on(self.denoiser.params))
        self.limits = RequestLimits.from_environment()  # read as the server starts: a bad value stops it there

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from ddim_denoise.data.image_io import decode_image, encode_image
        from ddim_denoise.pipeline.errors import InputError
        from ddim_denoise.serving.denoise_files import denoise_decoded

        checked = self._checked_rows(pd.DataFrame(model_input), params or {})
        images, used = [], []
        for row, (data, options) in enumerate(checked):
            try:
                image = decode_image(data, "image", self.limits.decode_limits())
                result = denoise_decoded(self.denoiser, image, options)
            except InputError as e:
                raise _invalid(f"row {row}: {e}") from None
            images.append(base64.b64encode(encode_image(result.rgb, image, options.quality)).decode("ascii"))
            used.append(result.sigma)
        return pd.DataFrame({"image": images, "sigma": np.asarray(used, dtype=np.float64)})

    def _checked_rows(self, frame: pd.DataFrame, params: dict) -> list:
        """(file bytes, options) per row, once the whole request is within ``self.limits`` and every option and
        sigma is valid: a bad last row costs no work on the others. Nothing is decoded but base64 and headers."""
        from ddim_denoise.data.image_io import image_pixels
        from ddim_denoise.pipeline.errors import InputError
        from ddim_denoise.serving.denoise_files import DenoiseOptions

        limits = self.limits
        if "image" not in frame.columns:
            raise _invalid("the input needs an 'image' column (base64 of an image file) and optionally 'sigma'")
        if len(frame) > limits.max_rows:
            raise _over(f"the request has {len(frame):,} rows", limits, "max_rows", "send fewer images per request")
        steps = int(params.get("steps", 1))
        if steps > limits.max_steps:
            raise _over(f"steps is {steps:,}", limits, "max_steps", "ask for fewer DDIM steps")
        base = DenoiseOptions(steps=steps, eta=float(params.get("eta", 0.0)),
                              mono_noise="auto" if params.get("detect_mono_noise") else
                              bool(params.get("mono_noise", False)))
        sigmas = frame["sigma"] if "sigma" in frame.columns else [None] * len(frame)
        checked, total_pixels = [], 0
        for row, (value, sigma) in enumerate(zip(frame["image"], sigmas, strict=True)):
            data = _row_bytes(value, row, limits)
            try:
                options = replace(base, sigma=_row_sigma(sigma)).validate()
                total_pixels += image_pixels(data, "image", limits.decode_limits())
            except InputError as e:
                raise _invalid(f"row {row}: {e}") from None
            checked.append((data, options))
        if total_pixels > limits.max_request_pixels:
            raise _over(f"the request's images have {total_pixels:,} pixels in all", limits, "max_request_pixels",
                        "send fewer or smaller images per request")
        return checked


def serving_requirements() -> list[str]:
    """``name==version`` of each of ``SERVING_REQUIREMENTS`` as installed here (a local version label such as
    torch's ``+cpu`` dropped: package indexes do not carry it). Raises when one is not installed: a requirement
    without its version would install whatever the index holds under that name."""
    pins = []
    for name in SERVING_REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{name} is not installed here, so its version cannot be pinned; install it") from None
    return pins


def _model_arguments(checkpoint_path: str | Path) -> dict:
    """What ``log_pyfunc_model`` and ``save_pyfunc_model`` store alike: code, checkpoint, signature, requirements,
    and what the model was trained on."""
    from ddim_denoise.denoising.denoiser import Denoiser

    checkpoint_path = Path(checkpoint_path)
    denoiser = Denoiser.from_checkpoint(checkpoint_path, device="cpu")  # refuse a bad checkpoint before storing it
    return dict(
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: nothing is pickled
        artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_path)},
        code_paths=[str(Path(__file__).parents[1])],  # the whole ddim_denoise package
        signature=model_signature(),
        input_example=input_example(),
        pip_requirements=serving_requirements(),
        metadata=model_metadata(denoiser.params),
    )


def log_pyfunc_model(checkpoint_path: str | Path, registered_model_name: str | None = None,
                     metrics: dict[str, float] | None = None, name: str = DEFAULT_MODEL_NAME):
    """Log the checkpoint as a servable pyfunc model into the active MLflow run (MLflow starts one if none is).

    ``registered_model_name`` also registers it in the Model Registry (a new version per call), so it can be served
    as ``models:/<name>/<version>``; ``metrics`` (e.g. test PSNR) are logged on the run and linked to the model.
    Returns MLflow's ModelInfo (``model_uri``, ``registered_model_version``, ...).
    """
    import mlflow

    info = mlflow.pyfunc.log_model(name=name, registered_model_name=registered_model_name,
                                   **_model_arguments(checkpoint_path))
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=info.model_id)
    return info


def save_pyfunc_model(checkpoint_path: str | Path, path: str | Path) -> Path:
    """The same model as ``log_pyfunc_model`` logs, saved as a folder (no tracking store): ``mlflow models serve
    -m PATH`` serves it. ``path`` must not exist yet."""
    mlflow.pyfunc.save_model(path=str(path), **_model_arguments(checkpoint_path))
    return Path(path)


def log_evaluated_model(checkpoint_path: str | Path, run_id: str, registered_model_name: str | None,
                        metrics: dict[str, float] | None = None):
    """Log the evaluated checkpoint's EMA weights as a pyfunc model into the training's run, with its test metrics,
    and register it as a new version of ``registered_model_name`` unless that is None. This is the training run's
    only model: training logs none of its own. Never raises: a failure is a warning (the evaluation's own files and
    metrics already stand)."""
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
            if registered_model_name:
                log.info("registered %s version %s", registered_model_name, info.registered_model_version)
            return info
    except Exception as e:
        log.warning("model not logged to MLflow (%s: %s)", type(e).__name__, e)
        return None
