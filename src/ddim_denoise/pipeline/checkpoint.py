"""Checkpoints and other files written atomically, and read back without unpickling arbitrary objects.

A write goes to a temporary file in the same folder, is flushed to disk, then renamed over the target: a reader (or a
resumed run after a kill -9) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "ddim-denoise/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, tampered with, or from another architecture."""


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train first (ddim-denoise train) or pass the right path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, tampered pickle, foreign objects: all refused the same way
        raise CheckpointError(f"checkpoint {path} cannot be read safely ({type(e).__name__}): "
                              "it is truncated, corrupt or not a ddim-denoise checkpoint; retrain or restore it") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def load_model_weights(model, state: dict, path: str | Path, fix: str, weights: str = "ema") -> None:
    """Load a checkpoint's EMA weights (its raw weights if it has none, or ``weights="model"``) into ``model``: one
    line naming ``path`` and ``fix`` when the architectures differ."""
    try:
        model.load_state_dict(state["model"] if weights == "model" else state.get("ema") or state["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0]}): {fix}") from None
