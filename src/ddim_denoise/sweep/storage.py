"""Where sweep studies live, who created them, and recovery of trials whose worker process died.

``--storage`` forms:
- none: SQLite ``<project root>/mlruns/optuna.db`` (beside MLflow's store, ignored by git);
- any SQLAlchemy URL (``sqlite:///...``, ``postgresql://user@host/db``, ``mysql://...``): Optuna's RDBStorage, with
  heartbeats so a trial whose machine died is marked FAIL by the next worker that starts a trial;
- ``journal:PATH``: a JournalStorage log file, for several processes on one machine without a database server
  (SQLite serialises writers and may report "database is locked" under many workers).

A study also remembers what it was created for (a fingerprint of params.yaml, the space and the data): resuming
it with other settings would mix incomparable trials, so that is refused with the list of what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ddim_denoise.pipeline.tracking import project_root

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"
JOURNAL_PREFIX = "journal:"
# RDB heartbeats: a RUNNING trial with no heartbeat for GRACE_PERIOD_S is failed by the next worker to start a trial.
HEARTBEAT_INTERVAL_S = 30
GRACE_PERIOD_S = 120
SQLITE_LOCK_TIMEOUT_S = 60  # concurrent local workers wait for SQLite's write lock instead of failing
# A worker that finds a just-created study waits this long for its creator to record the fingerprint and parent run.
CREATOR_WAIT_S = 30.0

WORKER_ATTR = "sweep.worker"
FINGERPRINT_ATTR = "sweep.fingerprint"
SETTINGS_ATTR = "sweep.settings"
FAIL_REASON_ATTR = "fail_reason"

StaleTrialCallback = Callable[[Any, Any], None]  # (study, frozen trial), called after the trial was marked FAIL


def fingerprint_of(record: dict) -> str:
    """The short hash a study keeps of what its results rest on (its settings; a verification's params and code):
    a later command compares it to tell whether they still hold."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SweepError(ValueError):
    """A study cannot be opened or used as asked (other settings, other objectives, not found); the message says
    what to do."""


def default_storage_url(root: Path | None = None) -> str:
    folder = (root or project_root()) / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / STORAGE_FILE}"


STORAGE_OPEN_ATTEMPTS = 3  # see open_storage: concurrent first starts on an empty database


def open_storage(url: str | None, on_stale_trial: StaleTrialCallback | None = None):
    """The Optuna storage behind ``url`` (see the module docstring for the forms)."""
    import optuna

    url = url or default_storage_url()
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite:") else None
    for attempt in range(1, STORAGE_OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
                                                  heartbeat_stale_trial_callback=on_stale_trial)
        except Exception as e:  # bad URL, missing driver, unreachable server
            if lost_the_race_to_create_tables(e) and attempt < STORAGE_OPEN_ATTEMPTS:
                time.sleep(attempt)
                continue
            raise SweepError(f"cannot open Optuna storage {redact(url)}: {type(e).__name__}: {e}") from None


def lost_the_race_to_create_tables(error: Exception) -> bool:
    """Workers started together on an empty database race to create Optuna's tables; PostgreSQL refuses the loser's
    CREATE TABLE as a duplicate type (IntegrityError) or a duplicate table (ProgrammingError: "relation ... already
    exists"). The tables exist by the next attempt."""
    name = type(error).__name__
    return name == "IntegrityError" or (name == "ProgrammingError" and "already exists" in str(error))


def redact(url: str) -> str:
    """The URL without its password, for logs and MLflow tags."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def open_study(storage, name: str, directions: list[str], fingerprint: str, settings: dict, sampler=None,
               pruner=None):
    """Create the study, or load it and check it was made for the same settings and objectives.

    Returns (study, created). Creating without ``load_if_exists`` tells exactly one of several simultaneous workers
    that it is the creator: it records the fingerprint (and then the MLflow parent run); the others wait for it.
    """
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        _check_directions(study, directions)
        stored = wait_for_attr(study, FINGERPRINT_ATTR)
        if stored is None:  # made by another tool, or its creator died at once: adopt it
            _record_settings(study, fingerprint, settings)
        elif stored != fingerprint:
            raise SweepError(_settings_changed_message(name, study.user_attrs.get(SETTINGS_ATTR, {}), settings))
        return study, False
    _record_settings(study, fingerprint, settings)
    return study, True


def wait_for_attr(study, key: str, timeout_s: float = CREATOR_WAIT_S) -> Any:
    """A study user attribute its creator sets right after creating it; waits only while the study is still empty
    (a study with trials whose attribute is missing will never get it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = study.user_attrs.get(key)
        if value is not None or study.get_trials(deepcopy=False) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _record_settings(study, fingerprint: str, settings: dict) -> None:
    study.set_user_attr(SETTINGS_ATTR, settings)
    study.set_user_attr(FINGERPRINT_ATTR, fingerprint)


def _check_directions(study, directions: list[str]) -> None:
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        kind = "multi-objective" if len(have) > 1 else "single-objective"
        raise SweepError(f"study {study.study_name!r} is {kind} ({', '.join(have)}): "
                         f"{'add' if len(have) > 1 else 'drop'} --multi-objective, or use another --study name")


def changed_keys(old: dict, new: dict) -> list[str]:
    """The keys of two flat mappings whose values differ, a key on one side only included; sorted."""
    absent = object()
    return sorted(k for k in old.keys() | new.keys() if old.get(k, absent) != new.get(k, absent))


def _settings_changed_message(name: str, old: dict, new: dict) -> str:
    old_flat, new_flat = _flat(old), _flat(new)
    changed = changed_keys(old_flat, new_flat)
    shown = "; ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in changed[:8])
    more = f"; and {len(changed) - 8} more" if len(changed) > 8 else ""
    return (f"study {name!r} was created with other settings ({shown}{more}): its trials would not be comparable. "
            f"Use another --study name (or leave --study out: the default name follows the settings), or delete it "
            f"with `optuna delete-study --study-name {name} --storage URL`")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_dead_local_trials(study, on_failed: StaleTrialCallback | None = None) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker process on this machine is gone (killed, crashed, machine reboot).

    Works for every storage and at once, unlike heartbeats (RDB only, after a grace period). Trials of live
    processes and of other machines are left alone. Returns the failed trial numbers.
    """
    import optuna
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    storage = study._storage  # Optuna's public Study API cannot change another trial's state
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        if worker.get("host") != host or process_alive(int(worker.get("pid", os.getpid()))):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON_ATTR,
                                        f"worker process {worker['pid']} on {host} died while running it")
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            continue
        log.warning("trial %d: its worker process %s died; marked FAIL", trial.number, worker["pid"])
        failed.append(trial.number)
        if on_failed is not None:
            on_failed(study, storage.get_trial(trial._trial_id))
    return failed
