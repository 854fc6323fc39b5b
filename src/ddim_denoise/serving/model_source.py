"""Where a checkpoint comes from: a local file, a training run's artifact, or a model logged/registered in MLflow.

Training logs its checkpoints as run artifacts under ``checkpoints/`` (``best.pt`` on every new best validation
PSNR), so ``--run-id`` fetches one of those. ``serving.log_pyfunc_model`` stores the checkpoint inside the pyfunc
model as the artifact named ``checkpoint``, so a ``models:/name/version`` (or ``models:/name@alias``,
``runs:/id/name``, ``models:/m-...``) URI is resolved through the model's MLmodel file. Downloads go to a temporary
folder that lives only as long as the ``with`` block: the caller loads the weights inside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ddim_denoise.pipeline.errors import InputError

DEFAULT_CHECKPOINT = "models/best.pt"
DEFAULT_RUN_ARTIFACT = "checkpoints/best.pt"


def _use_project_tracking() -> None:
    import mlflow

    from ddim_denoise.pipeline.tracking import default_tracking_uri

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


def _first_line(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def checkpoint_in_model_dir(model_dir: Path, source: str) -> Path:
    """The checkpoint file inside a downloaded pyfunc model, as its MLmodel file records it."""
    from mlflow.models import Model

    from ddim_denoise.serving.pyfunc import CHECKPOINT_ARTIFACT

    try:
        model = Model.load(str(model_dir))
    except Exception as e:
        raise InputError(f"{source}: not an MLflow model ({_first_line(e)})") from None
    artifacts = model.flavors.get("python_function", {}).get("artifacts") or {}
    entry = artifacts.get(CHECKPOINT_ARTIFACT)
    if not entry:
        raise InputError(f"{source}: the model holds no '{CHECKPOINT_ARTIFACT}' artifact; log it with "
                         "ddim_denoise.serving.pyfunc.log_pyfunc_model")
    return model_dir / entry["path"]


@contextlib.contextmanager
def resolved_checkpoint(checkpoint: str | Path | None = None, run_id: str | None = None,
                        model_uri: str | None = None, run_artifact: str | None = None) -> Iterator[Path]:
    """Yield a local checkpoint path from exactly one of the three sources (none given: ``models/best.pt``).
    ``run_artifact``: the checkpoint's path among the ``run_id``'s artifacts (default ``checkpoints/best.pt``)."""
    given = [name for name, value in (("--checkpoint", checkpoint), ("--run-id", run_id), ("--model-uri", model_uri))
             if value]
    if len(given) > 1:
        raise InputError(f"give one model source, not {' and '.join(given)}")
    if run_artifact and not run_id:
        raise InputError(f"--run-artifact {run_artifact} names a checkpoint in a training run: give --run-id too")
    if not run_id and not model_uri:
        yield Path(checkpoint or DEFAULT_CHECKPOINT)
        return
    import mlflow

    _use_project_tracking()
    with tempfile.TemporaryDirectory(prefix="ddim-denoise-model-") as tmp:
        try:
            if run_id:
                source = f"--run-id {run_id}"
                artifact = run_artifact or DEFAULT_RUN_ARTIFACT
                path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp))
            else:
                source = f"--model-uri {model_uri}"
                model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
                path = checkpoint_in_model_dir(model_dir, source)
        except InputError:
            raise
        except Exception as e:  # unknown run / model / version, missing artifact, unreachable store
            raise InputError(f"{source}: cannot fetch the checkpoint ({_first_line(e)})") from None
        yield path
