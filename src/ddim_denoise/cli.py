"""The ``ddim-denoise`` command line: thin wrappers that parse options and call library functions.

Heavy imports (torch, mlflow) happen inside each command so that ``--help`` and bad-input errors stay fast.
Every expected failure (bad params, bad data, bad checkpoint) prints one line to stderr and exits with code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from ddim_denoise.data.image_io import DEFAULT_MAX_PIXELS  # light: numpy, which the package imports anyway
from ddim_denoise.pipeline.files import TRAINING_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and use a DDIM diffusion denoiser.")

PARAMS_OPT = typer.Option("params.yaml", "--params", "-p", help="params file (DVC's params.yaml)")
SET_OPT = typer.Option(None, "--set", "-S", help="override a param, e.g. -S train.lr=2e-4 (repeatable)")


class UserError(Exception):
    """An expected failure the user can fix; the CLI prints it as one line and exits 2."""


def user_errors(fn):
    """Turn the package's expected errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ddim_denoise.pipeline.errors import EXPECTED_ERRORS

        try:
            return fn(*args, **kwargs)
        except (UserError, *EXPECTED_ERRORS) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_overrides(items: Optional[list[str]], option: str = "--set") -> dict[str, object]:
    from ddim_denoise.pipeline.params import parse_overrides as parse

    return parse(items, option, UserError)


def load(params_path: str, overrides: Optional[list[str]] = None):
    from ddim_denoise.pipeline.params import load_params

    return load_params(params_path, parse_overrides(overrides))


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@app.command()
@user_errors
def train(params: str = PARAMS_OPT, set_: Optional[list[str]] = SET_OPT,
          nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="processes (GPUs) on this machine: "
                                             "more than 1 relaunches through torchrun (DDP); each takes "
                                             "train.batch_size images per step"),
          records_dir: str = typer.Option(str(TRAINING_DIR), "--records-dir", help="where the run's summary.json and "
                                          "CSV histories go (a study beside the main chain keeps its own)")):
    """Train the diffusion U-Net (resumes an interrupted run from models/last.pt). Under torchrun, one rank each."""
    from ddim_denoise.training.distributed import relaunch_with_torchrun, train_as_launched

    cfg = load(params, set_)  # every params problem is reported here, before any process or work starts
    if nproc_per_node > 1:
        overrides = [arg for item in set_ or [] for arg in ("--set", item)]
        raise typer.Exit(relaunch_with_torchrun(nproc_per_node, ["train", "--params", params, *overrides,
                                                                 "--records-dir", records_dir]))
    summary = train_as_launched(cfg, records_dir)
    if summary is None:  # a rank other than 0: rank 0 reports for the run
        return
    steady = summary["steady_images_per_s"]
    typer.echo(f"trained {summary['epochs']} epochs at {summary['images_per_s']:.0f} img/s"
               + (f" ({steady:.0f} after the first epoch)" if steady else "") + "; "
               f"best validation PSNR {summary['best_val_psnr']:.2f} dB (epoch {summary['best_epoch']})")


@app.command("prepare")
@user_errors
def prepare_command(params: str = PARAMS_OPT, set_: Optional[list[str]] = SET_OPT):
    """Split the data (data.source: CIFAR-10 or a folder of pictures) into seeded train / validation / test
    (the DVC prepare stage)."""
    from ddim_denoise.data.prepared import manifest_tags, prepare

    manifest = prepare(load(params, set_))
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    source, tags = manifest["source"], manifest_tags(manifest)
    typer.echo(f"prepared {counts} images from {source['kind']} {source['path']} "
               f"(sha256 {manifest['dataset_sha256'][:12]}); originals: {tags['data_originals']}; "
               f"validation: {tags['data_val_split']}")


@app.command("fetch-data")
@user_errors
def fetch_data_command(params: str = PARAMS_OPT, set_: Optional[list[str]] = SET_OPT):
    """Check that data/raw holds CIFAR-10 (downloading it if data.download allows); run before dvc repro."""
    from ddim_denoise.data.cifar10 import fetch_data

    cfg = load(params, set_).data
    typer.echo(fetch_data(cfg.raw_dir, cfg.download, dvc_file="data.dvc"))


def log_to_training_run(params, metrics: dict[str, float] | None = None,
                        artifacts: tuple[tuple[Path, str], ...] = (), records_dir: str | Path = TRAINING_DIR):
    """Add metrics and (path, artifact folder) pairs to the training's MLflow run, if training recorded one in
    ``records_dir``; return that run's id."""
    from ddim_denoise.evaluation.report import training_run_id
    from ddim_denoise.pipeline.tracking import start_run

    run_id = training_run_id(records_dir)
    if run_id is None:
        logging.getLogger(__name__).warning("no MLflow run id in %s/summary.json: results not logged to MLflow",
                                            records_dir)
        return None
    run = start_run(params.mlflow.experiment, run_id=run_id)
    if metrics:
        run.log_metrics(metrics)
    for path, artifact_path in artifacts:
        (run.log_artifacts if Path(path).is_dir() else run.log_artifact)(path, artifact_path)
    run.finish()
    return run.run_id


@app.command("evaluate")
@user_errors
def evaluate_command(params: str = PARAMS_OPT, set_: Optional[list[str]] = SET_OPT,
                     checkpoint: Path = typer.Option(Path("models/best.pt"), "--checkpoint", "-c",
                                                     help="checkpoint to evaluate"),
                     device: Optional[str] = typer.Option(None, "--device", help="default: train.device"),
                     workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                                           help="processes for BM3D/NLM (default: eval.workers)"),
                     mlflow_prefix: str = typer.Option("test", "--mlflow-prefix",
                                                       help="MLflow metric names start with it (a study's own "
                                                            "evaluation keeps the pipeline's test_* metrics)"),
                     records_dir: str = typer.Option(str(TRAINING_DIR), "--records-dir",
                                                     help="the training records whose MLflow run gets the results "
                                                          "(train --records-dir)")):
    """Score the model, the noisy input, BM3D and NLM on the test split; write eval.out_dir."""
    from ddim_denoise.evaluation.baselines import resolve_workers
    from ddim_denoise.evaluation.evaluate import evaluate, mlflow_metrics
    from ddim_denoise.pipeline.files import GRID_FILE, METRICS_FILE, TABLE_FILE

    cfg = load(params, set_)
    table = evaluate(cfg, checkpoint, device=device, workers=workers or resolve_workers(cfg.eval.workers))
    out = Path(cfg.eval.out_dir)
    files = [out / name for name in (METRICS_FILE, TABLE_FILE, GRID_FILE) if (out / name).is_file()]
    metrics = mlflow_metrics(table, mlflow_prefix)
    run_id = log_to_training_run(cfg, metrics, tuple((f, out.name) for f in files), records_dir)
    if run_id and cfg.mlflow.log_model:
        from ddim_denoise.serving.pyfunc import log_evaluated_model

        log_evaluated_model(checkpoint, run_id, cfg.mlflow.registered_model or None, metrics)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


@app.command("report")
@user_errors
def report_command(params: str = PARAMS_OPT):
    """Write reports/report.md with figures from evaluation/ and training/."""
    from ddim_denoise.evaluation.report import write_report

    cfg = load(params)
    path = write_report(cfg)
    log_to_training_run(cfg, artifacts=((path.parent, "reports"),))
    typer.echo(str(path))


@app.command("docs")
@user_errors
def docs_command(check: bool = typer.Option(False, "--check", help="write nothing; list the blocks that differ from "
                                            "their files and exit 1 if any does"),
                 root: Path = typer.Option(Path("."), "--root", help="repository root")):
    """Write the generated blocks of README.md and docs/*.md (their figures) from the committed pipeline outputs."""
    from ddim_denoise.results.docs import write_docs

    lines = write_docs(root, check)
    typer.echo("\n".join(lines) or "every generated block matches its files")
    if check and lines:
        raise typer.Exit(1)


def given(**options) -> dict:
    """The options the user set: the others keep the library's defaults (one place for each default)."""
    return {name: value for name, value in options.items() if value is not None}


@app.command("denoise")
@user_errors
def denoise_command(
    inputs: list[Path] = typer.Argument(..., help="images: PNG, JPEG, TIFF, WebP or .npy (8/16-bit, gray, RGB(A))",
                                        show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: same names, formats and bit depths"),
    sigma: Optional[str] = typer.Option(None, "--sigma", "-s", help="noise level on the [0,1] pixel scale, in (0, 1] "
                                        "(0.1 = 25.5/255)"),
    estimate: bool = typer.Option(False, "--estimate", help="estimate sigma per image (printed) instead of --sigma"),
    steps: int = typer.Option(1, "--steps", "-k", help="DDIM steps (1: one-step estimate)"),
    eta: float = typer.Option(0.0, "--eta", help="DDIM stochasticity (0: deterministic)"),
    ddim_stop_sigma: float = typer.Option(0.0, "--ddim-stop-sigma", help="with --steps > 1: stop DDIM at this noise "
                                          "level (pixel scale) instead of 0; at the model's training floor "
                                          "(diffusion.sigma_min, 0.05) it loses less PSNR than walking to 0"),
    mono_noise: bool = typer.Option(False, "--mono-noise", help="the same noise in R, G and B (an editor's "
                                    "monochromatic noise); sigma up to 0.577"),
    detect_mono_noise: bool = typer.Option(False, "--detect-mono-noise", help="decide per image whether its noise "
                                           "is monochromatic (printed), instead of --mono-noise"),
    tile: Optional[int] = typer.Option(None, "--tile", help="tile size for large images, pixels (default 64)"),
    overlap: Optional[int] = typer.Option(None, "--overlap", help="overlap of neighbouring tiles, pixels (default 16)"),
    tile_batch: Optional[int] = typer.Option(None, "--tile-batch", help="tiles per model call, bounds memory "
                                             "(default 16)"),
    quality: Optional[int] = typer.Option(None, "--quality", help="JPEG / lossy WebP quality of outputs (default 95)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="checkpoint (default models/best.pt)"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="MLflow training run to take the checkpoint from"),
    run_artifact: Optional[str] = typer.Option(None, "--run-artifact", help="checkpoint path in that run "
                                               "(default checkpoints/best.pt)"),
    model_uri: Optional[str] = typer.Option(None, "--model-uri", help="MLflow model, e.g. models:/ddim-denoiser/1"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default auto)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace files already in --out (never an input)"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="refuse images with more pixels, read from "
                                             "their header before decoding (default "
                                             f"{DEFAULT_MAX_PIXELS:,})"),
):
    """Remove Gaussian noise from image files (large ones in blended tiles); write them to --out."""
    from tqdm import tqdm

    from ddim_denoise.data.image_io import DecodeLimits
    from ddim_denoise.denoising.tiling import TileOptions
    from ddim_denoise.serving.denoise_files import (
        DenoiseOptions,
        check_pixel_sigma,
        denoise_files,
        load_denoiser,
        plan_outputs,
    )
    from ddim_denoise.serving.model_source import resolved_checkpoint

    if (sigma is None) == (not estimate):
        raise UserError("give either --sigma S (pixel scale, e.g. 0.1) or --estimate")
    if mono_noise and detect_mono_noise:
        raise UserError("give --mono-noise (every image's noise is monochromatic) or --detect-mono-noise, not both")
    tiles = TileOptions(**given(tile=tile, overlap=overlap, batch=tile_batch))
    options = DenoiseOptions(sigma=None if estimate else check_pixel_sigma(sigma), steps=steps, eta=eta, tiles=tiles,
                             ddim_stop_sigma=ddim_stop_sigma,
                             mono_noise="auto" if detect_mono_noise else mono_noise,
                             **given(quality=quality)).validate()
    limits = DecodeLimits(**given(max_pixels=max_pixels)).validate()
    plan_outputs(inputs, out, overwrite)  # missing inputs and existing outputs: refused before the model loads
    with resolved_checkpoint(checkpoint, run_id, model_uri, **given(run_artifact=run_artifact)) as path:
        denoiser = load_denoiser(path, device)

    def report(item):
        found = [f"estimated sigma {item.sigma:.4f} ({item.sigma * 255:.1f}/255)"] if item.estimated else []
        if detect_mono_noise:
            found.append("monochromatic noise" if item.mono_noise else "noise drawn per channel")
        if found:
            tqdm.write(f"{item.source}: " + ", ".join(found))

    done = denoise_files(denoiser, inputs, out, options, progress=progress, report=report, overwrite=overwrite,
                         limits=limits)
    typer.echo(f"denoised {len(done)} image(s) into {out}")


@app.command("export")
@user_errors
def export_command(
    checkpoint: Path = typer.Option(Path("models/best.pt"), "--checkpoint", "-c", help="checkpoint to export"),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | torchscript"),
    out: Path = typer.Option(..., "--out", "-o", help="file to write, e.g. denoiser.onnx"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)"),
    check: bool = typer.Option(True, "--check/--no-check", help="compare with PyTorch on noisy photos afterwards"),
    atol: Optional[float] = typer.Option(None, "--atol", min=0.0,
                                         help="parity tolerance on [0,1] pixels (default 1e-4)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out file (never the checkpoint itself)"),
):
    """Export the one-step denoiser (images in [0,1] NCHW + per-image sigma -> denoised), dynamic batch and size."""
    from ddim_denoise.serving.export import DEFAULT_PARITY_ATOL, export_model, verify_export

    path = export_model(checkpoint, fmt, out, opset, force)
    typer.echo(f"exported {fmt} to {path}")
    if check:
        report = verify_export(path, checkpoint, fmt, DEFAULT_PARITY_ATOL if atol is None else atol)
        typer.echo(str(report))
        if not report.passed:
            raise typer.Exit(1)


# ---- sweep: Optuna search over params.yaml keys (logic in sweep/) -------------------------------------------------
sweep_app = typer.Typer(no_args_is_help=True, help="Optuna search over params.yaml keys "
                        "(pipelines/sweep/space.yaml), tracked in MLflow, resumable and parallel.")
app.add_typer(sweep_app, name="sweep")

SWEEP_STUDY_OPT = typer.Option(None, "--study", help="study name (default: derived from params.yaml, the space and "
                               "the data, so the same command resumes the same study)")
SWEEP_STORAGE_OPT = typer.Option(None, "--storage", help="Optuna storage: a SQLAlchemy URL (sqlite:///..., "
                                 "postgresql://...) or journal:PATH (default: sqlite <root>/mlruns/optuna.db)")
SWEEP_SPACE_OPT = typer.Option(Path("pipelines/sweep/space.yaml"), "--space", help="search space file")
SWEEP_BUDGET_OPT = typer.Option(None, "--budget", help="KEY=VALUE over the space file's budget (repeatable): the "
                                "same trials at another budget, in a study of its own")


def sweep_errors(fn):
    """The sweep's own expected failures (study settings changed, study not found) as one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ddim_denoise.sweep.storage import SweepError

        try:
            return fn(*args, **kwargs)
        except SweepError as e:
            raise UserError(str(e)) from None

    return wrapper


@sweep_app.command("run")
@user_errors
@sweep_errors
def sweep_run_command(
    trials: Optional[int] = typer.Option(None, "--trials", "-n", min=1, help="trials this process runs"),
    total: Optional[int] = typer.Option(None, "--total", min=1, help="stop once the study holds this many finished "
                                        "(complete or pruned) trials, counting earlier runs and other workers: "
                                        "rerunning the same command after a kill runs only what is missing"),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=1, help="seconds; no new trial starts after it"),
    study: Optional[str] = SWEEP_STUDY_OPT,
    storage: Optional[str] = SWEEP_STORAGE_OPT,
    space: Path = SWEEP_SPACE_OPT,
    pruner: Optional[str] = typer.Option(None, "--pruner", help="median | hyperband | threshold | none "
                                         "(default: the space file's pruner.default)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="reports folder (default sweeps/<study>)"),
    multi_objective: bool = typer.Option(False, "--multi-objective", help="maximise validation PSNR and training "
                                         "images/s (Pareto front; no pruning)"),
    stop_after_failures: int = typer.Option(5, "--stop-after-failures", min=0, help="stop this worker after this "
                                            "many failed trials in a row (0: never)"),
    budget: Optional[list[str]] = SWEEP_BUDGET_OPT,
    params: str = PARAMS_OPT,
):
    """Search the space: each trial trains with params.yaml + the space's budget + sampled values."""
    from ddim_denoise.sweep.study import SweepOptions, run_sweep, sigterm_as_keyboard_interrupt

    options = SweepOptions(params_path=Path(params), space_path=space, study=study, storage=storage, trials=trials,
                           total=total, timeout=timeout, pruner=pruner, out=out, multi_objective=multi_objective,
                           stop_after_failures=stop_after_failures, budget=parse_overrides(budget, "--budget"))
    with sigterm_as_keyboard_interrupt():
        result = run_sweep(options)
    counts = ", ".join(f"{n} {state}" for state, n in result.get("trials", {}).items() if n)
    best = (f"; best trial {result['best']['trial']}: {result['metric']} {result['best']['value']:.4f}"
            if "best" in result else "")
    typer.echo(f"study {result['study']}: {counts or 'no trials'}{best}; reports in {result.get('out_dir')}")


@sweep_app.command("best")
@user_errors
@sweep_errors
def sweep_best_command(
    study: Optional[str] = SWEEP_STUDY_OPT,
    storage: Optional[str] = SWEEP_STORAGE_OPT,
    space: Path = SWEEP_SPACE_OPT,
    trial: Optional[int] = typer.Option(None, "--trial", help="a given trial instead of the best (e.g. from the "
                                        "Pareto front)"),
    apply: bool = typer.Option(False, "--apply", help="write the trial's values into params.yaml's profile "
                               "(conf/profile/NAME.yaml, comments kept) and compose params.yaml again; refused "
                               "when the study ran under other defaults than params.yaml's, or `sweep verify` did "
                               "not find the trial better than the defaults at its full budget (--at)"),
    budget: Optional[list[str]] = SWEEP_BUDGET_OPT,
    params: str = PARAMS_OPT,
):
    """Print the best trial and the `dvc exp run -S ...` command that trains it with the full budget."""
    from ddim_denoise.sweep.study import SweepOptions, best_trial_report

    report = best_trial_report(SweepOptions(params_path=Path(params), space_path=space, study=study, storage=storage,
                                            budget=parse_overrides(budget, "--budget")), trial, apply)
    typer.echo(report.text)
    if report.command:
        typer.echo(f"train it for real:\n  {report.command}")
    if report.warning:
        typer.echo(f"warning: {report.warning}", err=True)
    for key, old, new in report.changes:
        typer.echo(f"{report.applied_to}: {key}: {old} -> {new}")
    if apply and report.command and not report.changes:
        typer.echo(f"{report.applied_to} already holds these values")


@sweep_app.command("verify")
@user_errors
@sweep_errors
def sweep_verify_command(
    study: Optional[str] = SWEEP_STUDY_OPT,
    storage: Optional[str] = SWEEP_STORAGE_OPT,
    space: Path = SWEEP_SPACE_OPT,
    trial: Optional[int] = typer.Option(None, "--trial", help="a given trial instead of the best"),
    budget: Optional[list[str]] = SWEEP_BUDGET_OPT,
    at: Optional[Path] = typer.Option(None, "--at", help="the params file whose budget both are trained at, e.g. "
                                      "pipelines/results/recipes/cpu/params.yaml (the CPU recipe; its finished "
                                      "training stands for the defaults); default: --params"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the verdict to this JSON file (a DVC metric)"),
    params: str = PARAMS_OPT,
):
    """Retrain the best trial beside params.yaml's defaults at a full budget (--at), compare them on the validation
    split, and record whether the trial wins by more than the 95% CI (`sweep best --apply` needs that)."""
    from ddim_denoise.sweep.study import SweepOptions, verify_best

    verification = verify_best(SweepOptions(params_path=Path(params), space_path=space, study=study, storage=storage,
                                            budget=parse_overrides(budget, "--budget")), trial, out, at)
    typer.echo(verification.line())


if __name__ == "__main__":  # torchrun -m ddim_denoise.cli and python -m ddim_denoise.cli
    app()
