"""Named profiles: each composes into valid params, and the committed params.yaml is the default profile's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ddim_denoise.pipeline.params import CONF_DIR, load_params, validate_params
from ddim_denoise.pipeline.params_file import set_values
from ddim_denoise.pipeline.profiles import compose_params, profile_file, write_params_yaml

pytestmark = pytest.mark.usefixtures("package_conf_unchanged")

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (CONF_DIR / "profile").glob("*.yaml"))


def test_the_committed_params_yaml_is_what_dvc_exp_run_composes():
    """Edited conf/ without recomposing (or params.yaml edited by hand) would make `dvc repro` and `dvc exp run`
    train different things."""
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == compose_params()


@pytest.mark.parametrize("study, profile", [("pipelines/results/photos", "photos"), ("pipelines/sweep/gpu", "gpu"),
                                            ("pipelines/results/recipes/cpu", "cpu"),
                                            ("pipelines/results/recipes/gpu", "gpu")])
def test_a_study_params_yaml_is_its_profile_composed_as_its_header_says(study, profile):
    """A study's own params.yaml (the photos worked example, the GPU search, the recipes) is a profile with the
    overrides its header lists, composed: a changed profile must reach the study's figures."""
    path = REPO / study / "params.yaml"
    header = "".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    overrides = yaml.safe_load(header.split("write_params_yaml(path, ", 1)[1].split("])", 1)[0] + "]")
    assert overrides[0] == f"profile={profile}"
    assert yaml.safe_load(path.read_text()) == compose_params(overrides)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_valid_and_names_itself(profile):
    params = validate_params(compose_params([f"profile={profile}"]), source=profile)
    assert params.profile == profile


def test_the_profiles_differ_where_it_matters():
    quick, cpu, gpu, photos = (validate_params(compose_params([f"profile={name}"]))
                               for name in ("quick", "cpu", "gpu", "photos"))
    assert set(PROFILES) == {"quick", "cpu", "gpu", "photos"}
    assert {p.data.source for p in (quick, cpu, gpu)} == {"cifar10"} and photos.data.source == "folder"
    assert photos.train.rot90 and not quick.train.rot90
    assert quick.train.max_train_images and quick.train.epochs < cpu.train.epochs < gpu.train.epochs
    assert cpu.train.max_train_images is None and gpu.train.max_train_images is None
    assert gpu.model.base_channels > cpu.model.base_channels and gpu.train.batch_size > cpu.train.batch_size


def test_a_single_param_overrides_the_profile():
    params = validate_params(compose_params(["profile=cpu", "train.lr=1e-3"]))
    assert params.train.lr == 1e-3 and params.train.epochs == 10


def test_values_applied_to_a_profile_keep_its_comments_and_reach_params_yaml(tmp_path):
    """`sweep best --apply` writes a trial's values into the profile params.yaml came from (adding the sections a
    profile leaves out), then composes params.yaml again, as the next `dvc exp run` would."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    changes = set_values(profile_file("quick", conf), {"train.lr": 5e-4, "diffusion.prediction": "v"},
                         add_sections=True)
    assert changes == [("train.lr", 2e-3, 5e-4), ("diffusion.prediction", None, "v")]
    assert "# A first look on a laptop CPU" in profile_file("quick", conf).read_text()
    write_params_yaml(tmp_path / "params.yaml", ["profile=quick"], conf_dir=conf)
    params = load_params(tmp_path / "params.yaml")
    assert params.profile == "quick" and params.train.epochs == 3  # the profile's own budget, with the values
    assert (params.train.lr, params.diffusion.prediction) == (5e-4, "v")
