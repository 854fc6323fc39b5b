"""Bad input at every entry point: one clear line on stderr, exit code 2, nothing written or half-written.

The library-level checks live beside their modules (tests/test_data.py for datasets, tests/test_denoise_files.py for
image files and ``denoise --sigma``); these tests drive the command line, as a user or `dvc repro` would.
"""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
import torch
from cifar_fixtures import _RunsCode, malicious_batch_bytes, write_cifar_folder, write_cifar_npz, write_cifar_tar
from cli_workspace import cli, make_workspace, one_error_line, process_env
from denoise_fixtures import write_tiny_checkpoint
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.denoising.denoiser import Denoiser, build_model
from ddim_denoise.pipeline.checkpoint import CHECKPOINT_FORMAT, CheckpointError, save_checkpoint
from ddim_denoise.pipeline.files import MANIFEST_FILE
from ddim_denoise.pipeline.params import ParamsError, default_params, load_params, set_dotted, validate_params
from ddim_denoise.pipeline.runtime import check_inductor_settings

QUICK_FAILURE_S = 30  # a params error must come before any data loading or training: seconds, even on a busy CI box


@pytest.fixture
def workspace(tmp_path, tiny_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path, make_workspace(tmp_path, tiny_params)


# --- params.yaml -----------------------------------------------------------------------------------------------------
def test_a_key_left_out_takes_conf_defaults_and_a_mapping_leaf_is_replaced_whole():
    """A params file, or a checkpoint written before a key existed, may leave keys out: they take conf/config.yaml's
    value. train.inductor is a value, not a section: a file's mapping replaces the default's, keys and all."""
    defaults = default_params()
    params = validate_params({"train": {"lr": 1e-3, "inductor": {}}, "eval": None})
    assert params.train.lr == 1e-3 and params.train.epochs == defaults["train"]["epochs"]
    assert params.train.inductor == {} and defaults["train"]["inductor"]
    assert params.eval.n_images == defaults["eval"]["n_images"]
    with pytest.raises(ParamsError, match="train: Input should be a valid dictionary"):
        validate_params({"train": 5})


def test_a_key_that_takes_auto_or_a_value_is_one_problem_naming_both():
    """pydantic reports each branch of 'auto' | int apart, under tags such as literal['auto']: one key, one problem."""
    with pytest.raises(ParamsError) as caught:
        validate_params({"train": {"compile": "yes please"}, "eval": {"workers": 0},
                         "model": {"channel_mult": [1, "x"]}})
    message = str(caught.value)
    assert message.startswith("params: 3 problem(s): ") and "literal" not in message
    assert "train.compile: Input should be 'auto' or a valid boolean" in message
    assert "eval.workers: Input should be 'auto' or greater than or equal to 1" in message
    assert "model.channel_mult.1: Input should be a valid integer" in message


@pytest.mark.parametrize("train, names", [
    ({"lr": 1e-4, "min_lr": 1e-3}, "train.min_lr at or below train.lr"),
    ({"epochs": 10, "warmup_epochs": 100}, "train.warmup_epochs at most train.epochs"),
])
def test_an_lr_schedule_that_cannot_work_is_refused_naming_the_fix(train, names):
    """Both ran without a word before: an LR that rose during its cosine decay, or a warm-up that never ended."""
    with pytest.raises(ParamsError, match=names):
        validate_params({"train": train})
    validate_params({"train": {"lr": 1e-3, "min_lr": 1e-3, "epochs": 2, "warmup_epochs": 2}})  # the edges are fine


def write_bad_params(root):
    """params.yaml with two problems: a misspelt key and a value of the wrong type."""
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("  epochs: 2\n", "  epochs: two\n  epoch_count: 3\n"))


def test_train_lists_every_params_problem_in_one_line_before_any_work(workspace):
    root, _ = workspace
    write_bad_params(root)
    start = time.monotonic()
    result = subprocess.run(cli("train"), cwd=root, env=process_env("sqlite:///unused.db"), capture_output=True,
                            text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: 2 problem(s)"), result.stderr
    assert "train.epochs:" in lines[0] and "train.epoch_count: Extra inputs are not permitted" in lines[0]
    assert elapsed < QUICK_FAILURE_S
    assert not (root / "models").exists() and not (root / "training").exists() and not (root / "unused.db").exists()


def test_an_inductor_setting_torch_lacks_stops_train_at_the_params(workspace):
    """Checked against torch._inductor.config with the rest of params.yaml, not when the first step compiles."""
    root, _ = workspace
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("  inductor:\n", "  inductor:\n    no_such_key: true\n"))
    line = one_error_line(CliRunner().invoke(app, ["train"]))
    assert line == ("error: params.yaml: 1 problem(s): train.inductor: Value error, torch._inductor.config has no "
                    "no_such_key; see that module for its keys")
    assert not (root / "models").exists() and not (root / "training").exists()
    assert validate_params({"train": {"inductor": {}}}).train.inductor == {}  # an empty mapping imports nothing


@pytest.mark.parametrize("key", ["patch", "__class__", "save_config", "triton"])
def test_an_attribute_of_the_inductor_config_module_is_not_a_setting(key):
    """The module's functions, dunders and sections are attributes, not settings torch.compile reads."""
    with pytest.raises(ValueError, match=rf"torch._inductor.config has no {key}; see that module for its keys"):
        check_inductor_settings({key: True})
    assert check_inductor_settings({"triton.cudagraphs": False, "max_autotune": False})


@pytest.mark.parametrize("command", [["train"], ["train", "--nproc-per-node", "2"], ["prepare"], ["fetch-data"],
                                     ["evaluate"], ["report"]])
def test_every_command_reads_params_the_same_way(workspace, command):
    root, _ = workspace
    write_bad_params(root)
    line = one_error_line(CliRunner().invoke(app, command))
    assert "2 problem(s)" in line and "train.epochs" in line and "train.epoch_count" in line


@pytest.mark.parametrize("override, message", [
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("train.amp=fp8", "train.amp: Input should be 'auto', 'bf16', 'fp16' or 'off'"),
    ("eval.sigmas=[0, 1.5]", "eval.sigmas: Value error, every sigma must lie in (0, 1]"),
    ("train.lr", "expected KEY=VALUE"),
    ("train.lr.x=1", "train.lr.x: train.lr is a value, not a section"),  # was a TypeError traceback
    ("train.inductor={no_such_key: true}", "train.inductor: Value error, torch._inductor.config has no no_such_key"),
])
def test_bad_overrides_are_one_line(workspace, override, message):
    assert message in one_error_line(CliRunner().invoke(app, ["train", "-S", override]))


def test_amp_off_means_off_as_yaml_1_1_reads_it(tmp_path):
    """PyYAML and DVC's -S read a bare `off` as False: `amp: off`, the documented way to train without AMP, was
    refused as "should be 'auto', 'bf16', 'fp16' or 'off'"."""
    from ddim_denoise.cli import parse_overrides

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  amp: off\neval:\n  amp: off\n")
    params = load_params(path)
    assert params.train.amp == params.eval.amp == "off"
    assert load_params(path, parse_overrides(["train.amp=off", "eval.amp=bf16"])).train.amp == "off"
    with pytest.raises(ParamsError, match="train.amp"):
        validate_params({"train": {"amp": True}})  # `on` is no setting


def test_a_negative_export_tolerance_is_refused_before_exporting(tmp_path):
    result = CliRunner().invoke(app, ["export", "--atol", "-1", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--atol" in result.output and not (tmp_path / "m.onnx").exists()


def test_an_empty_override_is_the_empty_string(tmp_path):
    """mlflow.registered_model: "" turns registering off; `-S mlflow.registered_model=` read as null was refused."""
    from ddim_denoise.cli import parse_overrides

    assert parse_overrides(["mlflow.registered_model=", "train.max_minutes=null"]) == {
        "mlflow.registered_model": "", "train.max_minutes": None}


@pytest.mark.parametrize("override, where", [("train.lr=.inf", "train.lr"),
                                             ("diffusion.p_mean=.nan", "diffusion.p_mean"),
                                             ("eval.sigmas=[0.1, .nan]", "eval.sigmas.1")])
def test_non_finite_numbers_in_params_are_refused(workspace, override, where):
    """Unbounded floats too: train.lr=inf used to 'train' to NaN weights and exit 0 with a best PSNR of -inf."""
    line = one_error_line(CliRunner().invoke(app, ["train", "-S", override]))
    assert f"{where}: Input should be a finite number" in line


def test_a_batch_larger_than_the_training_set_is_one_line_before_any_step(workspace):
    root, _ = workspace
    message = one_error_line(CliRunner().invoke(app, ["train", "-S", "train.max_train_images=3"]))
    assert "train.batch_size=8 is more than the 3 training images" in message
    assert not (root / "models").exists()


# --- datasets --------------------------------------------------------------------------------------------------------
def truncated_archive(raw, marker):
    archive = write_cifar_tar(raw)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])


def wrong_shape_npz(raw, marker):
    write_cifar_npz(raw, x_train=np.zeros((30, 32, 32), np.uint8))


def pickle_that_runs_code(raw, marker):
    folder = write_cifar_folder(raw)
    (folder / "data_batch_2").write_bytes(malicious_batch_bytes(os.system, f"touch '{marker}'"))


@pytest.mark.parametrize("corrupt, message", [
    (truncated_archive, "truncated or corrupt"),
    (wrong_shape_npz, "images must have shape (N, 32, 32, 3)"),
    (pickle_that_runs_code, "refusing to unpickle"),
])
def test_bad_dataset_leaves_the_prepared_data_as_it_was(workspace, corrupt, message):
    root, params = workspace
    prepared = root / params.data.prepared_dir
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    raw = root / params.data.raw_dir
    for old in raw.iterdir():
        old.unlink()
    marker = root / "payload-ran"
    corrupt(raw, marker)
    assert message in one_error_line(CliRunner().invoke(app, ["prepare"]))
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert MANIFEST_FILE in before


# --- checkpoints -----------------------------------------------------------------------------------------------------
def with_model(params, **changes):
    raw = params.model_dump()
    for key, value in changes.items():
        set_dotted(raw, f"model.{key}", value)
    return validate_params(raw)


def other_architecture(path, params, marker):
    """Weights of a wider U-Net under the tiny one's params."""
    wider, _ = build_model(with_model(params, base_channels=2 * params.model.base_channels))
    save_checkpoint(path, {"params": params.model_dump(), "model": wider.state_dict(), "ema": wider.state_dict()})


def code_in_the_pickle(path, params, marker):
    torch.save({"format": CHECKPOINT_FORMAT, "params": params.model_dump(),
                "ema": _RunsCode(os.system, f"touch '{marker}'")}, path)


def truncated(path, params, marker):
    write_tiny_checkpoint(path, params)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def foreign_tensors(path, params, marker):
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, path)


def not_a_checkpoint(path, params, marker):
    path.write_text("these are not the weights you are looking for")


def tampered_params(path, params, marker):
    raw = params.model_dump()
    raw["model"]["base_channels"] = "lots"
    model, _ = build_model(params)
    save_checkpoint(path, {"params": raw, "model": model.state_dict(), "ema": model.state_dict()})


def missing(path, params, marker):
    pass


CHECKPOINTS = {
    other_architecture: (CheckpointError, "does not match the architecture it declares"),
    code_in_the_pickle: (CheckpointError, "cannot be read safely"),
    truncated: (CheckpointError, "cannot be read safely"),
    foreign_tensors: (CheckpointError, f"is not a {CHECKPOINT_FORMAT} checkpoint"),
    not_a_checkpoint: (CheckpointError, "cannot be read safely"),
    tampered_params: (ParamsError, "model.base_channels"),
    missing: (CheckpointError, "not found"),
}


def test_the_code_in_the_pickle_is_real(tmp_path, tiny_params):
    """Control for the refusals below: an unguarded torch.load does run the payload."""
    marker = tmp_path / "ran"
    code_in_the_pickle(tmp_path / "evil.pt", tiny_params, marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("make", CHECKPOINTS, ids=lambda make: make.__name__)
def test_bad_checkpoint_is_refused_by_the_library(tmp_path, tiny_params, make):
    error, message = CHECKPOINTS[make]
    marker = tmp_path / "payload-ran"
    make(tmp_path / "model.pt", tiny_params, marker)
    with pytest.raises(error, match=message):
        Denoiser.from_checkpoint(tmp_path / "model.pt", device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("make", CHECKPOINTS, ids=lambda make: make.__name__)
def test_bad_checkpoint_is_one_line_from_evaluate_and_writes_nothing(workspace, make):
    root, params = workspace
    _, message = CHECKPOINTS[make]
    marker = root / "payload-ran"
    make(root / "model.pt", params, marker)
    assert message in one_error_line(CliRunner().invoke(app, ["evaluate", "--checkpoint", "model.pt"]))
    assert not marker.exists() and not (root / params.eval.out_dir).exists()


# --- noise levels ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_denoiser_refuses_a_sigma_outside_0_1(tmp_path, tiny_params, sigma):
    denoiser = Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "model.pt", tiny_params), device="cpu")
    noisy = np.broadcast_to(np.float32([0.4, 0.5, 0.6]), (1, 8, 8, 3))  # colour: gray images stop at 0.577
    with pytest.raises(ValueError, match=r"sigma must lie in \(0, 1\]"):
        denoiser.denoise(noisy, sigma)
