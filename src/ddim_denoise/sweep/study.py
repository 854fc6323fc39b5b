"""Optuna search over params.yaml keys (``pipelines/sweep/space.yaml``), tracked in MLflow, resumable and parallel.

``run_sweep`` opens (or creates) the study, nests every trial's MLflow run under the study's parent run, trains
trial after trial (``objective``), and rebuilds the reports (``report``) when the run ends.
``best_trial_report`` prints the best trial and the ``dvc exp run -S ...`` command that trains it for real, and can
write its values into the profile params.yaml was composed with: only when the study ran under the params.yaml of now
(``defaults_drift``), since a winner found under other defaults is no evidence for today's.

Resuming: the study lives in persistent storage (``storage``); run the same command again and finished trials
are kept, the trials a killed worker left RUNNING are marked FAIL, and ``--total`` counts what is already done.
The default study name is derived from what defines a trial's result (params.yaml less the searched keys, the space,
the prepared data), so the same command resumes the same study, and changed settings start a new one.

Parallel: start several ``ddim-denoise sweep run`` processes on the same ``--study`` and ``--storage`` (a
``journal:PATH`` file on one machine, PostgreSQL/MySQL across machines); Optuna hands each its own trials.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ddim_denoise.data.prepared import data_identity, read_manifest
from ddim_denoise.pipeline.params import Params, flatten, load_params
from ddim_denoise.pipeline.stage_code import code_digest
from ddim_denoise.pipeline.tracking import project_root
from ddim_denoise.sweep import tracking as sweep_tracking
from ddim_denoise.sweep.objective import TrialObjective
from ddim_denoise.sweep.report import (
    BASELINE_ATTR,
    ENQUEUED_ATTR,
    chosen_trial,
    describe,
    dvc_exp_command,
    format_changes,
    format_value,
    write_reports,
)
from ddim_denoise.sweep.space import DEFAULT_SPACE_FILE, SearchSpace, load_space
from ddim_denoise.sweep.storage import (
    SETTINGS_ATTR,
    SweepError,
    changed_keys,
    default_storage_url,
    fail_dead_local_trials,
    fingerprint_of,
    open_storage,
    open_study,
    redact,
)
from ddim_denoise.sweep.verify import Verification, adoption_refusal, verify_trial
from ddim_denoise.training.resume import is_operational

log = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"  # <project root>/sweeps/<study>/trial_NNNN/: each trial's checkpoints and histories
STUDY_NAME_PREFIX = "sweep-"
# params.yaml keys that define what a trial measures, besides the seed/model/diffusion/train sections.
OBJECTIVE_EVAL_KEYS = ("eval.sigmas", "eval.noise_seed", "eval.ddim_steps", "eval.ddim_stop_sigma", "eval.amp")
TRAINING_SECTIONS = ("seed", "model", "diffusion", "train")
RERUN_HINT = f"rerun the sweep (dvc repro {DEFAULT_SPACE_FILE.parent / 'dvc.yaml'})"
DRIFT_KEYS_SHOWN = 3  # the refusal stays one readable line
# What a budget file (``sweep verify --at``) may set otherwise than params.yaml: how long and on how many images both
# sides train, and how many images pick their best epoch; every other key that shapes a result stays params.yaml's.
BUDGET_KEYS = ("train.epochs", "train.max_train_images", "train.val_images")


@dataclass
class SweepOptions:
    params_path: Path = Path("params.yaml")
    space_path: Path = DEFAULT_SPACE_FILE
    study: str | None = None  # None: derived from the settings (see module docstring)
    storage: str | None = None  # None: sqlite:///<root>/mlruns/optuna.db
    trials: int | None = None  # trials this process runs (Optuna's n_trials)
    total: int | None = None  # stop once the study holds this many finished (complete + pruned) trials
    timeout: float | None = None  # seconds; checked between trials
    pruner: str | None = None  # median | hyperband | threshold | none; None: the space file's default
    out: Path | None = None  # reports folder; None: <root>/sweeps/<study>
    multi_objective: bool = False  # maximise (objective metric, train images/s); no pruning
    stop_after_failures: int = 5  # stop this worker after this many failed trials in a row; 0: never
    budget: dict = field(default_factory=dict)  # over the space file's budget: the same trials at another budget


@dataclass
class SweepSetup:
    """What ``run`` and ``best`` both derive from the options: params, space and the study's identity."""

    base: Params
    space: SearchSpace
    study_name: str
    fingerprint: str
    settings: dict = field(repr=False)


def fixed_params(base: Params, space: SearchSpace) -> dict:
    """The flat params every trial shares and that shape its result, as the trials see them (budget applied): the
    training sections and the objective's eval keys, less the searched keys and the purely operational ones."""
    flat = flatten(space.budget_params(base))
    return {key: value for key, value in flat.items()
            if (key.split(".")[0] in TRAINING_SECTIONS or key in OBJECTIVE_EVAL_KEYS)
            and not is_operational(key) and key not in space.parameters}


def study_settings(base: Params, space: SearchSpace, data: str) -> dict:
    """Everything that defines what a trial measures: ``fixed_params``, the space and objective, the prepared data
    (``data.data_identity``) and the code. A study records them when it is created (``open_study``)."""
    return {"params": fixed_params(base, space), "space": space.describe(), "data": data, "code": code_digest("sweep")}


def listed_changes(old: dict, new: dict, old_where: str, new_where: str) -> str | None:
    """The keys of two flat mappings that differ, a few shown with both values (one readable line); None if none."""
    changed = changed_keys(old, new)
    if not changed:
        return None

    def shown(values: dict, key: str) -> str:
        return format_value(values[key]) if key in values else "absent"

    listed = "; ".join(f"{key}: {shown(old, key)} {old_where}, {shown(new, key)} {new_where}"
                       for key in changed[:DRIFT_KEYS_SHOWN])
    return listed + (f"; and {len(changed) - DRIFT_KEYS_SHOWN} more" if len(changed) > DRIFT_KEYS_SHOWN else "")


def defaults_drift(study, base: Params, space: SearchSpace, params_path: Path) -> str | None:
    """None when the study's trials ran under the fixed params ``base`` gives now; else why its winner is no
    evidence for them: the keys that differ (a few), or that the study recorded none. With ``--study NAME`` an
    old study is found whatever params.yaml says now (the default name follows params.yaml)."""
    ran_under = study.user_attrs.get(SETTINGS_ATTR, {}).get("params")
    if ran_under is None:
        return f"study {study.study_name!r} predates the record of the defaults its trials ran under"
    listed = listed_changes(ran_under, fixed_params(base, space), "there", "here")
    if listed is None:
        return None
    return f"study {study.study_name!r} ran under other defaults than {params_path} ({listed})"


def budget_drift(base: Params, budget: Params, params_path: Path, budget_file: Path) -> str | None:
    """None when the params file ``budget`` differs from params.yaml (``base``) in its budget alone
    (``BUDGET_KEYS``) and in how it runs; else the keys that differ: its defaults would be other defaults than those
    a verification compares the winner with."""
    def shaping(params: Params) -> dict:
        return {key: value for key, value in flatten(params).items()
                if (key.split(".")[0] in (*TRAINING_SECTIONS, "data") or key in OBJECTIVE_EVAL_KEYS)
                and not is_operational(key) and key not in BUDGET_KEYS}

    listed = listed_changes(shaping(base), shaping(budget), f"in {params_path}", f"in {budget_file}")
    return None if listed is None else (f"{budget_file} holds other defaults than {params_path} ({listed}): a budget "
                                        f"file may differ in {', '.join(BUDGET_KEYS)} alone")


def prepare_setup(options: SweepOptions, need_fingerprint: bool = True) -> SweepSetup:
    base = load_params(options.params_path)
    space = load_space(options.space_path, base, options.budget)
    settings, fingerprint = {}, ""
    if need_fingerprint or options.study is None:
        settings = study_settings(base, space, data_identity(read_manifest(base.data.prepared_dir)))
        fingerprint = fingerprint_of(settings)
    name = options.study or f"{STUDY_NAME_PREFIX}{fingerprint[:10]}"
    return SweepSetup(base, space, name, fingerprint, settings)


def sweep_folder(study_name: str) -> Path:
    return project_root() / SWEEPS_DIR / study_name


class StopAfterFailures:
    """Study callback: stop this worker after ``limit`` failed trials in a row (a broken space or machine should
    not burn the night trial after trial)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.limit and self.in_a_row >= self.limit:
            log.error("%d trials failed in a row: stopping this worker (see fail_reason in trials.csv)", self.in_a_row)
            study.stop()


class RefreshReports:
    """Study callback: rewrite trials.csv, summary.json and best_params.yaml after every trial, so a long search
    can be watched, and a killed one leaves current tables (plots are drawn when the run ends)."""

    def __init__(self, out_dir: Path, metric: str):
        self.out_dir, self.metric = out_dir, metric

    def __call__(self, study, trial) -> None:
        try:
            write_reports(study, self.out_dir, self.metric, plots=False)
        except Exception as e:  # a report problem must not stop the search
            log.warning("sweep reports not refreshed (%s: %s)", type(e).__name__, e)


def finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_sweep(options: SweepOptions) -> dict:
    """Run trials until ``trials`` (this process), ``total`` (the study) or ``timeout`` is reached; return the
    study summary (also written to ``<out>/summary.json``). KeyboardInterrupt propagates after the reports."""
    import optuna

    if options.trials is None and options.total is None:
        raise SweepError("give --trials N (trials this process runs) and/or --total N (finished trials the study "
                         "should reach)")
    setup = prepare_setup(options)
    space, base = setup.space, setup.base
    storage_url = options.storage or default_storage_url()
    storage = open_storage(storage_url, on_stale_trial=sweep_tracking.record_dead_trial)
    if options.multi_objective and options.pruner not in (None, "none"):
        log.warning("--pruner %s ignored: Optuna cannot prune multi-objective studies", options.pruner)
    pruner = (optuna.pruners.NopPruner() if options.multi_objective
              else space.build_pruner(options.pruner, space.budget_params(base).train.epochs))
    directions = ["maximize", "maximize"] if options.multi_objective else ["maximize"]
    study, created = open_study(storage, setup.study_name, directions, setup.fingerprint, setup.settings,
                                pruner=pruner)
    # The parent run before any trial: another worker waits for its id only while the study holds no trial, so one
    # that found the queued baseline first started a parent run of its own.
    parent = sweep_tracking.open_parent_run(study, base.mlflow.experiment, created, redact(storage_url))
    baseline = space.baseline(base) if created and space.objective.baseline else None
    if baseline is not None:  # the defaults as trial 0: the reference every sampled trial is judged against
        study.enqueue_trial(baseline, user_attrs={BASELINE_ATTR: True})
    for changes in space.objective.enqueue if created else ():  # then the file's own trials, in order
        values = space.baseline(base, changes)
        if values is not None:
            study.enqueue_trial(values, user_attrs={ENQUEUED_ATTR: format_changes(changes)})
    study.sampler = space.build_sampler(seed_offset=len(study.get_trials(deepcopy=False)))
    fail_dead_local_trials(study, on_failed=sweep_tracking.record_dead_trial)

    trials_dir = sweep_folder(setup.study_name)
    out_dir = Path(options.out) if options.out else trials_dir
    objective = TrialObjective(base, space, setup.study_name, trials_dir, parent.run_id, options.multi_objective)
    callbacks = [StopAfterFailures(options.stop_after_failures), RefreshReports(out_dir, space.objective.metric)]
    if options.total is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(options.total, states=(optuna.trial.TrialState.COMPLETE,
                                                                               optuna.trial.TrialState.PRUNED)))
    log.info("study %s (%s): %d trials so far; trials in %s, reports in %s", setup.study_name, redact(storage_url),
             len(study.get_trials(deepcopy=False)), trials_dir, out_dir)
    status = "FINISHED"
    try:
        if options.total is None or finished_count(study) < options.total:
            study.optimize(objective, n_trials=options.trials, timeout=options.timeout, catch=(Exception,),
                           callbacks=callbacks, gc_after_trial=True)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result = _close_session(study, parent, out_dir, space.objective.metric, status)
    return result


def _close_session(study, parent, out_dir: Path, metric: str, status: str) -> dict:
    """Rebuild the reports, log them to the parent run, and end the parent run unless other workers still run
    trials of the study."""
    try:
        result, files = write_reports(study, out_dir, metric)
    except Exception as e:  # never hide the search's own outcome behind a report failure
        log.warning("sweep reports not written (%s: %s)", type(e).__name__, e)
        return {"study": study.study_name, "error": str(e)}
    counts = result["trials"]
    metrics = {f"trials_{state}": n for state, n in counts.items()}
    if "best" in result:
        metrics["best_value"] = result["best"]["value"]
    sweep_tracking.log_study_outputs(parent, files, metrics, step=sum(counts.values()) - counts["running"])
    if counts["running"] == 0:
        parent.finish(status)
    result["out_dir"] = str(out_dir)
    return result


@dataclass
class BestTrialReport:
    text: str  # the study's counts, the trial's value and parameters
    command: str | None  # dvc exp run -S key=value ...: trains the trial's values with params.yaml's full budget
    changes: list = field(default_factory=list)  # (key, old, new) written by apply
    applied_to: Path | None = None  # the file apply wrote them into
    warning: str | None = None  # the study ran under other defaults than params.yaml (``defaults_drift``)


def load_existing_study(options: SweepOptions) -> tuple[SweepSetup, object]:
    """The setup and the Optuna study ``options`` name, which must exist (SweepError naming the studies there)."""
    import optuna

    setup = prepare_setup(options, need_fingerprint=False)
    storage_url = options.storage or default_storage_url()
    storage = open_storage(storage_url)
    try:
        return setup, optuna.load_study(study_name=setup.study_name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        hint = f"studies there: {', '.join(names)}" if names else "it holds no study yet: run `ddim-denoise sweep run`"
        raise SweepError(f"no study {setup.study_name!r} in {redact(storage_url)} ({hint}); "
                         "pass --study NAME") from None


def verify_best(options: SweepOptions, trial_number: int | None = None, out: Path | None = None,
                at: Path | None = None) -> Verification:
    """Retrain the best (or the given) trial and take params.yaml's defaults at the budget of the params file ``at``
    (default: params.yaml itself), and store the verdict on the study (``verify.verify_trial``) and in ``out`` as
    JSON; refused for a study that ran under other defaults."""
    setup, study = load_existing_study(options)
    trial = chosen_trial(study, trial_number)
    if trial is None:
        raise SweepError(f"study {study.study_name!r} has no complete trial to verify")
    drift = defaults_drift(study, setup.base, setup.space, options.params_path)
    if drift:
        raise SweepError(f"sweep verify: {drift}: {RERUN_HINT} first")
    budget_file = at or options.params_path
    budget = setup.base if at is None else load_params(at)
    mismatch = budget_drift(setup.base, budget, options.params_path, budget_file)
    if mismatch:
        raise SweepError(f"sweep verify --at: {mismatch}")
    return verify_trial(study, trial, budget, budget_file, sweep_folder(study.study_name) / "verify", out)


def best_trial_report(options: SweepOptions, trial_number: int | None = None, apply: bool = False) -> BestTrialReport:
    """The best (or the given) trial of the study, the command to train it for real, and with ``apply`` its values
    written where the next run reads them (comments kept): the profile params.yaml was composed with, then
    params.yaml composed again as `dvc exp run` would; a params.yaml written by hand, in place. A study that ran
    under other defaults than params.yaml's is refused by ``apply`` (SweepError) and only warned about without; so is
    a trial that ``verify_best`` did not find better than the defaults at a full budget."""
    setup, study = load_existing_study(options)
    trial = chosen_trial(study, trial_number)
    text = describe(study, trial, setup.space.objective.metric)
    if trial is None:
        return BestTrialReport(text, None)
    command = dvc_exp_command(trial.params)
    drift = defaults_drift(study, setup.base, setup.space, options.params_path)
    refusal = adoption_refusal(study, trial)
    if not apply:
        warning = f"{drift}: its winner may not win under today's; {RERUN_HINT}" if drift else None
        return BestTrialReport(text + f"\nadoption: {refusal or 'verified, --apply writes it'}", command,
                               warning=warning)
    if drift:
        raise SweepError(f"sweep best --apply: {drift}: {RERUN_HINT} before applying its winner")
    if refusal:
        raise SweepError(f"sweep best --apply: {refusal}")
    from ddim_denoise.pipeline.params_file import set_values
    from ddim_denoise.pipeline.profiles import profile_file, write_params_yaml

    profile = setup.base.profile
    target = options.params_path if profile is None else profile_file(profile)
    changes = set_values(target, trial.params, add_sections=profile is not None)
    if profile is not None:
        write_params_yaml(options.params_path, [f"profile={profile}"])
    return BestTrialReport(text, command, changes, target)


@contextlib.contextmanager
def sigterm_as_keyboard_interrupt():
    """Treat SIGTERM (``kill``, a scheduler's stop, ``timeout``) like Ctrl-C: the running trial is marked FAIL in
    Optuna and KILLED in MLflow, and the reports are written, instead of the process vanishing mid-trial."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
