import os

import pytest
import torch

from ddim_denoise.pipeline.params import CONF_DIR

PACKAGE_CONF_DIR = CONF_DIR  # taken before any test points params.CONF_DIR at a copy

# The CI machine has 2 cores; tests that run beside each other should not each spawn a full thread pool.
torch.set_num_threads(1)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture
def tiny_params():
    """A Params object for a tiny, fast model and run (override fields per test)."""
    from ddim_denoise.pipeline.params import validate_params

    return validate_params({
        "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                  "num_heads": 2, "groups": 4, "dropout": 0.0},
        "diffusion": {"T": 100},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0, "val_images": 8, "log_every": 1,
                  "checkpoint_every": 1, "val_every": 1, "amp": "off", "device": "cpu", "channels_last": False},
        "eval": {"n_images": 8, "bm3d_images": 2, "nlm_images": 4, "sigmas": [0.1, 0.3], "ddim_steps": 3,
                 "batch_size": 4, "grid_images": 2},
    })


@pytest.fixture
def package_conf_unchanged():
    """Fails a test that changed, added or removed a file of the package's conf/ (the defaults and profiles every
    run composes): `sweep best --apply` writes into a profile, so its tests must aim it at a copy (the sweep tests'
    workspace does)."""

    def snapshot() -> dict:
        return {path.relative_to(PACKAGE_CONF_DIR).as_posix(): path.read_bytes()
                for path in sorted(PACKAGE_CONF_DIR.rglob("*")) if path.is_file()}

    before = snapshot()
    yield
    after = snapshot()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the test changed the package's conf/: {changed} (git status lists them)"
