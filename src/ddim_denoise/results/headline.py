"""The headline study's table (pipelines/results/headline): the model on the first 1,000 test images in their
original pixels, beside the published diffusion denoisers in the form they publish, the PSNR of the mean MSE. The
recipe studies (pipelines/results/recipes) score their models the same way and are shown the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ddim_denoise.evaluation.evaluate import NOISY, ONE_STEP, TABLE_COLUMNS
from ddim_denoise.pipeline.files import SUMMARY_FILE, TABLE_FILE, TRAINING_DIR
from ddim_denoise.results.sources import TRAINING_SUMMARY, read_csv, rows_by_sigma, training_summary

STUDY = "pipelines/results/headline"
ANCHORS = f"{STUDY}/anchors.csv"  # published figures, typed in with their source
ANCHOR_COLUMNS = ("model", "parameters", "sigma", "psnr_of_mean_mse", "source")
BM3D = "bm3d"
RECIPES = "pipelines/results/recipes"


@dataclass(frozen=True)
class Scored:
    """A trained model scored on the headline study's images: what it is, its files, and the command that reruns it."""
    model: str  # the lead's subject
    label: str  # its column heading
    table: str  # its evaluation table, repository-relative
    summary: str  # its training summary
    rerun: str

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.table, ANCHORS, self.summary)


MAIN_CHAIN = Scored("The main chain's model", "quick profile", f"{STUDY}/{TABLE_FILE}", TRAINING_SUMMARY,
                    f"dvc repro {STUDY}/dvc.yaml")


def recipe(profile: str) -> Scored:
    """The recipe study of one profile (pipelines/results/recipes/dvc.yaml's ${item})."""
    return Scored(f"The `{profile}` recipe's model", f"{profile} recipe",
                  f"{RECIPES}/{profile}/evaluation/{TABLE_FILE}",
                  f"{RECIPES}/{profile}/{TRAINING_DIR.name}/{SUMMARY_FILE}",
                  f"dvc repro {RECIPES}/dvc.yaml:evaluate@{profile}")


CPU_RECIPE = recipe("cpu")
README_MODELS = (MAIN_CHAIN, CPU_RECIPE)  # the models the README sets beside the published ones


def sources(*models: Scored) -> tuple[str, ...]:
    """The files the blocks showing ``models`` read, each once."""
    return tuple(dict.fromkeys(source for scored in models for source in scored.sources))


def _with_ci(value: float, ci: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} ± {ci:.{digits}f}"


def _scored_files(root: Path, scored: Scored) -> tuple[pd.DataFrame, dict]:
    return read_csv(root, scored.table, TABLE_COLUMNS), training_summary(root, scored.summary)


def _anchors(root: Path) -> pd.DataFrame:
    return read_csv(root, ANCHORS, ANCHOR_COLUMNS)


def _published(anchors: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The published PSNRs by sigma x model, and each model's column heading with its size, in the file's order."""
    sizes = anchors.drop_duplicates("model").set_index("model").parameters
    return (anchors.pivot(index="sigma", columns="model", values="psnr_of_mean_mse"),
            {model: f"{model} ({size})" for model, size in sizes.items()})


def _standing(one: pd.DataFrame, anchors: pd.DataFrame, who: str = "PSNR of the mean MSE") -> list[str]:
    """Per published model: our PSNR of the mean MSE minus theirs at each sigma, and where ours is at or above."""
    lines = []
    for model, published in anchors.groupby("model", sort=False):
        gaps = one.psnr_of_mean_mse.reindex(published.sigma).to_numpy() - published.psnr_of_mean_mse.to_numpy()
        at_or_above = [f"{s:g}" for s, gap in zip(published.sigma, gaps) if gap >= 0]
        lines.append(f"- {who} minus {model}: "
                     + " / ".join(f"{gap:+.2f}" for gap in gaps) + " dB at σ = "
                     + " / ".join(f"{s:g}" for s in published.sigma) + "; at or above it at "
                     + (f"σ = {', '.join(at_or_above)}" if at_or_above else "no σ") + ".")
    return lines


def _lead(scored: Scored, one: pd.DataFrame, anchors: pd.DataFrame, summary: dict) -> str:
    return (f"{scored.model} ({summary['parameters'] / 1e6:.2f}M parameters, {summary['train_images_seen']:,} "
            f"training images in {summary['train_seconds']:.0f} s on {summary['device_name']}) on the first "
            f"{int(one.n_images.max()):,} CIFAR-10 test images in their original pixels (`{scored.rerun}`), one step. "
            f"Published: {anchors.source.iloc[0]}, over all 10,000 test images.")


def render(root: Path, scored: Scored = MAIN_CHAIN) -> str:
    """Every column the issue of comparability needs: both PSNR forms with 95% CIs, SSIM, the noisy input, BM3D
    paired on its own images, and the anchors."""
    (table, summary), anchors = _scored_files(root, scored), _anchors(root)
    one, noisy, bm3d = (rows_by_sigma(table, m) for m in (ONE_STEP, NOISY, BM3D))
    published, named = _published(anchors)
    n_bm3d = int(bm3d.n_images.max()) if len(bm3d) else 0
    header = ["σ", "noisy input", "one-step: mean PSNR", "one-step: PSNR of mean MSE", "one-step: SSIM",
              *named.values(), f"BM3D (n={n_bm3d})", "one-step on BM3D's images"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sigma, row in one.iterrows():
        cells = [f"{sigma:g}", f"{noisy.psnr.get(sigma, float('nan')):.2f}", _with_ci(row.psnr, row.psnr_ci95),
                 _with_ci(row.psnr_of_mean_mse, row.psnr_of_mean_mse_ci95), _with_ci(row.ssim, row.ssim_ci95, 4),
                 *(f"{published.at[sigma, m]:.1f}" for m in named)]
        if sigma in bm3d.index:
            paired = bm3d.loc[sigma]
            cells += [_with_ci(paired.psnr, paired.psnr_ci95), f"{paired.psnr_1step_same_images:.2f}"]
        else:
            cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- One-step minus BM3D on BM3D's {n_bm3d} images: "
             + ", ".join(f"{bm3d.psnr_1step_same_images[s] - bm3d.psnr[s]:+.2f} dB at σ={s:g}" for s in bm3d.index)
             + "."] if n_bm3d else []
    return "\n".join([_lead(scored, one, anchors, summary), "", "PSNR in dB ± 95% CI.", "", *lines, "", *notes,
                      *_standing(one, anchors)])


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def render_short(root: Path, models: tuple[Scored, ...] = README_MODELS) -> str:
    """The README's form: each model's PSNR of the mean MSE beside the published models', and where each stands."""
    anchors = _anchors(root)
    columns, headings, standing = [], [], []
    for scored in models:
        table, summary = _scored_files(root, scored)
        one = rows_by_sigma(table, ONE_STEP)
        columns.append(one)
        headings.append(f"{scored.label} ({summary['parameters'] / 1e6:.2f}M, "
                        f"{_duration(summary['train_seconds'])} of training)")
        standing += _standing(one, anchors, who=scored.label)
    published, named = _published(anchors)
    header = ["σ", *headings, *named.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sigma in columns[0].index:
        lines.append("| " + " | ".join([f"{sigma:g}",
                                        *(_with_ci(one.psnr_of_mean_mse[sigma], one.psnr_of_mean_mse_ci95[sigma])
                                          for one in columns),
                                        *(f"{published.at[sigma, m]:.1f}" for m in named)]) + " |")
    return "\n".join([f"PSNR of the mean MSE (dB), one step, on the first {int(columns[0].n_images.max()):,} test "
                      f"images in their original pixels; the published figures are {anchors.source.iloc[0]}. "
                      "More in [docs/results.md](docs/results.md).", "", *lines, "", *standing])
