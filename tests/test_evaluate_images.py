"""Evaluation on whole images of different sizes (data.source: folder): per-image noise, per-image calls, the model
in tiles, crops in the grid, and evaluate()'s dispatch on the prepared data's manifest."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from denoise_fixtures import write_tiny_checkpoint
from picture_fixtures import write_picture_folder

from ddim_denoise.data.prepared import prepare
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.denoising.tiling import TileOptions, tile_boxes
from ddim_denoise.evaluation import evaluate as evaluate_module
from ddim_denoise.evaluation.evaluate import (
    NOISY,
    NOISY_INPUT,
    ONE_STEP,
    TABLE_COLUMNS,
    Method,
    build_methods,
    eval_tiles,
    evaluate,
    run_methods,
    write_evaluation,
)
from ddim_denoise.pipeline.files import GRID_FILE, METRICS_FILE, TABLE_FILE
from ddim_denoise.pipeline.params import validate_params

SIZES = [(40, 56), (70, 33), (64, 64)]
SIGMAS = [0.1, 0.2]
SEED = 5
TILES = TileOptions(tile=32, overlap=8, batch=4)


def mixed_images(sizes=SIZES, seed=0) -> list[np.ndarray]:
    """uint8 (H, W, 3) pictures of the given sizes, as data.folder.load_images gives them: smooth colour ramps plus
    texture, so that the model and the baselines have something to denoise."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        y, x = np.mgrid[0:height, 0:width]
        ramps = np.stack([x / width, y / height, 0.5 + 0 * x], axis=-1) * 150 + 50
        images.append(np.clip(ramps + rng.normal(0, 10, ramps.shape), 0, 255).astype(np.uint8))
    return images


def independent_noisy_psnr(image: np.ndarray, index: int, sigma: float, seed: int) -> float:
    """The noisy input's PSNR as the documented seeding defines it, computed without the code under test: the stream
    seeded by (seed, image index, sigma in millionths), noisy image clipped to [0, 1], data range 1."""
    clean = image.astype(np.float32) / 255
    rng = np.random.default_rng([seed, index, int(round(sigma * 1_000_000))])
    noisy = np.clip(clean + np.float32(sigma) * rng.standard_normal(clean.shape, dtype=np.float32), 0, 1)
    return 10 * math.log10(1 / np.mean((noisy.astype(np.float64) - clean) ** 2))


@pytest.fixture
def tiny_denoiser(tmp_path, tiny_params):
    return Denoiser.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.pt", tiny_params), device="cpu")


def test_whole_images_get_a_row_per_method_and_sigma_and_their_own_seeded_noise(tiny_denoiser):
    cfg = validate_params({"eval": {"ddim_steps": 2, "ddim_images": 2, "clipped_images": 1, "bm3d_images": 0,
                                    "nlm_images": 2, "batch_size": 4}}).eval  # BM3D: in the evaluate() test
    images = mixed_images()
    methods = build_methods(tiny_denoiser, cfg, tiles=TILES)
    table = run_methods(images, SIGMAS, methods, noise_seed=SEED, keep_images=2).table

    expected = {NOISY: 3, ONE_STEP: 3, "model_ddim2": 2, "model_1step_8bit": 1, "nlm": 2}
    assert list(table.columns) == TABLE_COLUMNS and len(table) == len(SIGMAS) * len(expected)
    for sigma in SIGMAS:
        rows = table[table.sigma == sigma].set_index("method")
        assert rows.n_images.to_dict() == expected
        noisy = [independent_noisy_psnr(image, i, sigma, SEED) for i, image in enumerate(images)]
        assert rows.psnr[NOISY] == pytest.approx(np.mean(noisy), abs=1e-6)
        assert rows.psnr_1step_same_images[ONE_STEP] == pytest.approx(rows.psnr[ONE_STEP])
        assert rows.psnr["nlm"] > rows.psnr[NOISY]
        assert np.isfinite(rows.psnr[ONE_STEP]) and rows.images_per_s[ONE_STEP] > 0
        assert math.isnan(rows.images_per_s[NOISY])


def test_each_image_is_its_own_call_and_the_model_tiles_the_ones_larger_than_a_tile():
    """A denoiser that records what it is given and returns it: images larger than the tile arrive as the tiles
    tile_boxes lays out, a smaller one arrives whole, and the blended tiles give back the input exactly."""

    class RecordingDenoiser:
        def __init__(self):
            self.shapes: list[tuple[int, ...]] = []

        def denoise(self, noisy, sigma, steps=1, eta=0.0, batch_size=64, ddim_stop_sigma=0.0, colour=False):
            self.shapes.append(noisy.shape)
            return noisy

    sizes = [(70, 33), (24, 30)]
    images = mixed_images(sizes)
    denoiser = RecordingDenoiser()
    cfg = validate_params({"eval": {"ddim_steps": 1, "clipped_images": 0, "bm3d_images": 0, "nlm_images": 0,
                                    "batch_size": TILES.batch}}).eval
    calls: list[tuple[int, ...]] = []
    methods = {name: Method(lambda noisy, sigma, fn=m.fn: calls.append(noisy.shape) or fn(noisy, sigma))
               for name, m in build_methods(denoiser, cfg, tiles=TILES).items()}
    table = run_methods(images, [0.1], methods, noise_seed=0).table.set_index("method")

    assert calls == [(1, *size, 3) for size in sizes] * 2  # per image, whole, for the noisy input and the model
    tiles = len(tile_boxes(*sizes[0], TILES))
    assert tiles > TILES.batch  # more than one tile batch
    assert denoiser.shapes == [(TILES.batch, 32, 32, 3), (tiles - TILES.batch, 32, 32, 3), (1, 24, 30, 3)]
    assert table.psnr[ONE_STEP] == pytest.approx(table.psnr[NOISY], abs=1e-6)  # no seams (float32 blend)


def test_equal_size_images_score_the_same_as_a_list_as_in_one_batch():
    """The whole-image path draws each image's noise as the batched (CIFAR-10) path does, and scores through the
    same rows: on equal-size images the two tables and grid samples agree."""
    clean = np.stack(mixed_images([(16, 16)] * 5, seed=3)).astype(np.float32) / 255
    methods = {NOISY: NOISY_INPUT, ONE_STEP: Method(lambda noisy, sigma: 0.8 * noisy + 0.1),
               "prefix": Method(lambda noisy, sigma: noisy[..., ::-1], max_images=3)}
    batched = run_methods(clean, SIGMAS, methods, noise_seed=SEED, keep_images=2)
    listed = run_methods(list(clean), SIGMAS, methods, noise_seed=SEED, keep_images=2)
    columns = [c for c in TABLE_COLUMNS if c != "images_per_s"]
    pd.testing.assert_frame_equal(batched.table[columns], listed.table[columns], check_exact=True)
    np.testing.assert_array_equal(batched.clean_samples, listed.clean_samples)  # 16 px: the crops are the images
    for sigma in SIGMAS:
        for name in methods:
            np.testing.assert_array_equal(batched.samples[sigma][name], listed.samples[sigma][name])


def test_the_grid_shows_equal_centred_crops_at_full_resolution(tmp_path):
    images = mixed_images([(120, 140), (100, 200), (130, 97)])
    methods = {NOISY: NOISY_INPUT, ONE_STEP: Method(lambda noisy, sigma: np.clip(noisy, 0, 1))}
    evaluation = run_methods(images, [0.1], methods, noise_seed=0, keep_images=2)
    assert evaluation.clean_samples.shape == (2, 96, 96, 3)
    np.testing.assert_array_equal(evaluation.clean_samples[1], images[1][2:98, 52:148].astype(np.float32) / 255)
    assert evaluation.samples[0.1][ONE_STEP].shape == (2, 96, 96, 3)

    small = run_methods(mixed_images([(40, 56), (70, 33)]), [0.1], methods, noise_seed=0, keep_images=2)
    assert small.clean_samples.shape == (2, 33, 33, 3)  # the smallest side, so that the crops stack
    paths = write_evaluation(evaluation, tmp_path, ["clean", NOISY, ONE_STEP])
    assert set(paths) == {METRICS_FILE, TABLE_FILE, GRID_FILE}
    assert paths[GRID_FILE].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiles_are_four_training_crops_wide_and_overlap_by_a_quarter(tiny_params):
    folder = tiny_params.model_copy(update={"data": tiny_params.data.model_copy(
        update={"source": "folder", "patch_size": 48})})
    assert eval_tiles(folder, batch=7) == TileOptions(tile=192, overlap=48, batch=7)
    assert eval_tiles(tiny_params, batch=4) == TileOptions(tile=128, overlap=32, batch=4)  # CIFAR-10: 32-px images


def test_evaluate_on_a_folder_split_denoises_whole_pictures_in_tiles(tmp_path, monkeypatch, tiny_params):
    """evaluate() reads a prepared folder's test pictures whole and tiles them with the checkpoint's training crop
    (8 px -> 32-px tiles)."""
    monkeypatch.chdir(tmp_path)
    write_picture_folder(tmp_path / "pictures")
    raw = tiny_params.model_dump()
    raw["eval"].update(n_images=2, sigmas=[0.1], ddim_steps=2, bm3d_images=1, nlm_images=1, clipped_images=1,
                       grid_images=2)
    raw["data"].update(source="folder", raw_dir="pictures", patch_size=8, val_size=4, val_files=1,
                       test_files=["a.png", "f.png", "g.png"])
    params = validate_params(raw)
    prepare(params)
    write_tiny_checkpoint(tmp_path / "best.pt", params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    tiled, columns = [], []
    denoise_tiled, plot_grid = evaluate_module.denoise_tiled, evaluate_module.plot_grid
    monkeypatch.setattr(evaluate_module, "denoise_tiled", lambda fn, image, sigma, options: tiled.append(
        (image.shape, options)) or denoise_tiled(fn, image, sigma, options))
    monkeypatch.setattr(evaluate_module, "plot_grid", lambda ev, cols: columns.append(cols) or plot_grid(ev, cols))
    table = evaluate(params, tmp_path / "best.pt", device="cpu").set_index("method")

    assert table.n_images.to_dict() == {NOISY: 2, ONE_STEP: 2, "model_ddim2": 2, "model_1step_8bit": 1, "bm3d": 1,
                                        "nlm": 1}
    assert {options for _, options in tiled} == {TileOptions(tile=32, overlap=8, batch=params.eval.batch_size)}
    assert {shape for shape, _ in tiled} == {(48, 64, 3), (48, 72, 3), (70, 45, 3)}  # and the warm-up's 64-px crop
    assert columns == [["clean", NOISY, ONE_STEP, "model_ddim2", "bm3d"]]
    out = tmp_path / params.eval.out_dir
    assert json.loads((out / METRICS_FILE).read_text())["sigma_0.1"]["nlm"]["n_images"] == 1
    assert (out / GRID_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
