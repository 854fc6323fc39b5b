"""The Optuna sweep on tiny data: space file validation, trials nested in MLflow, failures, pruning, resume, and
two worker processes sharing one study."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from cifar_fixtures import write_cifar_npz
from cli_workspace import one_error_line
from optuna.trial import TrialState
from picture_fixtures import write_picture_folder
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.data import prepared as data_module
from ddim_denoise.data.prepared import load_split, prepare
from ddim_denoise.evaluation import evaluate as evaluate_module
from ddim_denoise.pipeline import params as params_module
from ddim_denoise.pipeline.params import load_params, validate_params
from ddim_denoise.pipeline.profiles import compose_params
from ddim_denoise.sweep import storage as sweep_storage
from ddim_denoise.sweep import verify
from ddim_denoise.sweep.objective import DIVERGED_ATTR
from ddim_denoise.sweep.report import BASELINE_ATTR, ENQUEUED_ATTR
from ddim_denoise.sweep.space import SpaceError, load_space
from ddim_denoise.sweep.storage import (
    FAIL_REASON_ATTR,
    WORKER_ATTR,
    default_storage_url,
)
from ddim_denoise.sweep.study import SweepOptions, prepare_setup, run_sweep
from ddim_denoise.sweep.tracking import PARENT_RUN_ATTR
from ddim_denoise.training import build as train_build_module

pytestmark = pytest.mark.usefixtures("package_conf_unchanged")

REPO = Path(__file__).resolve().parents[1]
TINY_SPACE = {
    "parameters": {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
        "diffusion.prediction": {"type": "categorical", "choices": ["eps", "edm"]},
    },
    "budget": {"train.epochs": 2, "train.max_train_images": 16, "train.val_images": 4, "train.log_every": 100,
               "train.checkpoint_every": 100},
    "pruner": {"default": "median", "threshold": {"lower": 1000.0}},
    "sampler": {"seed": 0, "n_startup_trials": 2},
}


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One MLflow database for the module: creating its tables takes seconds, so it is done once."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return uri


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_params, mlflow_uri, request):
    """A project folder with tiny prepared data, params.yaml, space.yaml, its own MLflow experiment, and its own copy
    of the package's conf/ (defaults and profiles), which is where `sweep best --apply` writes a profile's values."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(params_module.CONF_DIR, tmp_path / "conf")
    monkeypatch.setattr(params_module, "CONF_DIR", tmp_path / "conf")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    write_cifar_npz(tmp_path / "data" / "raw", n_train_per_batch=8, n_test=4)
    params = tiny_params.model_copy(deep=True)
    params.data.val_size = 8
    params.mlflow.log_model = False
    params.mlflow.experiment = f"sweep-{request.node.name}"
    prepare(params)
    (tmp_path / "params.yaml").write_text("# the tiny test params\n" + yaml.safe_dump(params.model_dump(),
                                                                                     sort_keys=False))
    write_space(tmp_path / "space.yaml")
    return tmp_path


def write_space(path: Path, **changes) -> Path:
    space = {**TINY_SPACE, **changes}
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def options(**changes) -> SweepOptions:
    return SweepOptions(params_path=Path("params.yaml"), space_path=Path("space.yaml"), **changes)


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or default_storage_url())


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def warning_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def stub_verification_scores(monkeypatch, gain: float) -> None:
    """``sweep verify`` without its two trainings: per-image validation scores where the trial beats the defaults
    by ``gain`` dB on every image."""
    defaults = 20 + np.random.default_rng(0).normal(0, 1, 8)
    monkeypatch.setattr(verify, "train_and_score",
                        lambda base, values, *rest, **kwargs: (defaults + (gain if values else 0.0), False))


def verify_command(*args: str) -> str:
    result = CliRunner().invoke(app, ["sweep", "verify", "--space", "space.yaml", *args])
    assert result.exit_code == 0, result.output
    return result.output


def nested_runs(parent_run_id: str) -> list:
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# ---- the space file ---------------------------------------------------------------------------------------------
def test_shipped_space_file_is_valid_and_samples_valid_trials():
    base = load_params(REPO / "params.yaml")
    space = load_space(REPO / "pipelines" / "sweep" / "space.yaml", base)
    assert {"diffusion.schedule", "diffusion.t_sampling", "train.lr", "train.warmup_epochs"} <= set(space.parameters)
    assert space.spec.pruner.default == "hyperband" and space.baseline(base) is not None  # warm-started from defaults
    study = optuna.create_study(direction="maximize", sampler=space.build_sampler())
    for _ in range(6):
        trial = study.ask()
        sampled = space.sample(trial)
        params = space.trial_params(base, sampled, "sweeps/x/models")
        assert params.train.epochs == space.budget["train.epochs"] and params.train.resume == "never"
        # the pruners compare trials epoch by epoch, and a short trial never wins back a compilation
        assert params.train.val_every == 1 and params.train.compile is False
        # conditional entries are sampled only on their branch
        assert ("diffusion.beta_end" in sampled) == (sampled["diffusion.schedule"] == "linear")
        assert ("diffusion.p_std" in sampled) == (sampled["diffusion.t_sampling"] == "log_normal")
        study.tell(trial, 0.0)


def test_the_search_runs_at_the_lever_budget_and_leaves_alone_what_the_levers_settled():
    """The search's top rung is the budget whose ranking the transfer study measures (the lever study's), and the
    choices the lever study settled (prediction target, batch size) are params.yaml's, not searched."""
    base = load_params(REPO / "params.yaml")
    search = load_space(REPO / "pipelines" / "sweep" / "space.yaml", base)
    levers = load_space(REPO / "pipelines" / "results" / "levers" / "space.yaml", base)
    assert search.budget_params(base).train == levers.budget_params(base).train
    assert search.budget_params(base).model == levers.budget_params(base).model
    assert not {"diffusion.prediction", "train.batch_size"} & set(search.parameters)


def test_the_gpu_search_runs_the_gpu_recipe_as_its_top_rung_with_unseeded_workers():
    """pipelines/sweep/gpu: trials train the gpu profile's own 60-epoch recipe unless Hyperband stops them, trial 0
    is the profile's values, and the parallel workers do not share a sampler seed (they would propose alike)."""
    folder = REPO / "pipelines" / "sweep" / "gpu"
    base = load_params(folder / "params.yaml")
    space = load_space(folder / "space.yaml", base)
    recipe = space.budget_params(base)
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.train.max_train_images) == (60, 512, None)
    assert recipe.model == base.model and recipe.train.compile == base.train.compile
    pruner = space.build_pruner(None, recipe.train.epochs)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner) and space.spec.sampler["seed"] is None
    assert space.baseline(base) is not None


def test_the_lever_study_changes_one_default_per_trial():
    """pipelines/results/levers: trial 0 is params.yaml's values, each enqueued trial differs from it in its entry."""
    base = load_params(REPO / "params.yaml")
    space = load_space(REPO / "pipelines" / "results" / "levers" / "space.yaml", base)
    baseline = space.baseline(base)
    assert baseline["diffusion.prediction"] == base.diffusion.prediction and space.spec.pruner.default == "none"
    for changes in space.objective.enqueue:
        trial = space.baseline(base, changes)
        assert {k: v for k, v in trial.items() if baseline.get(k) != v} == changes
        space.trial_params(base, trial, "m")  # a valid params file


def test_enqueued_trials_must_lie_in_the_space(tmp_path):
    base = load_params(REPO / "params.yaml")
    path = write_space(tmp_path / "space.yaml", objective={"enqueue": [{"train.lr": 1.0}, {"train.epochs": 3}]})
    with pytest.raises(SpaceError) as err:
        load_space(path, base)
    assert "objective.enqueue[0].train.lr: 1.0 lies outside" in str(err.value)
    assert "objective.enqueue[1].train.epochs: not a parameter of this space" in str(err.value)


def test_trials_validate_every_epoch_unless_the_budget_says_otherwise():
    base = validate_params(compose_params(["profile=gpu"]))
    assert base.train.val_every > 1  # the gpu profile validates every few epochs: a trial must not inherit that
    space = load_space(REPO / "pipelines" / "sweep" / "space.yaml", base)
    assert space.trial_params(base, {}, "m").train.val_every == 1
    space.budget["train.val_every"] = 2
    assert space.trial_params(base, {}, "m").train.val_every == 2


def test_baseline_trial_is_params_yaml_values_or_none_outside_the_space():
    base = load_params(REPO / "params.yaml")
    space = load_space(REPO / "pipelines" / "sweep" / "space.yaml", base)
    baseline = space.baseline(base)
    assert space.objective.baseline and baseline["train.lr"] == base.train.lr
    assert baseline["diffusion.schedule"] == base.diffusion.schedule
    assert ("diffusion.beta_end" in baseline) == (base.diffusion.schedule == "linear")  # conditions hold
    outside = base.model_copy(deep=True)
    outside.train.lr = 10.0  # above the space's train.lr range
    assert space.baseline(outside) is None


def test_budget_overrides_run_the_same_trials_at_another_budget_in_a_study_of_their_own(workspace):
    """`sweep run --budget KEY=VALUE` (the transfer study): the space file's budget with those keys replaced, checked
    like the file's own, and a study name of its own."""
    setup = prepare_setup(options())
    longer = prepare_setup(options(budget={"train.epochs": 3, "train.max_train_images": None}))
    assert longer.space.budget == {**TINY_SPACE["budget"], "train.epochs": 3, "train.max_train_images": None}
    assert longer.space.parameters == setup.space.parameters and longer.study_name != setup.study_name
    with pytest.raises(SpaceError, match="budget.train.epochz: unknown params.yaml key"):
        prepare_setup(options(budget={"train.epochz": 3}))
    refused = CliRunner().invoke(app, ["sweep", "run", "--space", "space.yaml", "--budget", "train.epochs"])
    assert "--budget 'train.epochs': expected KEY=VALUE" in one_error_line(refused)
    for command in ("best", "verify"):  # they find the --budget study by the same name
        missing = CliRunner().invoke(app, ["sweep", command, "--space", "space.yaml", "--budget", "train.epochs=3",
                                           "--budget", "train.max_train_images=null"])
        assert f"no study {longer.study_name!r}" in one_error_line(missing)


def test_space_errors_are_listed_together(workspace):
    bad = {
        "parameters": {
            "train.lrr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
            "train.ema_decay": {"type": "float", "low": 0.9, "high": 1.5},
            "train.warmup_epochs": {"type": "float", "low": 2, "high": 1},
            "train.min_lr": {"type": "float", "low": 0.0, "high": 1.0e-3, "log": True},
            "diffusion.sigma_min": {"type": "float", "low": 0.001, "high": 0.01,
                                    "condition": {"diffusion.t_samplin": "log_uniform"}},
            "train.out_dir": {"type": "categorical", "choices": ["a", "b"]},
            "diffusion.T": {"type": "integer", "low": 10, "high": 100},
            "model.base_channels": {"type": "float", "low": 16, "high": 64},  # an integer key: 16.0 passes, 16.1 not
        },
        "budget": {"train.epochz": 3},
        "pruner": {"median": {"n_startup": 3}},
    }
    path = workspace / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SpaceError) as err:
        load_space(path, load_params("params.yaml"))
    message = str(err.value)
    for expected in ("unknown params.yaml key (did you mean 'train.lr'?)", "train.ema_decay: value 1.5 rejected",
                     "low (2.0) must be below high (1.0)", "log: true needs low > 0", "'diffusion.t_samplin' must be "
                     "a categorical parameter", "train.out_dir: set by the sweep", "diffusion.T: needs type",
                     "budget.train.epochz: unknown params.yaml key (did you mean 'train.epochs'?)", "pruner.median",
                     "model.base_channels: value 16.000000000000004 rejected"):
        assert expected in message, expected
    assert "10 problem(s)" in message


def test_the_parent_run_is_recorded_before_the_baseline_trial_is_queued(workspace, monkeypatch):
    """Another worker waits for the parent run's id only while the study holds no trial: a queued baseline trial
    without it sent that worker off to start a parent run of its own."""
    parent_when_queued = []
    enqueue = optuna.Study.enqueue_trial

    def recording(study, *args, **kwargs):
        parent_when_queued.append(study.user_attrs.get(PARENT_RUN_ATTR))
        return enqueue(study, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", recording)
    write_space(workspace / "space.yaml", objective={"baseline": True})
    run_sweep(options(trials=1, pruner="none"))
    assert len(parent_when_queued) == 1 and parent_when_queued[0] is not None


def test_baseline_trial_runs_params_yaml_values_first(workspace):
    """objective.baseline: trial 0 is params.yaml's own values of the searched keys, marked, and it completes;
    objective.enqueue: the next trials change one of them each."""
    write_space(workspace / "space.yaml", objective={"baseline": True, "enqueue": [{"train.lr": 2.0e-3}]})
    base = load_params("params.yaml")
    result = run_sweep(options(trials=2, pruner="none"))
    first, second = load_study(result["study"]).trials
    assert first.number == 0 and first.user_attrs.get(BASELINE_ATTR) is True
    assert first.params == {"train.lr": base.train.lr, "diffusion.prediction": base.diffusion.prediction}
    assert first.state == TrialState.COMPLETE and first.value is not None
    assert BASELINE_ATTR not in second.user_attrs  # only trial 0 is the reference
    assert second.params == {"train.lr": 2.0e-3, "diffusion.prediction": base.diffusion.prediction}
    assert second.user_attrs[ENQUEUED_ATTR] == "train.lr=0.002"
    assert result["baseline"]["trial"] == 0


def test_a_sweep_searches_on_a_folder_of_pictures_as_on_cifar10(workspace):
    """data.source: folder: trials train on crops (the budget's max_train_images caps them) and score on the
    validation crops."""
    write_picture_folder(workspace / "pictures")
    params = load_params("params.yaml")
    params.data = params.data.model_copy(update={"source": "folder", "raw_dir": "pictures", "patch_size": 32,
                                                 "val_files": 1, "test_files": 2})
    prepare(params)
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    result = run_sweep(options(trials=1, pruner="none"))
    study = load_study(result["study"])
    assert states(study) == ["COMPLETE"] and np.isfinite(study.best_value)


def test_the_sweep_objective_never_loads_the_test_split(workspace, monkeypatch):
    """Trials are judged on validation data only: a request for the test split raises, and the trial completes."""
    asked = []

    def guarded(prepared_dir, split):
        asked.append(split)
        if split == "test":
            raise AssertionError("the sweep objective loaded the test split")
        return load_split(prepared_dir, split)

    for module in (data_module, train_build_module, evaluate_module):  # everywhere `load_split` is imported
        monkeypatch.setattr(module, "load_split", guarded)
    result = run_sweep(options(trials=1, pruner="none"))
    assert states(load_study(result["study"])) == ["COMPLETE"]
    assert "val" in asked and "test" not in asked  # the guard was in the path the trial took


def test_hyperband_pruner_builds_and_judges_every_epoch(workspace, monkeypatch):
    """--pruner hyperband: the study runs under a HyperbandPruner sized to the budget's epochs, which is asked
    after each epoch; every trial finishes (COMPLETE or PRUNED), none FAILs."""
    asked = []
    prune = optuna.pruners.HyperbandPruner.prune

    def recording(pruner, study, trial):
        asked.append((pruner._max_resource, trial.number))
        return prune(pruner, study, trial)

    monkeypatch.setattr(optuna.pruners.HyperbandPruner, "prune", recording)
    cli = CliRunner().invoke(app, ["sweep", "run", "--trials", "3", "--pruner", "hyperband", "--space",
                                   "space.yaml", "--study", "hb"])
    assert cli.exit_code == 0, cli.output
    study = load_study("hb")
    assert len(study.trials) == 3 and set(states(study)) <= {"COMPLETE", "PRUNED"}, states(study)
    assert {number for _, number in asked} == {0, 1, 2}  # each trial was judged by it (a pruner is not stored)
    assert {max_resource for max_resource, _ in asked} == {TINY_SPACE["budget"]["train.epochs"]}


# ---- a sweep, end to end ----------------------------------------------------------------------------------------
def test_sweep_nests_trials_in_mlflow_writes_reports_and_best_applies(workspace, monkeypatch):
    result = run_sweep(options(trials=2))
    study = load_study(result["study"])
    assert states(study) == ["COMPLETE", "COMPLETE"]
    assert not (workspace / "training").exists() and not (workspace / "models").exists()  # trials kept apart
    out = workspace / "sweeps" / result["study"]
    assert (out / "trial_0001" / "training" / "val.csv").is_file()
    for name in ("trials.csv", "best_params.yaml", "summary.json", "plots/optimization_history.png"):
        assert (out / name).is_file(), name
    best = study.best_trial
    assert {"ddim_psnr_mean", "val_ssim_mean", "train_images_per_s"} <= set(best.user_attrs)
    assert yaml.safe_load((out / "best_params.yaml").read_text())["params"] == best.params

    parent_id = study.user_attrs[PARENT_RUN_ATTR]
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.run_name == f"sweep:{result['study']}" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"trials.csv", "best_params.yaml", "plots"}
    runs = nested_runs(parent_id)
    assert sorted(r.data.tags["sweep.trial"] for r in runs) == ["0", "1"]
    assert sorted(r.info.run_name for r in runs) == ["trial-0", "trial-1"]  # not the training runs' names
    for run in runs:
        assert run.data.tags["state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "val_psnr_mean")) == 2  # one point per epoch
        assert "objective" in run.data.metrics

    stub_verification_scores(monkeypatch, gain=0.5)
    assert "verified: it wins" in verify_command()
    cli = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--apply"])
    assert cli.exit_code == 0, cli.output
    assert f"trial {best.number}:" in cli.output and "dvc exp run -S train.lr=" in cli.output
    params_text = (workspace / "params.yaml").read_text()
    assert params_text.startswith("# the tiny test params")  # comments kept
    applied = load_params("params.yaml")
    assert applied.train.lr == best.params["train.lr"]
    assert applied.diffusion.prediction == best.params["diffusion.prediction"]

    # params.yaml composed from a profile: the values go into the profile, and params.yaml is composed again
    conf = workspace / "conf"
    params_file = workspace / "params.yaml"
    params_file.write_text(params_file.read_text() + "profile: quick\n")
    assert "verified: it wins" in verify_command("--study", result["study"])  # under the new params.yaml
    cli = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", result["study"], "--apply"])
    assert cli.exit_code == 0, cli.output
    assert str(conf / "profile" / "quick.yaml") in cli.output
    composed = load_params("params.yaml")
    assert composed.profile == "quick" and composed.train.epochs == 3  # the quick profile's own budget
    assert composed.train.lr == best.params["train.lr"]
    assert composed.diffusion.prediction == best.params["diffusion.prediction"]


def test_best_applies_a_winner_only_under_the_defaults_its_study_ran_under(workspace, monkeypatch):
    """A study's winner is evidence for the defaults it was found under: after params.yaml changed a key the space
    does not search, `sweep best` warns, and `--apply` refuses (one line, exit 2) and leaves params.yaml as it was."""
    study = run_sweep(options(trials=1, pruner="none", study="s"))["study"]
    stub_verification_scores(monkeypatch, gain=0.5)
    verify_command("--study", study)
    best = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study, "--apply"])
    assert best.exit_code == 0 and not warning_lines(best), best.output  # the same defaults: applied
    assert load_params("params.yaml").train.lr == load_study(study).best_trial.params["train.lr"]

    params_file = workspace / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    ran_under = params["diffusion"]["schedule"]
    params["diffusion"]["schedule"] = now = "linear" if ran_under == "cosine" else "cosine"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    before = params_file.read_bytes()
    drift = f"ran under other defaults than params.yaml (diffusion.schedule: {ran_under} there, {now} here)"

    best = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study])
    assert best.exit_code == 0 and "dvc exp run -S" in best.stdout, best.output
    warnings = warning_lines(best)
    assert len(warnings) == 1 and drift in warnings[0], best.output

    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study, "--apply"])
    error = one_error_line(refused)
    assert error.startswith("error: sweep best --apply: ") and drift in error
    assert "rerun the sweep (dvc repro pipelines/sweep/dvc.yaml) before applying its winner" in error
    assert params_file.read_bytes() == before


def test_best_refuses_to_apply_a_study_that_did_not_record_its_defaults(workspace):
    """A study made before studies recorded the defaults they ran under (or by another tool) may hold any."""
    old = optuna.create_study(study_name="old", storage=default_storage_url(), direction="maximize")
    old.add_trial(optuna.trial.create_trial(params={"train.lr": 2e-4}, value=20.0, distributions={
        "train.lr": optuna.distributions.FloatDistribution(1e-5, 3e-3, log=True)}))
    before = (workspace / "params.yaml").read_bytes()
    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", "old", "--apply"])
    assert "study 'old' predates the record of the defaults its trials ran under" in one_error_line(refused)
    assert (workspace / "params.yaml").read_bytes() == before


def test_failing_trials_are_recorded_and_the_search_goes_on(workspace):
    # A combination the schema accepts but training rejects fails before any training run exists.
    write_space(workspace / "space.yaml", parameters={"diffusion.sigma_min": {"type": "categorical",
                                                                              "choices": [5.0]}})
    result = run_sweep(options(trials=5, stop_after_failures=2))
    study = load_study(result["study"])
    assert states(study) == ["FAIL", "FAIL"]  # the first failure did not stop it; two in a row did
    assert all("sigma_min" in t.user_attrs[FAIL_REASON_ATTR] for t in study.trials)
    runs = nested_runs(study.user_attrs[PARENT_RUN_ATTR])
    assert len(runs) == 2
    assert all(r.info.status == "FAILED" and r.data.tags["state"] == "FAIL" and "sigma_min" in r.data.tags["error"]
               for r in runs)


def test_diverged_trials_are_pruned_so_the_sampler_learns_from_them(workspace):
    # lr 1e30 drives the loss to NaN at once: the Trainer raises DivergedError after max_nonfinite_steps. A failed
    # trial would be invisible to TPE (and three in a row would stop the worker); a pruned one ranks last.
    write_space(workspace / "space.yaml", parameters={"train.lr": {"type": "categorical", "choices": [1.0e30]}},
                budget={**TINY_SPACE["budget"], "train.max_nonfinite_steps": 1})
    result = run_sweep(options(trials=3, stop_after_failures=2))
    study = load_study(result["study"])
    assert states(study) == ["PRUNED", "PRUNED", "PRUNED"]
    assert all("DivergedError: loss was non-finite" in t.user_attrs[DIVERGED_ATTR] for t in study.trials)
    assert all(t.user_attrs["pruned_at_epoch"] == 0 and t.value is None for t in study.trials)
    runs = nested_runs(study.user_attrs[PARENT_RUN_ATTR])
    assert len(runs) == 3
    assert all(r.info.status == "KILLED" and r.data.tags["state"] == "PRUNED" and "non-finite" in r.data.tags[
        DIVERGED_ATTR] for r in runs)


def test_pruned_trials_are_marked_in_optuna_and_mlflow(workspace):
    result = run_sweep(options(trials=2, pruner="threshold"))  # threshold: lower 1000 dB prunes at the first epoch
    study = load_study(result["study"])
    assert states(study) == ["PRUNED", "PRUNED"]
    assert all(t.user_attrs["pruned_at_epoch"] == 1 for t in study.trials)
    runs = nested_runs(study.user_attrs[PARENT_RUN_ATTR])
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["state"] == "PRUNED" and run.info.status == "KILLED"
        assert run.data.metrics["pruned_value"] < 1000


def test_interrupted_search_resumes_keeping_finished_trials(workspace, monkeypatch):
    name = run_sweep(options(trials=1))["study"]
    study = load_study(name)
    # A worker killed mid-trial (kill -9): its trial stays RUNNING, owned by a process that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = study.ask()
    orphan.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": dead.pid})
    # Ctrl-C during a trial: the trial is marked FAIL and the interrupt propagates.
    from ddim_denoise.training.trainer import Trainer

    def interrupted(self, data):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(options(trials=1))
    parent = mlflow.MlflowClient().get_run(study.user_attrs[PARENT_RUN_ATTR])
    assert parent.info.status == "KILLED"

    result = run_sweep(options(total=2))  # the same study: only the missing finished trial runs
    study = load_study(name)
    assert result["study"] == name
    assert states(study) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert "died" in study.trials[1].user_attrs[FAIL_REASON_ATTR]
    assert study.trials[2].user_attrs[FAIL_REASON_ATTR] == "interrupted"
    run_sweep(options(total=2))  # already there: nothing runs
    assert len(load_study(name).trials) == 4


def test_changed_settings_refuse_to_resume_a_named_study(workspace):
    run_sweep(options(trials=1, study="fixed", pruner="none"))
    write_space(workspace / "space.yaml", budget={**TINY_SPACE["budget"], "train.epochs": 1})
    cli = CliRunner().invoke(app, ["sweep", "run", "--trials", "1", "--study", "fixed", "--space", "space.yaml"])
    assert cli.exit_code == 2
    assert "created with other settings" in cli.output and "train.epochs: 2 -> 1" in cli.output


class ProgrammingError(Exception):
    """Named as SQLAlchemy names PostgreSQL's refusal of a CREATE TABLE whose table another worker just made."""


class IntegrityError(Exception):
    """Named as SQLAlchemy names the same race lost on the table's row type."""


@pytest.mark.parametrize("lost_race", [IntegrityError('duplicate key value violates unique constraint '
                                                      '"pg_type_typname_nsp_index"'),
                                       ProgrammingError('relation "studies" already exists')])
def test_a_worker_that_loses_the_race_to_create_optuna_tables_opens_them_next_time(monkeypatch, lost_race):
    """Workers started together on an empty PostgreSQL database: the loser's CREATE TABLE fails in either of two
    ways (the second made the PostgreSQL sweep test flaky); the tables are there a moment later."""
    attempts = []

    def storage(url, **kwargs):
        attempts.append(url)
        if len(attempts) == 1:
            raise lost_race
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    monkeypatch.setattr(sweep_storage.time, "sleep", lambda seconds: None)
    assert sweep_storage.open_storage("postgresql://db/optuna") == "storage" and len(attempts) == 2
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kwargs: (_ for _ in ()).throw(
        ProgrammingError('permission denied for schema public')))
    with pytest.raises(sweep_storage.SweepError, match="permission denied"):  # other errors are not retried
        sweep_storage.open_storage("postgresql://db/optuna")


def test_two_worker_processes_share_one_study(workspace):
    """pipelines/sweep/gpu/workers.sh starts the workers side by side (the GPU search)."""
    journal = workspace / "study.journal"
    workers = ["bash", str(REPO / "pipelines" / "sweep" / "gpu" / "workers.sh"), "2"]
    shared = ["--study", "shared", "--storage", f"journal:{journal}", "--space", "space.yaml"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # where ddim-denoise is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    done = subprocess.run([*workers, "--trials", "1", *shared], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    study = load_study("shared", optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert states(study) == ["COMPLETE", "COMPLETE"]
    runs = nested_runs(study.user_attrs[PARENT_RUN_ATTR])  # both trials under the one parent run
    assert sorted(r.data.tags["sweep.trial"] for r in runs) == ["0", "1"]


def test_the_workers_script_waits_for_every_worker_and_fails_when_one_fails(tmp_path):
    """A stand-in `ddim-denoise`: the first worker to start succeeds after a while, the others fail at once. The
    script must still wait for the slow one, pass the options on, and exit with a failure's status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ddim-denoise"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$@" >> {tmp_path}/calls
if mkdir {tmp_path}/first 2>/dev/null; then sleep 1; touch {tmp_path}/slow_done; exit 0; fi
exit 3
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    script = str(REPO / "pipelines" / "sweep" / "gpu" / "workers.sh")
    done = subprocess.run(["bash", script, "3", "--total", "5"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and (tmp_path / "slow_done").is_file()
    assert (tmp_path / "calls").read_text().splitlines() == ["sweep run --total 5"] * 3
    for bad in ("0", "--total", ""):
        refused = subprocess.run(["bash", script, bad], env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "number of workers" in refused.stderr, bad


def test_multi_objective_study_keeps_psnr_and_throughput(workspace):
    result = run_sweep(options(trials=1, multi_objective=True))
    (trial,) = load_study(result["study"]).trials
    assert trial.state == TrialState.COMPLETE and len(trial.values) == 2 and trial.values[1] > 0
    cli = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", result["study"]])
    assert cli.exit_code == 0 and "Pareto front" in cli.output, cli.output
    cli = CliRunner().invoke(app, ["sweep", "run", "--trials", "1", "--study", result["study"], "--space",
                                   "space.yaml"])
    assert cli.exit_code == 2 and "multi-objective" in cli.output


# ---- verification before adoption ---------------------------------------------------------------------------------
def test_verify_retrains_the_winner_and_the_defaults_and_apply_follows_its_verdict(workspace, monkeypatch):
    """`sweep verify` trains the best trial and params.yaml's defaults at params.yaml's budget into the study's
    folder and records the paired verdict; `--apply` writes only a verified winner, otherwise one line says why."""
    study_name = run_sweep(options(trials=1, pruner="none", study="v"))["study"]
    params_file = workspace / "params.yaml"
    before = params_file.read_bytes()
    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name, "--apply"])
    assert "trial 0 is not verified: run `ddim-denoise sweep verify`" in one_error_line(refused)

    line = verify_command("--study", study_name, "--out", "verification.json")  # real trainings, tiny
    folder = workspace / "sweeps" / study_name / "verify"
    assert all((folder / run / "models" / "best.pt").is_file() for run in ("defaults", "trial_0000"))
    recorded = load_study(study_name).user_attrs[verify.VERIFICATION_ATTR]
    assert recorded["trial"] == 0 and recorded["n_images"] == 8  # the whole validation split
    assert json.loads((workspace / "verification.json").read_text()) == recorded  # the DVC stage's metric
    assert verify.Verification(**recorded).line() in line
    applied = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name, "--apply"])
    assert (applied.exit_code == 0) == recorded["verified"], applied.output  # whichever way the tiny runs went
    params_file.write_bytes(before)

    stub_verification_scores(monkeypatch, gain=0.0)  # no better than the defaults
    assert "not verified" in verify_command("--study", study_name)
    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name, "--apply"])
    assert "paired difference +0.000 ± 0.000 dB; not verified" in one_error_line(refused)
    assert params_file.read_bytes() == before

    shown = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name])
    assert "adoption: trial 0 at params.yaml's budget" in shown.stdout

    study = load_study(study_name)
    study.set_user_attr(verify.VERIFICATION_ATTR, {"trial": 0, "verdict": "from another version"})
    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name, "--apply"])
    assert "verification is in an older form: run `ddim-denoise sweep verify` again" in one_error_line(refused)


def test_a_winner_that_diverges_at_the_full_budget_is_scored_but_never_verified(workspace, monkeypatch):
    """A winner whose training diverges at params.yaml's budget is a verdict, not a failed stage: its best validated
    weights are scored and it is not verified however they score; the defaults diverging stays an error."""
    from ddim_denoise.pipeline.errors import DivergedError
    from ddim_denoise.training import build

    from ddim_denoise.data.prepared import data_identity, read_manifest
    from ddim_denoise.pipeline.checkpoint import save_checkpoint
    from ddim_denoise.training.resume import run_fingerprint, validation_yardstick

    def write_best(params, folder: Path) -> None:  # what a validation saves, as far as the verification reads it
        data = data_identity(read_manifest(params.data.prepared_dir))
        save_checkpoint(folder / "models" / "best.pt", {"fingerprint": run_fingerprint(params, data),
                                                          "validation": validation_yardstick(params)})

    class DivergingTrainer:
        def __init__(self, params, **kwargs):
            self.params = params

        def fit(self):
            if "first" in self.params.train.out_dir:  # diverged after one validation, which saved best.pt
                write_best(self.params, Path(self.params.train.out_dir).parent)
            raise DivergedError("training diverged: lower train.lr")

    monkeypatch.setattr(build, "build_trainer", DivergingTrainer)
    monkeypatch.setattr(verify, "per_image_scores", lambda checkpoint, clean, params, steps: (np.full(8, 25.0), None))
    base = load_params(workspace / "params.yaml")
    scores, diverged = verify.train_and_score(base, {}, workspace / "first", "run", {}, diverging_allowed=True)
    assert diverged and scores.tolist() == [25.0] * 8
    write_best(load_params(workspace / "params.yaml", {"train.lr": 5e-4}), workspace / "second")  # an earlier run's
    scores, diverged = verify.train_and_score(base, {}, workspace / "second", "run", {}, diverging_allowed=True)
    assert diverged and scores is None  # it diverged before its first validation: nothing of its own to score
    with pytest.raises(DivergedError):  # the defaults must train
        verify.train_and_score(base, {}, workspace / "first", "run", {})

    defaults = np.full(8, 20.0)
    verdict = verify.paired_verdict(7, "f", defaults, defaults + 5.0, winner_diverged=True)
    assert verdict.difference == pytest.approx(5.0) and not verdict.verified
    assert verdict.line().endswith("not verified: its training diverged at this budget (lower its train.lr)")
    unscored = verify.paired_verdict(7, "f", defaults, None, budget="recipe.yaml")
    assert unscored.winner_diverged and not unscored.verified and unscored.difference is None
    assert unscored.line() == ("trial 7 at recipe.yaml's budget on 8 validation images: nothing to score (diverged "
                               "before its first validation) against the defaults' 20.000 ± 0.000 dB; not verified: "
                               "its training diverged at this budget (lower its train.lr)")


def test_verify_at_another_budget_takes_the_defaults_from_that_budget_s_own_finished_training(workspace):
    """`sweep verify --at FILE` trains the winner at FILE's budget; the defaults' side is FILE's own training when it
    is finished and is that very run (as the CPU recipe's is), else trained. `--apply` follows the verdict only while
    FILE and the code are as they were."""
    study_name = run_sweep(options(trials=1, pruner="none", study="at"))["study"]
    recipe = yaml.safe_load((workspace / "params.yaml").read_text())
    recipe["train"].update(epochs=1, out_dir="recipe/models")
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trained = CliRunner().invoke(app, ["train", "-p", "recipe.yaml", "--records-dir", "recipe/training"])
    assert trained.exit_code == 0, trained.output
    finished = verify.finished_training(load_params("recipe.yaml"))
    assert finished == Path("recipe/models/best.pt")
    assert verify.finished_training(load_params("recipe.yaml", {"train.lr": 5e-4})) is None  # another run
    assert verify.finished_training(load_params("recipe.yaml", {"eval.noise_seed": 99})) is None  # validated otherwise
    last = workspace / "recipe" / "models" / "last.pt"
    saved = last.read_bytes()
    torch.save({**torch.load(last, weights_only=True), "epoch": 0}, last)
    assert verify.finished_training(load_params("recipe.yaml")) is None  # the same run, stopped before its end
    last.write_bytes(saved)

    other = {**recipe, "train": {**recipe["train"], "lr": 5e-4}}  # not params.yaml's defaults: refused
    (workspace / "other.yaml").write_text(yaml.safe_dump(other))
    refused = CliRunner().invoke(app, ["sweep", "verify", "--space", "space.yaml", "--study", study_name,
                                       "--at", "other.yaml"])
    assert refused.exit_code == 2 and ("sweep verify --at: other.yaml holds other defaults than params.yaml (train.lr:"
                                       in one_error_line(refused))

    line = verify_command("--study", study_name, "--at", str(workspace / "recipe.yaml"))
    folder = workspace / "sweeps" / study_name / "verify"
    assert not (folder / "defaults").exists()  # the recipe's training stood for the defaults
    winner = torch.load(folder / "trial_0000" / "models" / "last.pt", weights_only=True)
    assert winner["epoch"] == 1 and winner["params"]["train"]["lr"] == load_study(study_name).trials[0].params[
        "train.lr"]  # the trial's values at the recipe's budget
    recorded = verify.Verification(**load_study(study_name).user_attrs[verify.VERIFICATION_ATTR])
    assert recorded.budget == "recipe.yaml" and recorded.line() in line and "at recipe.yaml's budget" in line
    shown = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name])
    adoption = "verified, --apply writes it" if recorded.verified else f"{recorded.line()}, so params.yaml keeps"
    assert f"adoption: {adoption}" in shown.stdout  # the recipe file as it was verified: the verdict stands

    recipe["train"]["grad_clip"] = 0.5  # the budget file changed since: the verdict no longer holds
    (workspace / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name, "--apply"])
    assert ("trial 0 was verified under another recipe.yaml or code: run `ddim-denoise sweep verify` again"
            in one_error_line(refused))
    (workspace / "recipe.yaml").unlink()
    refused = CliRunner().invoke(app, ["sweep", "best", "--space", "space.yaml", "--study", study_name, "--apply"])
    assert "trial 0 was verified at recipe.yaml's budget, which cannot be read now (" in one_error_line(refused)


def test_a_verification_counts_only_a_win_beyond_its_confidence_interval():
    defaults = 20 + np.random.default_rng(1).normal(0, 2, 400)
    noise = np.random.default_rng(2).normal(0, 1, 400)
    clear = verify.paired_verdict(3, "f", defaults, defaults + 0.3 + noise)
    assert clear.verified and clear.difference - clear.difference_ci95 > 0
    within = verify.paired_verdict(3, "f", defaults, defaults + 0.02 + noise)
    assert not within.verified and abs(within.difference) < within.difference_ci95
    assert within.n_images == 400 and within.defaults_psnr == pytest.approx(defaults.mean())
