"""A folder of your own pictures as the data source: reading every format, the split by file, what is left out, the
crops, and training on them with the same trainer."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from picture_fixtures import write_picture_folder

from ddim_denoise.data.folder import load_images, split_by_file
from ddim_denoise.data.patches import PatchSource, crop_positions, random_crops
from ddim_denoise.data.prepared import load_split, manifest_tags, prepare, read_manifest
from ddim_denoise.pipeline.checkpoint import load_checkpoint
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.pipeline.params import validate_params
from ddim_denoise.training.build import build_trainer

PATCH = 32


@pytest.fixture
def folder_params(tmp_path, monkeypatch, tiny_params):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    expected = write_picture_folder(tmp_path / "pictures")
    raw = tiny_params.model_dump()
    raw["data"].update(source="folder", raw_dir="pictures", prepared_dir="prepared", patch_size=PATCH, val_size=6,
                       val_files=1, test_files=["a.png", "d.npy"], patches_per_epoch=24)
    raw["mlflow"]["log_model"] = False
    return validate_params(raw), expected


def test_prepare_reads_every_format_splits_by_file_and_lists_what_it_leaves_out(folder_params, caplog):
    params, expected = folder_params
    manifest = prepare(params)
    usable = sorted(name for name, what in expected.items() if what == "ok")
    split = manifest["split"]
    assert sorted(split["train"] + split["val"] + split["test"]) == usable
    assert split["test"] == ["a.png", "d.npy"] and len(split["val"]) == 1  # named, then a count drawn from the rest
    left_out = {item["file"]: item["why"] for item in manifest["left_out"]}
    assert set(left_out) == {name for name, what in expected.items() if what not in ("ok",)}
    assert left_out["copy_of_a.png"] == "the same pixels as a.png"
    assert "smaller than data.patch_size=32" in left_out["thin.png"]
    assert all(f"skipping {name}" in caplog.text for name in left_out)  # one line each
    test = load_images("prepared", "test")
    assert [p.shape for p in test] == [(48, 72, 3), (56, 50, 3)] and all(p.dtype == np.uint8 for p in test)
    gray = test[1]  # the 16-bit gray .npy: replicated to RGB, rounded to 8 bits
    assert np.array_equal(gray[..., 0], gray[..., 2])
    val_x, _ = load_split("prepared", "val")
    assert val_x.shape == (6, PATCH, PATCH, 3) and val_x.dtype == np.uint8
    assert read_manifest("prepared")["dataset"] == "folder"
    tags = manifest_tags(manifest)
    assert tags["data_test_files"] == "a.png, d.npy" and "by file (seed 0)" in tags["data_val_split"]
    with pytest.raises(DataError, match="whole pictures"):
        load_split("prepared", "test")


def test_refuse_mode_stops_before_writing_anything(folder_params):
    params, _ = folder_params
    params.data.bad_files = "refuse"
    with pytest.raises(DataError, match="3 file\\(s\\) in pictures cannot be used"):
        prepare(params)
    assert not Path("prepared").exists()


def test_the_split_is_seeded_by_file_and_checks_what_it_is_given():
    names = [f"{i}.png" for i in range(10)]
    first, again = split_by_file(names, 0.2, 3, seed=1), split_by_file(names, 0.2, 3, seed=1)
    assert first == again and len(first["test"]) == 3 and len(first["val"]) == 2 and len(first["train"]) == 5
    assert split_by_file(names, 0.2, 3, seed=2) != first
    with pytest.raises(DataError, match="nope.png, not among the usable pictures"):
        split_by_file(names, 1, ["nope.png"], seed=0)
    with pytest.raises(DataError, match="each split needs at least one"):
        split_by_file(names[:2], 1, 1, seed=0)


def test_crops_are_uniform_over_positions_and_inside_every_picture():
    sizes = [(40, 40), (40, 100)]  # 9 x 9 = 81 and 9 x 69 = 621 crop positions of 32 x 32
    picture, top, left = crop_positions(sizes, 20000, 32, torch.Generator().manual_seed(0))
    share = (picture == 1).double().mean().item()
    assert abs(share - 621 / (81 + 621)) < 0.01
    heights, widths = torch.tensor([40, 40])[picture], torch.tensor([40, 100])[picture]
    assert bool(((top >= 0) & (top + 32 <= heights) & (left >= 0) & (left + 32 <= widths)).all())
    pictures = [torch.arange(40 * w * 3, dtype=torch.int32).reshape(40, w, 3) for w in (40, 100)]
    crops = random_crops(pictures, 5, 32, torch.Generator().manual_seed(3))
    p, t, lft = crop_positions(sizes, 5, 32, torch.Generator().manual_seed(3))
    for crop, i, y, x in zip(crops, p, t, lft):
        assert torch.equal(crop, pictures[i][y: y + 32, x: x + 32])


def test_each_epoch_crops_afresh_and_the_same_on_a_rerun():
    pictures = [np.random.default_rng(i).integers(0, 256, (50, 60, 3), dtype=np.uint8) for i in range(3)]
    source = PatchSource(pictures, 16, per_epoch=10, seed=0)
    assert len(source) == 10 and source.epoch_images(0).shape == (10, 16, 16, 3)
    assert torch.equal(source.epoch_images(1), PatchSource(pictures, 16, 10, seed=0).epoch_images(1))
    assert not torch.equal(source.epoch_images(0), source.epoch_images(1))


def test_the_trainer_trains_on_crops_of_the_pictures_and_tags_the_split(folder_params):
    params, _ = folder_params
    prepare(params)
    raw = params.model_dump()
    raw["train"].update(epochs=1, rot90=True, max_train_images=16)  # a sweep's budget caps the crops per epoch
    trainer = build_trainer(validate_params(raw))
    assert len(trainer.train_images) == 16 and trainer.batches_per_epoch == 2
    summary = trainer.fit()
    assert np.isfinite(summary["best_val_psnr"])
    tags = mlflow.MlflowClient().get_run(summary["mlflow_run_id"]).data.tags
    assert tags["data_test_files"] == "a.png, d.npy"


def test_a_run_on_crops_resumed_after_a_kill_ends_where_an_uninterrupted_one_does(folder_params):
    """Each epoch's crops come from (seed, epoch): a resume trains on the crops the killed run would have."""
    params, _ = folder_params
    prepare(params)

    def run(out_dir: str):
        raw = params.model_dump()
        raw["train"].update(epochs=2, rot90=True, out_dir=out_dir)
        return build_trainer(validate_params(raw))

    run("straight").fit()
    first = run("resumed")
    first._start_tracking(None)
    first.train_epoch(first.train_images.epoch_images(0))
    first.epoch += 1
    first._end_of_epoch({"epoch_loss": 0.0})  # what fit() saves after epoch 1; then the process dies
    run("resumed").fit()
    a, b = load_checkpoint("straight/last.pt"), load_checkpoint("resumed/last.pt")
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
