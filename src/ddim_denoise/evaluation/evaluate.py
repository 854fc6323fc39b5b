"""Test-set evaluation: every method sees the same noisy images; PSNR/SSIM with 95% CIs, speed, and an image grid.

A *method* is anything with the model's call shape ``fn(noisy, sigma) -> estimate`` on float32 (N, H, W, 3) [0, 1]
images. The noisy input itself is a method too (the identity), so "did we beat the input?" is read off the same
table. Slow classical baselines run on a prefix of the images (``eval.bm3d_images``, ``eval.nlm_images``); each
row records how many images it covers.

Files written atomically into ``eval.out_dir``:

- ``metrics.json``: DVC metrics, ``{"sigma_0.1": {"model_1step": {"psnr", "ssim", "n_images"}, ...}, ...,
  "mean_psnr_1step": ...}``
- ``psnr_vs_sigma.csv``: DVC plot, one row per sigma x method, columns ``TABLE_COLUMNS``
- ``grid.png``: rows per sigma; columns clean / noisy / one-step / DDIM, each a strip of ``eval.grid_images`` images
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from ddim_denoise.core.metrics import make_noisy, mean_ci95, psnr_of_mean_mse, psnr_ssim, to_float
from ddim_denoise.data.prepared import load_split
from ddim_denoise.denoising.clipping import as_8bit
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
    """The table (one row per sigma x method) and, for the grid, the first few images of every method."""

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


def model_methods(denoiser, steps: Iterable[int], batch_size: int,
                  multistep_images: int | None = None, ddim_stop_sigma: float = 0.0) -> dict[str, Method]:
    """``model_1step`` for steps=1 and ``model_ddim{K}`` for steps=K (deterministic DDIM, eta=0).

    ``multistep_images`` limits the K-step methods to the first images (K model calls per image; None: all).
    ``ddim_stop_sigma``: where the K-step walks stop (``Denoiser.denoise``).
    """

    def run(k: int) -> DenoiseFn:
        return lambda noisy, sigma: denoiser.denoise(noisy, sigma, steps=k, eta=0.0, batch_size=batch_size,
                                                     ddim_stop_sigma=ddim_stop_sigma)

    return {model_method_name(k, ddim_stop_sigma): Method(run(k), max_images=None if k == 1 else multistep_images,
                                                          warm_up=True)
            for k in dict.fromkeys(steps)}


def baseline_methods(bm3d_images: int, nlm_images: int, workers: int = 1) -> dict[str, Method]:
    """BM3D and NLM on the first ``*_images`` images; a count of 0 leaves the method out."""
    from ddim_denoise.evaluation.baselines import bm3d_denoise, nlm_denoise

    counts = {"bm3d": (bm3d_denoise, bm3d_images), "nlm": (nlm_denoise, nlm_images)}
    # warm_up: the untimed first call starts their worker processes (baselines.worker_pool)
    return {name: Method(lambda noisy, sigma, fn=fn: fn(noisy, sigma, workers=workers), max_images=n, warm_up=True)
            for name, (fn, n) in counts.items() if n > 0}


def clipped_input_method(denoiser, batch_size: int, max_images: int) -> dict[str, Method]:
    """One step on the noisy images as an 8-bit file holds them (what users' pictures look like): the denoiser
    undoes the clipping (``eval.unclip_passes``). ``max_images`` 0 leaves the method out."""
    def run(noisy: np.ndarray, sigma: float) -> np.ndarray:
        return denoiser.denoise(as_8bit(noisy), sigma, batch_size=batch_size)

    return {ONE_STEP_8BIT: Method(run, max_images=max_images)} if max_images > 0 else {}


def build_methods(denoiser, cfg: EvalConfig, workers: int = 1) -> dict[str, Method]:
    """The evaluation's methods: the noisy input, the model in one step and in ``cfg.ddim_steps``, one step on 8-bit
    inputs, the baselines."""
    return {
        NOISY: NOISY_INPUT,
        **model_methods(denoiser, [1, cfg.ddim_steps], cfg.batch_size, multistep_images=cfg.ddim_images,
                        ddim_stop_sigma=cfg.ddim_stop_sigma),
        **clipped_input_method(denoiser, cfg.batch_size, cfg.clipped_images),
        **baseline_methods(cfg.bm3d_images, cfg.nlm_images, workers),
    }


def run_methods(clean: np.ndarray, sigmas: Iterable[float], methods: dict[str, Method], noise_seed: int,
                keep_images: int = 0) -> Evaluation:
    """Score every method at every sigma on the same noisy images (``make_noisy(clean, sigma, noise_seed)``).

    ``clean`` is float32 (N, H, W, 3) in [0, 1]. images/s is the wall time of the method's call alone. The first
    ``keep_images`` clean, noisy and estimated images are kept for the grid.
    """
    rows, samples = [], {}
    warmed: set[str] = set()
    for sigma in sigmas:
        noisy = make_noisy(clean, sigma, noise_seed)
        samples[sigma], sigma_rows, per_image = {}, [], {}
        for name, method in methods.items():
            n = len(clean) if method.max_images is None else min(method.max_images, len(clean))
            if n == 0:
                continue
            if method.warm_up and name not in warmed:
                method.fn(noisy[:1], sigma)
                warmed.add(name)
            start = time.perf_counter()
            estimate = method.fn(noisy[:n], sigma)
            seconds = time.perf_counter() - start
            psnr, ssim = psnr_ssim(clean[:n], estimate)
            (psnr_mean, psnr_ci), (ssim_mean, ssim_ci) = mean_ci95(psnr), mean_ci95(ssim)
            mse_psnr, mse_psnr_ci = psnr_of_mean_mse(psnr)
            speed = n / seconds if method.timed and seconds > 0 else float("nan")
            sigma_rows.append(dict(sigma=sigma, method=name, n_images=n, psnr=psnr_mean, psnr_ci95=psnr_ci,
                                   ssim=ssim_mean, ssim_ci95=ssim_ci, images_per_s=speed,
                                   psnr_of_mean_mse=mse_psnr, psnr_of_mean_mse_ci95=mse_psnr_ci))
            samples[sigma][name], per_image[name] = np.clip(estimate[:keep_images], 0, 1), (psnr, ssim)
            log.info("sigma %g  %-14s PSNR %6.2f ± %.2f dB  SSIM %.4f  n=%d  %.1f images/s",
                     sigma, name, psnr_mean, psnr_ci, ssim_mean, n, speed)
        one_step = per_image.get(ONE_STEP)
        for row in sigma_rows:
            for metric, scores in zip(("psnr", "ssim"), one_step or (None, None)):
                row[f"{metric}_1step_same_images"] = (float(scores[: row["n_images"]].mean()) if scores is not None
                                                      else float("nan"))
        rows += sigma_rows
    return Evaluation(pd.DataFrame(rows, columns=TABLE_COLUMNS), clean[:keep_images], samples)


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
    n = len(evaluation.clean_samples)
    fig = Figure(figsize=(len(columns) * max(n, 1) * 0.55, len(sigmas) * 0.9 + 0.4))
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


def evaluate(params: Params, checkpoint_path: str | Path, device: str | None = None, workers: int = 1) -> pd.DataFrame:
    """Evaluate a checkpoint on the first ``eval.n_images`` test images; write the files; return the table.

    ``device`` defaults to ``train.device``; ``workers`` is the number of processes for the CPU baselines.
    """
    from ddim_denoise.denoising.denoiser import Denoiser

    cfg = params.eval
    test, _ = load_split(params.data.prepared_dir, "test")
    if len(test) < cfg.n_images:
        log.warning("eval.n_images=%d but the test split holds %d images: evaluating all of them",
                    cfg.n_images, len(test))
    clean = to_float(test[: cfg.n_images])
    denoiser = Denoiser.from_checkpoint(checkpoint_path, device=device or params.train.device, amp=cfg.amp)
    # The checkpoint's params describe its model; how to evaluate it (eval.unclip_passes) is this run's to say
    denoiser.params = denoiser.params.model_copy(update={"eval": cfg})
    methods = build_methods(denoiser, cfg, workers)
    evaluation = run_methods(clean, cfg.sigmas, methods, cfg.noise_seed, keep_images=cfg.grid_images)
    grid_columns = [CLEAN, NOISY, ONE_STEP, model_method_name(cfg.ddim_steps, cfg.ddim_stop_sigma)]
    paths = write_evaluation(evaluation, cfg.out_dir, list(dict.fromkeys(grid_columns)))
    log.info("wrote %s", ", ".join(map(str, paths.values())))
    return evaluation.table
