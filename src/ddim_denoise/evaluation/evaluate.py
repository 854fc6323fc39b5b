"""Test-set evaluation: every method sees the same noisy images; PSNR/SSIM with 95% CIs, speed, and an image grid.

A *method* is anything with the model's call shape ``fn(noisy, sigma) -> estimate`` on float32 (N, H, W, 3) [0, 1]
images. The noisy input itself is a method too (the identity), so "did we beat the input?" is read off the same
table. Slow classical baselines run on a prefix of the images (``eval.bm3d_images``, ``eval.nlm_images``); each
row records how many images it covers.

Files written atomically into ``eval.out_dir``:

- ``metrics.json``: DVC metrics, ``{"sigma_0.1": {"model_1step": {"psnr", "ssim", "n_images"}, ...}, ...,
  "mean_psnr_1step": ...}``
- ``psnr_vs_sigma.csv``: DVC plot, one row per sigma x method, columns ``TABLE_COLUMNS``
- ``grid.png``: rows per sigma; columns clean / noisy / one-step / DDIM (and BM3D for whole images), each a strip
  of ``eval.grid_images`` images (of whole images, their centred ``GRID_CROP`` crops at full resolution)

Two kinds of test set go through the same scoring (``run_methods``): CIFAR-10's equal-size images as one array,
noised at once and given to each method in one call; and a folder's pictures of any size (``data.source: folder``),
a list, each noised on its own and denoised whole, the model in tiles (``eval_tiles``), with a centred crop of each
shown in the grid rather than a thumbnail.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from ddim_denoise.core.metrics import make_noisy, mean_ci95, psnr_of_mean_mse, psnr_ssim, to_float
from ddim_denoise.data.cifar10 import IMAGE_SHAPE
from ddim_denoise.data.folder import load_images
from ddim_denoise.data.prepared import dataset_name, load_split, read_manifest
from ddim_denoise.denoising.clipping import as_8bit
from ddim_denoise.denoising.grayscale import identical_channels
from ddim_denoise.denoising.tiling import TileOptions, denoise_tiled
from ddim_denoise.pipeline.checkpoint import atomic_path, atomic_write_text
from ddim_denoise.pipeline.files import GRID_FILE, METRICS_FILE, TABLE_FILE
from ddim_denoise.pipeline.params import EvalConfig, Params

log = logging.getLogger(__name__)

# psnr/ssim_1step_same_images: the one-step model's mean on the images the row covers, so a method run on a prefix
# (BM3D on 200 of 10,000, DDIM on eval.ddim_images) is compared with the model on the same images, not with its mean
# over all of them.
# psnr_of_mean_mse: the PSNR of the mean MSE over the images, the form published diffusion-denoiser figures take.
TABLE_COLUMNS = ["sigma", "method", "n_images", "psnr", "psnr_ci95", "ssim", "ssim_ci95", "images_per_s",
                 "psnr_1step_same_images", "ssim_1step_same_images", "psnr_of_mean_mse", "psnr_of_mean_mse_ci95"]

CLEAN = "clean"
NOISY = "noisy"
ONE_STEP = "model_1step"
ONE_STEP_8BIT = "model_1step_8bit"  # the same noisy images as an 8-bit file stores them (clipped and rounded)
GRID_DPI = 150
GRID_CROP = 96  # whole images: the grid shows a centred crop of this side (or the smallest image's) at full size
WARM_UP_SIDE = 64  # whole images: the untimed first call gets a centred crop this large, not a photo (BM3D: minutes)
# Whole images go through the model in tiles of TILE_PER_CROP times the side of the crops it was trained on, with
# neighbours overlapping by a quarter tile (eval_tiles).
TILE_PER_CROP = 4

DenoiseFn = Callable[[np.ndarray, float], np.ndarray]


@dataclass(frozen=True)
class Method:
    """One way to turn noisy images into estimates, and how to run it in an evaluation."""

    fn: DenoiseFn
    max_images: int | None = None  # only the first max_images images (slow baselines); None: all of them
    timed: bool = True  # False for the noisy input itself, whose "speed" means nothing
    warm_up: bool = False  # run once on one image before timing (CUDA context, cuDNN autotuning, worker processes)


@dataclass
class Evaluation:
    """The table (one row per sigma x method) and, for the grid, the first few images of every method (of whole
    images, equal centred crops)."""

    table: pd.DataFrame
    clean_samples: np.ndarray
    samples: dict[float, dict[str, np.ndarray]] = field(default_factory=dict)  # sigma -> method -> images


def model_method_name(steps: int, ddim_stop_sigma: float = 0.0) -> str:
    if steps == 1:
        return ONE_STEP
    return f"model_ddim{steps}" + (f"_stop{ddim_stop_sigma:g}" if ddim_stop_sigma else "")


def method_label(name: str) -> str:
    """Human-readable name for figures and tables: model_ddim10 -> 'DDIM-10', model_ddim10_stop0.05 -> 'DDIM-10 to
    σ=0.05', model_1step -> 'one-step'."""
    if name == ONE_STEP:
        return "one-step"
    if name == ONE_STEP_8BIT:
        return "one-step, 8-bit input"
    if name.startswith("model_ddim"):
        steps, _, stop = name.removeprefix("model_ddim").partition("_stop")
        return f"DDIM-{steps}" + (f" to σ={stop}" if stop else "")
    return {"bm3d": "BM3D", "nlm": "NLM", NOISY: "noisy input", CLEAN: "clean"}.get(name, name)


def noisy_input(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """The 'do nothing' method: the noisy input as its own estimate (clipped when scored), the bar to beat."""
    return noisy


NOISY_INPUT = Method(noisy_input, timed=False)


def eval_tiles(checkpoint_params: Params, batch: int) -> TileOptions:
    """How the model denoises whole images: tiles of ``TILE_PER_CROP`` times its training crop's side
    (``data.patch_size`` for a folder-trained model, CIFAR-10's 32 pixels otherwise), overlapping by a quarter tile.

    Why that size (a judgement, not a measured optimum): the U-Net is convolutional, so it denoises larger inputs
    than it was trained on, and larger tiles mean fewer tile borders (pixels short of context) and less work repeated
    in overlaps; but its self-attention costs memory in the square of a tile's pixels, and the further a tile is
    from the trained size, the more positions attention spreads over that training never showed it. Four times the
    side (16x the pixels) is well above the crop without being a whole photo: 128-pixel tiles for a CIFAR-10 model
    (its 32-pixel tiles would be mostly border), 256 for one trained on 64-pixel crops. A quarter tile of overlap,
    as the file command's default (64 / 16), puts every tile's border inside a neighbour's middle, at (4/3)^2 = 1.8x
    the work of tiles that only touch.
    """
    data = checkpoint_params.data
    crop = data.patch_size if data.source == "folder" else IMAGE_SHAPE[0]
    tile = TILE_PER_CROP * crop
    return TileOptions(tile=tile, overlap=tile // 4, batch=batch)


def denoise_images(denoiser, noisy: np.ndarray, sigma: float, tiles: TileOptions | None = None,
                   **options) -> np.ndarray:
    """``denoiser.denoise(noisy, sigma, **options)``; with ``tiles``, each image through ``denoise_tiled`` (whole
    when no larger than a tile), as the file command denoises a picture."""
    if tiles is None:
        return denoiser.denoise(noisy, sigma, **options)
    return np.stack([denoise_tiled(partial(denoiser.denoise, **options, colour=not identical_channels(image[None])[0]),
                                   image, sigma, tiles)
                     for image in noisy])  # colour: a colour picture's flat tile (equal channels) stays colour


def model_methods(denoiser, steps: Iterable[int], batch_size: int, multistep_images: int | None = None,
                  ddim_stop_sigma: float = 0.0, tiles: TileOptions | None = None) -> dict[str, Method]:
    """``model_1step`` for steps=1 and ``model_ddim{K}`` for steps=K (deterministic DDIM, eta=0).

    ``multistep_images`` limits the K-step methods to the first images (K model calls per image; None: all).
    ``ddim_stop_sigma``: where the K-step walks stop (``Denoiser.denoise``). ``tiles``: denoise each image in tiles
    (``denoise_images``); None: the images as given.
    """

    def run(k: int) -> DenoiseFn:
        return lambda noisy, sigma: denoise_images(denoiser, noisy, sigma, tiles, steps=k, eta=0.0,
                                                   batch_size=batch_size, ddim_stop_sigma=ddim_stop_sigma)

    return {model_method_name(k, ddim_stop_sigma): Method(run(k), max_images=None if k == 1 else multistep_images,
                                                          warm_up=True)
            for k in dict.fromkeys(steps)}


def baseline_methods(bm3d_images: int, nlm_images: int, workers: int = 1) -> dict[str, Method]:
    """BM3D and NLM on the first ``*_images`` images; a count of 0 leaves the method out. Both denoise an image of
    any size whole (``baselines``)."""
    from ddim_denoise.evaluation.baselines import bm3d_denoise, nlm_denoise

    counts = {"bm3d": (bm3d_denoise, bm3d_images), "nlm": (nlm_denoise, nlm_images)}
    # warm_up: the untimed first call starts their worker processes (baselines.worker_pool)
    return {name: Method(lambda noisy, sigma, fn=fn: fn(noisy, sigma, workers=workers), max_images=n, warm_up=True)
            for name, (fn, n) in counts.items() if n > 0}


def clipped_input_method(denoiser, batch_size: int, max_images: int,
                         tiles: TileOptions | None = None) -> dict[str, Method]:
    """One step on the noisy images as an 8-bit file holds them (what users' pictures look like): the denoiser
    undoes the clipping (``eval.unclip_passes``). ``max_images`` 0 leaves the method out; ``tiles`` as in
    ``model_methods``."""
    def run(noisy: np.ndarray, sigma: float) -> np.ndarray:
        return denoise_images(denoiser, as_8bit(noisy), sigma, tiles, batch_size=batch_size)

    return {ONE_STEP_8BIT: Method(run, max_images=max_images)} if max_images > 0 else {}


def build_methods(denoiser, cfg: EvalConfig, workers: int = 1, tiles: TileOptions | None = None) -> dict[str, Method]:
    """The evaluation's methods: the noisy input, the model in one step and in ``cfg.ddim_steps``, one step on 8-bit
    inputs, the baselines. ``tiles``: the model methods denoise each image in tiles (whole images)."""
    return {
        NOISY: NOISY_INPUT,
        **model_methods(denoiser, [1, cfg.ddim_steps], cfg.batch_size, multistep_images=cfg.ddim_images,
                        ddim_stop_sigma=cfg.ddim_stop_sigma, tiles=tiles),
        **clipped_input_method(denoiser, cfg.batch_size, cfg.clipped_images, tiles),
        **baseline_methods(cfg.bm3d_images, cfg.nlm_images, workers),
    }


@dataclass(frozen=True)
class MethodRun:
    """One method at one sigma: per-image scores, the seconds its calls took, its first estimates for the grid."""

    psnr: np.ndarray
    ssim: np.ndarray
    seconds: float
    samples: np.ndarray


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The centred ``side`` x ``side`` part of an (H, W, C) image (the whole of a shorter side)."""
    top, left = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[top:top + side, left:left + side]


def grid_crop_side(images: Sequence[np.ndarray]) -> int:
    """``GRID_CROP``, or the smallest side among ``images`` if shorter: the crops must stack into one array."""
    return min([GRID_CROP, *(min(image.shape[:2]) for image in images)])


def as_float(image: np.ndarray) -> np.ndarray:
    """A whole image as float32 on [0, 1]: uint8 ones are converted when scored, so a folder of photos is held in
    memory as bytes, not as 4x larger floats."""
    return to_float(image) if image.dtype == np.uint8 else np.asarray(image, dtype=np.float32)


@dataclass(frozen=True)
class NoisedBatch:
    """Equal-size images (CIFAR-10) noised together at one sigma: each method runs once, on a prefix of them."""

    clean: np.ndarray  # float32 (N, H, W, 3)
    noisy: np.ndarray
    sigma: float

    def warm_up(self, fn: DenoiseFn) -> None:
        fn(self.noisy[:1], self.sigma)

    def run(self, fn: DenoiseFn, n: int, keep: int) -> MethodRun:
        start = time.perf_counter()
        estimate = fn(self.noisy[:n], self.sigma)
        seconds = time.perf_counter() - start
        psnr, ssim = psnr_ssim(self.clean[:n], estimate)
        return MethodRun(psnr, ssim, seconds, np.clip(estimate[:keep], 0, 1))


@dataclass(frozen=True)
class NoisedImages:
    """Images of any size (a folder's pictures) at one sigma: each method runs once per image, given (1, H, W, 3).

    Image i's noise is ``make_noisy`` of it alone with ``first_index=i``: the stream seeded by (noise_seed, i,
    sigma), the very noise image i gets in an equal-size batch. It is drawn afresh for every method rather than
    held: the noisy copies of a folder of photos need not fit in memory.
    """

    clean: Sequence[np.ndarray]  # (H, W, 3) each, uint8 or float32 on [0, 1]
    sigma: float
    noise_seed: int
    crop: int  # the side of the grid's centred crops

    def noisy(self, index: int) -> np.ndarray:
        return make_noisy(as_float(self.clean[index])[None], self.sigma, self.noise_seed, first_index=index)[0]

    def warm_up(self, fn: DenoiseFn) -> None:
        fn(centre_crop(self.noisy(0), WARM_UP_SIDE)[None], self.sigma)

    def run(self, fn: DenoiseFn, n: int, keep: int) -> MethodRun:
        scores, crops, seconds = [], [], 0.0
        for i in range(n):
            noisy = self.noisy(i)
            start = time.perf_counter()
            estimate = fn(noisy[None], self.sigma)
            seconds += time.perf_counter() - start
            scores.append(psnr_ssim(as_float(self.clean[i])[None], estimate))
            if i < keep:
                crops.append(centre_crop(np.clip(estimate[0], 0, 1), self.crop))
        # concatenated as psnr_ssim returns them (SSIM in float32): equal-size images score as NoisedBatch scores them
        psnr, ssim = (np.concatenate(values) for values in zip(*scores))
        return MethodRun(psnr, ssim, seconds, np.array(crops, dtype=np.float32).reshape(-1, self.crop, self.crop, 3))


def clean_samples(clean: np.ndarray | Sequence[np.ndarray], keep: int, crop: int | None) -> np.ndarray:
    """The grid's clean images: the first ``keep``; of whole images, their centred crops."""
    if crop is None:
        return clean[:keep]
    return np.array([centre_crop(as_float(image), crop) for image in clean[:keep]], dtype=np.float32).reshape(
        -1, crop, crop, 3)


def method_row(sigma: float, name: str, run: MethodRun, timed: bool) -> dict:
    """A table row (``TABLE_COLUMNS`` but the one-step pairing): per-image means with 95% CIs, PSNR of the mean
    MSE, images/s (NaN where ``timed`` is False)."""
    n = len(run.psnr)
    (psnr_mean, psnr_ci), (ssim_mean, ssim_ci) = mean_ci95(run.psnr), mean_ci95(run.ssim)
    mse_psnr, mse_psnr_ci = psnr_of_mean_mse(run.psnr)
    speed = n / run.seconds if timed and run.seconds > 0 else float("nan")
    log.info("sigma %g  %-14s PSNR %6.2f ± %.2f dB  SSIM %.4f  n=%d  %.1f images/s",
             sigma, name, psnr_mean, psnr_ci, ssim_mean, n, speed)
    return dict(sigma=sigma, method=name, n_images=n, psnr=psnr_mean, psnr_ci95=psnr_ci, ssim=ssim_mean,
                ssim_ci95=ssim_ci, images_per_s=speed, psnr_of_mean_mse=mse_psnr, psnr_of_mean_mse_ci95=mse_psnr_ci)


def pair_with_one_step(rows: list[dict], runs: dict[str, MethodRun]) -> None:
    """Add to each row the one-step model's mean PSNR/SSIM on the images the row covers (NaN without that row)."""
    one_step = runs.get(ONE_STEP)
    for row in rows:
        for metric in ("psnr", "ssim"):
            row[f"{metric}_1step_same_images"] = (float(getattr(one_step, metric)[: row["n_images"]].mean())
                                                  if one_step is not None else float("nan"))


def run_methods(clean: np.ndarray | Sequence[np.ndarray], sigmas: Iterable[float], methods: dict[str, Method],
                noise_seed: int, keep_images: int = 0) -> Evaluation:
    """Score every method at every sigma on the same noisy images (image i's noise seeded by (noise_seed, i, sigma),
    ``make_noisy``).

    ``clean`` is either float32 (N, H, W, 3) in [0, 1], given to each method in one call (``NoisedBatch``), or a
    sequence of (H, W, 3) images of any sizes, uint8 or float32 in [0, 1], given one at a time (``NoisedImages``);
    equal-size images score the same either way. images/s is the wall time of the method's calls alone. The first
    ``keep_images`` clean, noisy and estimated images are kept for the grid; of whole images, centred crops.
    """
    whole = not isinstance(clean, np.ndarray)
    crop = grid_crop_side(clean[:keep_images]) if whole else None
    rows, samples = [], {}
    warmed: set[str] = set()
    for sigma in sigmas:
        noised = (NoisedImages(clean, sigma, noise_seed, crop) if whole
                  else NoisedBatch(clean, make_noisy(clean, sigma, noise_seed), sigma))
        sigma_rows, runs = [], {}
        for name, method in methods.items():
            n = len(clean) if method.max_images is None else min(method.max_images, len(clean))
            if n == 0:
                continue
            if method.warm_up and name not in warmed:
                noised.warm_up(method.fn)
                warmed.add(name)
            runs[name] = noised.run(method.fn, n, keep_images)
            sigma_rows.append(method_row(sigma, name, runs[name], method.timed))
        pair_with_one_step(sigma_rows, runs)
        samples[sigma] = {name: run.samples for name, run in runs.items()}
        rows += sigma_rows
    return Evaluation(pd.DataFrame(rows, columns=TABLE_COLUMNS), clean_samples(clean, keep_images, crop), samples)


def metrics_dict(table: pd.DataFrame) -> dict:
    """DVC metrics: ``{"sigma_0.1": {method: {"psnr", "ssim", "n_images"}}, "mean_psnr_1step": ...}``."""
    out: dict = {}
    for row in table.itertuples(index=False):
        out.setdefault(f"sigma_{row.sigma:g}", {})[row.method] = {
            "psnr": round(float(row.psnr), 4), "ssim": round(float(row.ssim), 5), "n_images": int(row.n_images)}
    one_step = table.loc[table.method == ONE_STEP, "psnr"]
    if len(one_step):
        out["mean_psnr_1step"] = round(float(one_step.mean()), 4)
    return out


def mlflow_metrics(table: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """Flat MLflow names: ``test_psnr_model_1step_sigma0.2``, ``test_ssim_bm3d_sigma0.5``, ``test_mean_psnr_1step``
    (``prefix`` in place of ``test``)."""
    out = {}
    for row in table.itertuples(index=False):
        for metric in ("psnr", "ssim", "psnr_of_mean_mse"):
            out[f"{prefix}_{metric}_{row.method}_sigma{row.sigma:g}"] = float(getattr(row, metric))
    one_step = table.loc[table.method == ONE_STEP, "psnr"]
    if len(one_step):
        out[f"{prefix}_mean_psnr_1step"] = float(one_step.mean())
    return out


def save_png(fig, path: str | Path, dpi: int = GRID_DPI) -> Path:
    """Save a matplotlib figure atomically (readers never see half a PNG)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _strip(images: np.ndarray, gap: int = 2) -> np.ndarray:
    """Images side by side, separated by white columns."""
    h, _, c = images.shape[1:]
    spacer = np.ones((h, gap, c), dtype=np.float32)
    parts = [p for img in images for p in (img, spacer)][:-1]
    return np.concatenate(parts, axis=1)


def plot_grid(evaluation: Evaluation, columns: list[str]):
    """Figure: one row per sigma, one column per method (``CLEAN`` for the clean images), with each cell's PSNR."""
    from matplotlib.figure import Figure

    sigmas = list(evaluation.samples)
    n, side = len(evaluation.clean_samples), evaluation.clean_samples.shape[2]
    # inches per image: 0.55 suits 32-pixel images; larger crops get at least one figure pixel per image pixel
    per_image = max(0.55, 1.1 * side / GRID_DPI)
    fig = Figure(figsize=(len(columns) * max(n, 1) * per_image, len(sigmas) * (per_image + 0.35) + 0.4))
    axes = fig.subplots(len(sigmas), len(columns), squeeze=False)
    for i, sigma in enumerate(sigmas):
        for j, name in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            images = evaluation.clean_samples if name == CLEAN else evaluation.samples[sigma].get(name)
            if images is None:
                continue
            ax.imshow(_strip(images), interpolation="nearest")
            if name != CLEAN:
                psnr = psnr_ssim(evaluation.clean_samples, images)[0].mean()
                ax.set_xlabel(f"{psnr:.2f} dB", fontsize=7)
            if i == 0:
                ax.set_title(method_label(name), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"σ = {sigma:g}", fontsize=9)
    return fig


def write_evaluation(evaluation: Evaluation, out_dir: str | Path, grid_columns: list[str]) -> dict[str, Path]:
    """Write metrics.json, psnr_vs_sigma.csv and grid.png into ``out_dir``; return their paths by file name."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in (METRICS_FILE, TABLE_FILE, GRID_FILE)}
    atomic_write_text(paths[METRICS_FILE], json.dumps(metrics_dict(evaluation.table), indent=2) + "\n")
    atomic_write_text(paths[TABLE_FILE], evaluation.table.to_csv(index=False, float_format="%.6g"))
    if len(evaluation.clean_samples):
        save_png(plot_grid(evaluation, grid_columns), paths[GRID_FILE])
    return paths


def load_test_images(prepared_dir: str | Path, n_images: int) -> np.ndarray | list[np.ndarray]:
    """The first ``n_images`` test images: CIFAR-10's as float32 (N, 32, 32, 3) on [0, 1]; a folder's
    (data.source: folder) as the list of its uint8 (H, W, 3) pictures, each its own size."""
    folder = dataset_name(read_manifest(prepared_dir)) == "folder"
    if folder:
        test = load_images(prepared_dir, "test")
    else:
        test, _ = load_split(prepared_dir, "test")
    if len(test) < n_images:
        log.warning("eval.n_images=%d but the test split holds %d images: evaluating all of them", n_images, len(test))
    return list(test[:n_images]) if folder else to_float(test[:n_images])


def grid_columns(cfg: EvalConfig, methods: dict[str, Method], whole_images: bool) -> list[str]:
    """clean / noisy / one-step / DDIM; for whole images BM3D too where it ran (on photos it is the bar to beat)."""
    columns = [CLEAN, NOISY, ONE_STEP, model_method_name(cfg.ddim_steps, cfg.ddim_stop_sigma)]
    if whole_images and "bm3d" in methods:
        columns.append("bm3d")
    return list(dict.fromkeys(columns))


def evaluate(params: Params, checkpoint_path: str | Path, device: str | None = None, workers: int = 1) -> pd.DataFrame:
    """Evaluate a checkpoint on the first ``eval.n_images`` test images; write the files; return the table.

    A folder's test pictures are denoised whole, the model in tiles (``eval_tiles``); CIFAR-10's in batches.
    ``device`` defaults to ``train.device``; ``workers`` is the number of processes for the CPU baselines.
    """
    from ddim_denoise.denoising.denoiser import Denoiser

    cfg = params.eval
    clean = load_test_images(params.data.prepared_dir, cfg.n_images)
    whole_images = isinstance(clean, list)
    denoiser = Denoiser.from_checkpoint(checkpoint_path, device=device or params.train.device, amp=cfg.amp)
    # The checkpoint's params describe its model; how to evaluate it (eval.unclip_passes) is this run's to say
    denoiser.params = denoiser.params.model_copy(update={"eval": cfg})
    tiles = eval_tiles(denoiser.params, cfg.batch_size) if whole_images else None
    methods = build_methods(denoiser, cfg, workers, tiles)
    evaluation = run_methods(clean, cfg.sigmas, methods, cfg.noise_seed, keep_images=cfg.grid_images)
    paths = write_evaluation(evaluation, cfg.out_dir, grid_columns(cfg, methods, whole_images))
    log.info("wrote %s", ", ".join(map(str, paths.values())))
    return evaluation.table
