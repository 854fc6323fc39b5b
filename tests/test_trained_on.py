"""What a checkpoint was trained on, in words, and the warning when a CIFAR-10 model is asked for large pictures:
on the command line (``ddim-denoise denoise``) and in the served pyfunc model."""

from __future__ import annotations

import base64
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from denoise_fixtures import encode_with_reference, noisy_photo, quantize, write_tiny_checkpoint
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.denoising.trained_on import far_larger_side, far_larger_warning, trained_on, training_side
from ddim_denoise.pipeline.params import validate_params

LARGE = (40, 130)  # (height, width): a larger side just over 4 x 32 = 128 px
SMALL = (40, 128)  # just within it


def with_data(params, **data):
    raw = params.model_dump()
    return validate_params({**raw, "data": {**raw["data"], **data}})


@pytest.fixture
def folder_params(tiny_params):
    return with_data(tiny_params, source="folder", raw_dir="data/photos", patch_size=48)


@pytest.fixture
def cifar_checkpoint(tmp_path, tiny_params):
    return write_tiny_checkpoint(tmp_path / "cifar.pt", tiny_params)


def far_larger_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "BM3D" in r.getMessage()]


def test_the_words_name_the_data_and_the_size_it_was_trained_at(tiny_params, folder_params):
    assert tiny_params.data.source == "cifar10"
    assert (trained_on(tiny_params), training_side(tiny_params)) == ("CIFAR-10 (32x32 thumbnails)", 32)
    assert (trained_on(folder_params), training_side(folder_params)) == ("the pictures in data/photos (48x48 crops)",
                                                                         48)
    raw = tiny_params.model_dump()
    del raw["data"]["source"]  # a checkpoint older than data.source
    assert trained_on(validate_params(raw)) == "CIFAR-10 (32x32 thumbnails)"


def test_only_a_cifar10_model_on_pictures_over_4x_its_side_is_warned(tiny_params, folder_params):
    assert far_larger_side(tiny_params) == 128 and far_larger_side(folder_params) is None
    assert far_larger_warning(tiny_params, *SMALL) is None and far_larger_warning(tiny_params, 128, 40) is None
    warning = far_larger_warning(tiny_params, *LARGE)
    for words in ("CIFAR-10 (32x32 thumbnails)", "worse than BM3D", "130x40", "data.source: folder", "photos profile",
                  "docs/own-images.md"):
        assert words in warning
    assert "\n" not in warning
    assert far_larger_warning(folder_params, 4000, 6000) is None


def write_photos(folder, sizes) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (height, width) in enumerate(sizes):
        path = folder / f"photo{i}.png"
        path.write_bytes(encode_with_reference("png", quantize(np.clip(noisy_photo(height, width), 0, 1), np.uint8)))
        paths.append(str(path))
    return paths


def denoise_command(tmp_path, checkpoint, sizes, caplog):
    inputs = write_photos(tmp_path / "in", sizes)
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(app, ["denoise", *inputs, "-o", str(tmp_path / "out"), "--sigma", "0.1",
                                          "-c", str(checkpoint), "--no-progress"])
    assert result.exit_code == 0, result.output
    return caplog


def test_the_denoise_command_says_what_the_model_saw_and_warns_once_about_large_pictures(tmp_path, cifar_checkpoint,
                                                                                          caplog):
    denoise_command(tmp_path, cifar_checkpoint, [SMALL, LARGE, LARGE], caplog)
    assert [r.getMessage() for r in caplog.records].count("the model was trained on CIFAR-10 (32x32 thumbnails)") == 1
    assert len(far_larger_warnings(caplog)) == 1  # once per command, however many large pictures


def test_no_warning_on_small_pictures(tmp_path, cifar_checkpoint, caplog):
    assert far_larger_warnings(denoise_command(tmp_path, cifar_checkpoint, [SMALL], caplog)) == []


def test_no_warning_for_a_model_trained_on_ones_own_pictures(tmp_path, folder_params, caplog):
    checkpoint = write_tiny_checkpoint(tmp_path / "folder.pt", folder_params)
    caplog = denoise_command(tmp_path, checkpoint, [LARGE], caplog)
    assert "the model was trained on the pictures in data/photos (48x48 crops)" in caplog.text
    assert far_larger_warnings(caplog) == []


def test_the_served_model_warns_once_per_process_about_large_pictures(cifar_checkpoint, caplog):
    from ddim_denoise.serving.pyfunc import CHECKPOINT_ARTIFACT, DenoiserModel

    model = DenoiserModel()
    with caplog.at_level(logging.INFO):
        model.load_context(SimpleNamespace(artifacts={CHECKPOINT_ARTIFACT: str(cifar_checkpoint)}))
    assert "serving a model trained on CIFAR-10 (32x32 thumbnails)" in caplog.text

    def request(*sizes):
        images = [base64.b64encode(encode_with_reference("png", np.full(size, 128, np.uint8))).decode("ascii")
                  for size in sizes]
        out = model.predict(None, pd.DataFrame({"image": images, "sigma": [0.1] * len(images)}))
        assert list(out.columns) == ["image", "sigma"]  # the response is unchanged

    request(SMALL)
    assert far_larger_warnings(caplog) == []
    request(LARGE, LARGE)
    request(LARGE)
    assert len(far_larger_warnings(caplog)) == 1
