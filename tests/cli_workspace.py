"""Tiny on-disk projects for tests that run ``ddim-denoise`` as real processes (plain, under torchrun, killed).

``make_workspace`` writes what the pipeline's first stage leaves behind: a tiny CIFAR-10 in ``data/raw``, its
prepared splits and a ``params.yaml``, all relative to the folder, so commands run with that folder as their working
directory exactly as ``dvc repro`` runs them. ``cli`` and ``torchrun`` build the command lines; ``process_env`` points
the processes at a given MLflow store and keeps each on one thread (the test machine has two cores, shared).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from cifar_fixtures import write_cifar_npz

from ddim_denoise.data.cifar10 import IMAGE_SHAPE, TRAIN_BATCHES
from ddim_denoise.data.prepared import prepare
from ddim_denoise.pipeline.params import Params, set_dotted, validate_params
from ddim_denoise.serving.model_server import free_port  # noqa: F401 (the tests take it from here)

IMAGES_PER_BATCH_FILE = 8  # 5 batch files -> 40 training images, VAL_SIZE of them held out
VAL_SIZE = 8
TRAIN_IMAGES = len(TRAIN_BATCHES) * IMAGES_PER_BATCH_FILE - VAL_SIZE
TEST_IMAGES = 4


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC colour gradients: structure a tiny model learns within a few steps, unlike random pixels."""
    height, width, channels = IMAGE_SHAPE
    ramp_y, ramp_x = np.linspace(0, 1, height), np.linspace(0, 1, width)
    colours = np.random.default_rng(seed).uniform(0, 1, (n, 1, 1, channels))
    return (255 * colours * ramp_y[None, :, None, None] * ramp_x[None, None, :, None]).astype(np.uint8)


def make_workspace(root: Path, params: Params, overrides: dict[str, object] | None = None,
                   learnable: bool = False) -> Params:
    """Write data/raw, data/prepared and params.yaml (``params`` with dotted ``overrides``) under ``root``; return
    the params as written. ``learnable`` swaps the random training pixels for smooth images."""
    raw = params.model_dump()
    for key, value in {"data.val_size": VAL_SIZE, "data.download": False, "mlflow.log_model": False,
                       **(overrides or {})}.items():
        set_dotted(raw, key, value)
    written = validate_params(raw)
    images = {"x_train": smooth_images(TRAIN_IMAGES + VAL_SIZE)} if learnable else {}
    with contextlib.chdir(root):
        write_cifar_npz(written.data.raw_dir, IMAGES_PER_BATCH_FILE, TEST_IMAGES, **images)
        prepare(written)
        Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return written


def with_train(params: Params, **changes) -> Params:
    """params with train.KEY=VALUE changes, validated."""
    raw = params.model_dump()
    for key, value in changes.items():
        set_dotted(raw, f"train.{key}", value)
    return validate_params(raw)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddim_denoise.cli", *args]


def torchrun(nproc_per_node: int, *args: str) -> list[str]:
    """``torchrun --nproc-per-node N -m ddim_denoise.cli ARGS``, meeting on a free port of 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "ddim_denoise.cli", *args]


def process_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            **extra}


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summary(root: Path) -> dict:
    return json.loads((root / "training" / "summary.json").read_text())


def one_error_line(result, logs_allowed: bool = False) -> str:
    """The CLI's answer to an expected failure (a CliRunner result): exit code 2 and one 'error: ' line on stderr,
    no traceback; with ``logs_allowed``, after the log lines of work that had started (training, say)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert logs_allowed or lines == errors, result.output
    return errors[0]
