"""Named profiles: each composes into valid params, and the committed params.yaml is the default profile's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from profiles import compose_params

from ddim_denoise.pipeline.params import CONF_DIR, validate_params

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (CONF_DIR / "profile").glob("*.yaml"))


def test_the_committed_params_yaml_is_what_dvc_exp_run_composes():
    """Edited conf/ without recomposing (or params.yaml edited by hand) would make `dvc repro` and `dvc exp run`
    train different things."""
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == compose_params(CONF_DIR)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_valid_and_names_itself(profile):
    params = validate_params(compose_params(CONF_DIR, [f"profile={profile}"]), source=profile)
    assert params.profile == profile


def test_the_profiles_differ_where_it_matters():
    quick, cpu, gpu = (validate_params(compose_params(CONF_DIR, [f"profile={name}"]))
                       for name in ("quick", "cpu", "gpu"))
    assert set(PROFILES) == {"quick", "cpu", "gpu"}
    assert quick.train.max_train_images and quick.train.epochs < cpu.train.epochs < gpu.train.epochs
    assert cpu.train.max_train_images is None and gpu.train.max_train_images is None
    assert gpu.model.base_channels > cpu.model.base_channels and gpu.train.batch_size > cpu.train.batch_size


def test_a_single_param_overrides_the_profile():
    params = validate_params(compose_params(CONF_DIR, ["profile=cpu", "train.lr=1e-3"]))
    assert params.train.lr == 1e-3 and params.train.epochs == 10
