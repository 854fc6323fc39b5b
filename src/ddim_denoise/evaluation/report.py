"""The Markdown report: evaluation tables and figures, training curves and cost, beside the origin report's numbers.

Every number and figure comes from the files the pipeline wrote (``evaluation/``, ``training/``); the only
constants are the origin report's published results, kept here to be compared against. Training files that are
missing are reported as missing rather than invented; the evaluation table is required.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ddim_denoise.evaluation.evaluate import NOISY, ONE_STEP, method_label, save_png
from ddim_denoise.pipeline.checkpoint import atomic_path, atomic_write_text
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.pipeline.files import (
    GRID_FILE,
    REPORT_FILE,
    STEPS_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    TRAINING_DIR,
    VAL_FILE,
)
from ddim_denoise.pipeline.params import Params

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
FIGURE_DPI = 120
LOSS_SMOOTHING_POINTS = 50  # rolling-mean window over the logged loss points

# The origin report's published test results (PSNR dB, SSIM) per pixel-scale sigma: its model scored below the
# PSNR of its own noisy input at 0.2 and 0.3 (it gave 14.0 / 10.5 / 6.0 dB, scored unclipped; the noisy-input row
# here is scored clipped, like every estimate). These are the only hard-coded results in the report.
ORIGIN_REPORT = {0.2: (9.56, 0.4123), 0.3: (8.90, 0.3638), 0.5: (7.73, 0.2872)}
ORIGIN_LABEL = "origin report"


def load_training_summary(training_dir: str | Path = TRAINING_DIR) -> dict | None:
    """training/summary.json as a dict, or None when training has not written it."""
    path = Path(training_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run the train stage") from None


def training_run_id(training_dir: str | Path = TRAINING_DIR) -> str | None:
    """The MLflow run id the train stage recorded, or None."""
    return (load_training_summary(training_dir) or {}).get("mlflow_run_id")


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; re-run the stage that writes it")
    return frame


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def plot_psnr_vs_sigma(table: pd.DataFrame):
    """PSNR and SSIM against sigma, one line per method with 95% CI bars, and the origin report's points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    origin_sigmas = sorted(ORIGIN_REPORT)
    for ax, metric, index in ((axes[0], "psnr", 0), (axes[1], "ssim", 1)):
        for method, rows in table.groupby("method", sort=False):
            rows = rows.sort_values("sigma")
            ax.errorbar(rows.sigma, rows[metric], yerr=rows[f"{metric}_ci95"].fillna(0), marker="o", capsize=3,
                        label=f"{method_label(method)} (n={rows.n_images.iloc[0]})",
                        linestyle=":" if method == NOISY else "-")
        ax.plot(origin_sigmas, [ORIGIN_REPORT[s][index] for s in origin_sigmas], "kx--", label=ORIGIN_LABEL)
        ax.set_xlabel("noise σ (pixel scale [0, 1])")
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def plot_loss(steps: pd.DataFrame):
    fig, ax = _figure()
    ax.plot(steps.step, steps.loss, alpha=0.3, linewidth=0.8, label="logged")
    window = max(1, min(LOSS_SMOOTHING_POINTS, len(steps) // 10))
    ax.plot(steps.step, steps.loss.rolling(window, min_periods=1).mean(), label=f"rolling mean ({window} points)")
    if (steps.loss > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_lr(steps: pd.DataFrame):
    fig, ax = _figure(6.0, 3.0)
    ax.plot(steps.step, steps.lr)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    return fig


def plot_val_psnr(val: pd.DataFrame):
    fig, ax = _figure()
    for sigma, rows in val.groupby("sigma"):
        ax.plot(rows.epoch, rows.psnr, marker=".", label=f"σ = {sigma:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _fmt(value: float, digits: int) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def results_table(table: pd.DataFrame, origin: dict[float, tuple[float, float]] | None = ORIGIN_REPORT) -> str:
    """Markdown: one row per sigma, one 'PSNR / SSIM' column per method (in table order), and ``origin``'s column.

    Sigmas only the origin report has get a row too, so its numbers always appear; ``origin=None`` leaves it out.
    """
    origin = origin or {}
    methods = list(dict.fromkeys(table.method))
    counts = table.groupby("method", sort=False).n_images.max()
    header = ["σ", *(f"{method_label(m)} (n={counts[m]})" for m in methods), *([ORIGIN_LABEL] if origin else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sigma in sorted(set(table.sigma.round(6)) | set(origin)):
        by_method = table[np.isclose(table.sigma, sigma)].set_index("method")
        cells = [f"{sigma:g}"]
        for m in methods:
            cells.append(f"{by_method.psnr[m]:.2f} / {by_method.ssim[m]:.4f}" if m in by_method.index else "–")
        if origin:
            theirs = origin.get(sigma)
            cells.append(f"{theirs[0]:.2f} / {theirs[1]:.4f}" if theirs else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(table: pd.DataFrame) -> str:
    """Markdown: every row of the evaluation with its 95% CIs, image count and speed."""
    lines = ["| σ | method | n | PSNR (dB) ± 95% CI | SSIM ± 95% CI | images/s |", "|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.sigma:g} | {method_label(r.method)} | {r.n_images} "
                     f"| {_fmt(r.psnr, 2)} ± {_fmt(r.psnr_ci95, 2)} | {_fmt(r.ssim, 4)} ± {_fmt(r.ssim_ci95, 4)} "
                     f"| {_fmt(r.images_per_s, 1)} |")
    return "\n".join(lines)


def _per_sigma(table: pd.DataFrame, method: str) -> pd.DataFrame:
    return table[table.method == method].set_index("sigma")


def findings(table: pd.DataFrame) -> list[str]:
    """Plain statements computed from the table: gain over the input, the origin and BM3D; one-step vs DDIM."""
    notes = []
    one, noisy = _per_sigma(table, ONE_STEP), _per_sigma(table, NOISY)
    shared = one.index.intersection(noisy.index)
    if len(shared):
        gains = ", ".join(f"{one.psnr[s] - noisy.psnr[s]:+.2f} dB at σ={s:g}" for s in shared)
        verdict = "above" if (one.psnr[shared] > noisy.psnr[shared]).all() else "NOT above at every σ"
        notes.append(f"One-step model vs its noisy input: {gains} ({verdict} the input).")
    origin_shared = [s for s in one.index if round(float(s), 6) in ORIGIN_REPORT]
    if origin_shared:
        parts = []
        for s in origin_shared:
            ours, theirs = one.psnr[s], ORIGIN_REPORT[round(float(s), 6)][0]
            input_psnr = f", noisy input {noisy.psnr[s]:.2f} dB clipped" if s in noisy.index else ""
            parts.append(f"σ={s:g}: {ours:.2f} dB vs {theirs:.2f} dB{input_psnr}")
        notes.append("One-step model vs the origin report (whose model scored below its own unclipped noisy input, "
                     "14.0 / 10.5 dB at σ=0.2 / 0.3): "
                     + "; ".join(parts) + ".")
    bm3d = _per_sigma(table, "bm3d")
    if len(bm3d) and len(one):
        sigmas = [s for s in bm3d.index if s in one.index]
        if "psnr_1step_same_images" in bm3d:  # paired: the model on BM3D's own images
            gaps = ", ".join(f"{bm3d.psnr_1step_same_images[s] - bm3d.psnr[s]:+.2f} dB at σ={s:g}" for s in sigmas)
            notes.append(f"One-step model minus BM3D on the same {bm3d.n_images.max()} images: {gaps}.")
        else:  # a table written before evaluate recorded the pairing
            gaps = ", ".join(f"{one.psnr[s] - bm3d.psnr[s]:+.2f} dB at σ={s:g}" for s in sigmas)
            notes.append(f"One-step model minus BM3D (BM3D on its first {bm3d.n_images.max()} images, the model on "
                         f"{one.n_images.max()}): {gaps}.")
    for method in dict.fromkeys(m for m in table.method if m.startswith("model_ddim")):
        notes.append(_tradeoff(one, _per_sigma(table, method), method_label(method)))
    return notes


def _one_step_on_the_same_images(one: pd.DataFrame, rows: pd.DataFrame, metric: str) -> pd.Series:
    """The one-step model's mean on the images each row covers (DDIM on eval.ddim_images runs on the first ones
    only); the mean over all its images for tables written before that column existed."""
    paired = rows.get(f"{metric}_1step_same_images")
    return one[metric] if paired is None or paired.isna().all() else paired


def _tradeoff(one: pd.DataFrame, ddim: pd.DataFrame, label: str) -> str:
    sigmas = ddim.index.intersection(one.index)
    d_psnr, d_ssim = (ddim[metric][sigmas] - _one_step_on_the_same_images(one, ddim, metric)[sigmas]
                      for metric in ("psnr", "ssim"))
    slowdown = float(np.nanmedian(one.images_per_s[sigmas] / ddim.images_per_s[sigmas]))
    per_sigma = ", ".join(f"{d_psnr[s]:+.2f} dB / {d_ssim[s]:+.4f} SSIM at σ={s:g}" for s in sigmas)
    better, worse = [f"{s:g}" for s in sigmas if d_psnr[s] > 0], [f"{s:g}" for s in sigmas if d_psnr[s] <= 0]
    cost = f"{slowdown:.1f}× slower than one step (median over σ)" if np.isfinite(slowdown) else "speed not measured"
    if not worse:
        verdict = f"{label} gains PSNR at every σ, at {cost}."
    elif not better:
        verdict = (f"{label} does not gain PSNR at any σ and runs {cost}: for PSNR/SSIM the one-step estimate "
                   "(the network's posterior-mean estimate, which is what PSNR rewards) is the better choice.")
    else:
        verdict = (f"{label} gains PSNR at σ ∈ {{{', '.join(better)}}} and loses at σ ∈ {{{', '.join(worse)}}}; "
                   f"{cost}.")
    return f"{label} minus one-step: {per_sigma}. {verdict}"


def training_section(summary: dict | None, steps: pd.DataFrame | None, val: pd.DataFrame | None,
                     figures: dict[str, str]) -> list[str]:
    lines = ["## Training", ""]
    if summary is None:
        lines += [f"`{TRAINING_DIR / SUMMARY_FILE}` not found: no training cost to report.", ""]
    else:
        hours = summary.get("train_seconds", float("nan")) / 3600
        best = summary.get("best_val_psnr")
        rows = [
            ("parameters", f"{summary.get('parameters', 0):,}"),
            ("epochs / optimizer steps", f"{summary.get('epochs')} / {summary.get('steps')}"),
            ("training images seen", f"{summary.get('train_images_seen', 0):,}"),
            ("training time", f"{summary.get('train_seconds', float('nan')):.0f} s ({hours:.2f} h)"),
            ("throughput", f"{summary.get('images_per_s', float('nan')):.1f} images/s"),
            # outside the training steps; summaries written before they were timed lack them
            ("validation / checkpoint writes",
             f"{summary['validation_seconds']:.1f} s / {summary['checkpoint_seconds']:.1f} s"
             if "validation_seconds" in summary and "checkpoint_seconds" in summary else "–"),
            ("precision / device", f"{summary.get('precision')} / {summary.get('device')}"),
            ("best validation PSNR",
             f"{best:.2f} dB (epoch {summary.get('best_epoch')})" if best is not None else "–"),
            ("MLflow run", f"`{summary.get('mlflow_run_id')}`"),
        ]
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    for key, caption, source in (("loss", "Training loss", steps), ("lr", "Learning rate", steps),
                                 ("val_psnr", "Validation PSNR per epoch", val)):
        if key in figures:
            lines += [f"![{caption}]({figures[key]})", ""]
        elif source is None:
            lines += [f"{caption}: no data (training file missing).", ""]
    return lines


def write_report(params: Params, training_dir: str | Path = TRAINING_DIR) -> Path:
    """Write ``report.md`` and its figures into ``params.report.out_dir``; return the report's path."""
    out_dir = Path(params.report.out_dir)
    fig_dir = out_dir / FIGURES_DIR
    eval_dir = Path(params.eval.out_dir)
    training_dir = Path(training_dir)
    table = _read_csv(eval_dir / TABLE_FILE, ["sigma", "method", "n_images", "psnr", "psnr_ci95", "ssim",
                                              "ssim_ci95", "images_per_s"])
    if table is None:
        raise DataError(f"{eval_dir / TABLE_FILE} not found: run `ddim-denoise evaluate` first")
    summary = load_training_summary(training_dir)
    steps = _read_csv(training_dir / STEPS_FILE, ["step", "epoch", "loss", "lr"])
    val = _read_csv(training_dir / VAL_FILE, ["epoch", "sigma", "psnr", "ssim"])

    figures: dict[str, str] = {}  # key -> path relative to the report

    def add(key: str, fig) -> None:
        save_png(fig, fig_dir / f"{key}.png", dpi=FIGURE_DPI)
        figures[key] = f"{FIGURES_DIR}/{key}.png"

    add("psnr_vs_sigma", plot_psnr_vs_sigma(table))
    if steps is not None and len(steps):
        add("loss", plot_loss(steps))
        add("lr", plot_lr(steps))
    if val is not None and len(val):
        add("val_psnr", plot_val_psnr(val))
    if (eval_dir / GRID_FILE).is_file():
        with atomic_path(fig_dir / GRID_FILE, suffix=".png") as tmp:
            shutil.copyfile(eval_dir / GRID_FILE, tmp)
        figures["grid"] = f"{FIGURES_DIR}/{GRID_FILE}"

    n_test = int(table.n_images.max())
    data = (f"your pictures ({params.data.raw_dir})" if params.data.source == "folder" else "CIFAR-10")
    test_images = (f"the first {n_test} test pictures of {params.data.raw_dir}, each denoised whole"
                   if params.data.source == "folder" else f"the first {n_test} CIFAR-10 test images")
    lines = [
        f"# ddim-denoise: Gaussian denoising on {data}",
        "",
        f"Evaluated on {test_images}. Noise: x + N(0, σ²) on the [0, 1] pixel scale "
        "(σ = 0.1 is 25.5/255). The methods get the noisy input unclipped; their estimates and the noisy input's "
        "own row are scored after clipping to [0, 1]. Every method sees "
        "the same noisy images; PSNR and SSIM are per-image means with 95% confidence intervals. "
        f"Source: `{eval_dir / TABLE_FILE}`.",
        "",
        "## Results",
        "",
        "PSNR (dB) / SSIM; n = images evaluated per method.",
        "",
        results_table(table),
        "",
        *(f"- {note}" for note in findings(table)),
        "",
        f"![PSNR and SSIM vs σ]({figures['psnr_vs_sigma']})",
        "",
        "### All rows",
        "",
        "images/s is the wall time of each method alone in the evaluation run (the model on the evaluation device, "
        "BM3D and NLM on the CPU).",
        "",
        detail_table(table),
        "",
    ]
    if "grid" in figures:
        lines += ["## Examples", "", f"![clean, noisy, one-step and DDIM estimates per σ]({figures['grid']})", ""]
    lines += training_section(summary, steps, val, figures)
    path = out_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(lines))
    log.info("wrote %s and %d figure(s) in %s", path, len(figures), fig_dir)
    return path
