"""Checkpoints of a run and going on from them: what a checkpoint holds, the run fingerprint that decides whether
``last.pt`` is this run's, restoring it (on any number of processes), and writing checkpoints so that a failed write
leaves the earlier ones intact."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddim_denoise.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ddim_denoise.pipeline.errors import TrainingError
from ddim_denoise.pipeline.files import EPOCH_CHECKPOINTS, LAST_CHECKPOINT
from ddim_denoise.pipeline.params import Params, flatten
from ddim_denoise.pipeline.stage_code import code_digest
from ddim_denoise.training.records import History

if TYPE_CHECKING:
    from ddim_denoise.training.trainer import Trainer

log = logging.getLogger(__name__)

STALE_WRITE_SUFFIX = ".pt.tmp"  # how checkpoint.save_checkpoint names a checkpoint still being written
# Keys that change how a run executes or reports, not what it learns: a resume ignores them.
OPERATIONAL_KEYS = ("train.out_dir", "train.device", "train.resume", "train.num_workers", "train.pin_memory",
                    "train.log_every", "train.val_every", "train.checkpoint_every", "train.compile",
                    "train.compile_mode", "train.inductor", "train.cudnn_benchmark",
                    "train.max_nonfinite_steps", "train.divergence_factor", "train.max_diverged_steps",
                    "train.max_minutes")


def is_operational(key: str) -> bool:
    """A flattened params key (train.inductor.force_layout_optimization too) that a resume and a study ignore."""
    return any(key == k or key.startswith(k + ".") for k in OPERATIONAL_KEYS)


def run_fingerprint(params: Params, data: str) -> str:
    """Hash of everything that defines what a run learns (``data``: ``data.data_identity``), its code included
    (``stage_code``); a checkpoint is resumed only if it matches."""
    flat = {k: v for k, v in flatten(params).items()
            if k.split(".")[0] in ("seed", "model", "diffusion", "train") and not is_operational(k)}
    blob = json.dumps(flat, sort_keys=True, default=str) + data + code_digest("train")
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def validation_yardstick(params: Params) -> dict:
    """What a validation PSNR is measured at, besides the validation images (train.val_images is part of the
    fingerprint): eval.sigmas and eval.noise_seed. They can change without changing what the run learns."""
    return {"sigmas": list(params.eval.sigmas), "noise_seed": params.eval.noise_seed}


def plain_state(model: torch.nn.Module) -> dict:
    """State dict without torch.compile's '_orig_mod.' prefixes, so checkpoints load into a plain model."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def prepare_output_folders(out_dir: Path, training_dir: Path) -> None:
    """Fail before any work when a checkpoint or training record could not be written, not after the first epoch;
    and delete the temporary files a write killed mid-way left in ``out_dir`` (never read: a checkpoint only appears
    under its name once complete, so they are just litter in DVC's ``models`` output)."""
    for folder in (out_dir, training_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise TrainingError(f"cannot write to {folder}/ ({e.strerror or e}): make it writable or choose another "
                                + ("train.out_dir" if folder == out_dir else "working folder")) from None
    for stale in out_dir.glob(f".*{STALE_WRITE_SUFFIX}"):
        log.info("removing %s, left by a checkpoint write that was interrupted", stale)
        stale.unlink(missing_ok=True)


def remove_stale_epoch_checkpoints(out_dir: Path, keep: Path | None = None) -> int:
    """Delete the periodic checkpoints (``epoch_*.pt``) an earlier run left in ``out_dir``, except ``keep`` (the
    checkpoint this run was started from, ``train.init_from``: a rerun loads it again); return how many. For a run that
    starts fresh: ``train.out_dir`` is a persisted DVC output, so they would otherwise stay beside this run's own, and
    be cached as its output, with nothing but their dates to tell them apart."""
    kept = keep.resolve() if keep is not None else None
    stale = []
    for path in sorted(out_dir.glob(EPOCH_CHECKPOINTS)):
        if path.resolve() == kept:
            log.info("keeping %s, an earlier run's checkpoint: train.init_from starts this run from it", path)
        else:
            stale.append(path)
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("a new run: removed %d periodic checkpoint(s) of an earlier run from %s/ (%s%s)", len(stale),
                 out_dir, ", ".join(p.name for p in stale[:3]), ", ..." if len(stale) > 3 else "")
    return len(stale)


def training_state(trainer: Trainer) -> dict:
    """Everything a checkpoint holds: enough to go on bit-for-bit."""
    return {
        "params": trainer.params.model_dump(), "fingerprint": trainer.fingerprint,
        "model": plain_state(trainer.model), "ema": plain_state(trainer.ema.model),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(), "epoch": trainer.epoch, "step": trainer.step,
        "best_psnr": trainer.best_psnr, "best_epoch": trainer.best_epoch, "train_seconds": trainer.train_seconds,
        "images_seen": trainer.images_seen, "validation_seconds": trainer.validation_seconds,
        "checkpoint_seconds": trainer.checkpoint_seconds, "nonfinite_steps": trainer.nonfinite_guard.steps,
        "lowest_interval_loss": trainer.divergence_guard.lowest_interval_loss,
        "diverged_steps": trainer.divergence_guard.diverged_steps,
        "history": {"steps": trainer.history.steps, "val": trainer.history.val},
        "validation": validation_yardstick(trainer.params),
        "mlflow_run_id": trainer.records.run_id,
    }


def save_checkpoints(trainer: Trainer, names: list[str]) -> None:
    """Write the checkpoints (in the order given) and histories; a failed write (disk full) leaves every earlier file
    as it was. A fresh run's first call first removes the periodic checkpoints of the run before it."""
    started = time.perf_counter()
    state = training_state(trainer)
    if trainer.earlier_checkpoints_pending:
        # A fresh run's first write: its last.pt replaces the earlier run's, so from here on out_dir is this run's.
        # Not sooner: a launch with mistaken params, or a crash in epoch 1, would lose the earlier run's for nothing.
        init_from = trainer.cfg.init_from
        remove_stale_epoch_checkpoints(trainer.out_dir, keep=Path(init_from) if init_from else None)
        trainer.earlier_checkpoints_pending = False
    try:
        for name in names:
            save_checkpoint(trainer.out_dir / name, state)
        trainer.history.write(trainer.training_dir)
        trainer.checkpoint_seconds += time.perf_counter() - started
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[0]
        raise TrainingError(f"could not write the epoch {trainer.epoch} checkpoint to {trainer.out_dir}/ ({reason}): "
                            f"free disk space and rerun to resume from the previous checkpoint, which is "
                            f"intact") from None


def try_resume(trainer: Trainer) -> str | None:
    """Restore the last checkpoint of this same run (same fingerprint); return its MLflow run id."""
    last = trainer.out_dir / LAST_CHECKPOINT
    state = _read_last_checkpoint(last, trainer.cfg.resume == "auto" and trainer.is_main, trainer.world)
    if state is None:
        return None
    if state.get("fingerprint") != trainer.fingerprint:
        log.info("%s belongs to a run with other params; starting a new run", last)
        return None
    trainer.model.load_state_dict(state["model"])
    trainer.ema.model.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.step = state["epoch"], state["step"]
    _align_lr_schedule(trainer.scheduler, trainer.epoch * trainer.batches_per_epoch)
    trainer.best_psnr, trainer.best_epoch = state["best_psnr"], state["best_epoch"]
    _check_validation_yardstick(trainer, state.get("validation", validation_yardstick(trainer.params)), last)
    trainer.train_seconds, trainer.images_seen = state["train_seconds"], state["images_seen"]
    trainer.nonfinite_guard.total.fill_(state["nonfinite_steps"])
    # absent before the divergence guard existed
    trainer.divergence_guard.lowest_interval_loss = state.get("lowest_interval_loss", math.inf)
    trainer.divergence_guard.diverged_steps = state.get("diverged_steps", 0)
    trainer.validation_seconds = state.get("validation_seconds", 0.0)  # absent before they were timed
    trainer.checkpoint_seconds = state.get("checkpoint_seconds", 0.0)
    trainer.history = History(state["history"]["steps"], state["history"]["val"])
    trainer.earlier_checkpoints_pending = False  # the epoch_*.pt there are this run's own
    log.info("resumed from %s at epoch %d (step %d)", last, trainer.epoch, trainer.step)
    return state.get("mlflow_run_id")


def _read_last_checkpoint(last: Path, read_here: bool, world: int) -> dict | None:
    """``last.pt`` when this process is to read it (rank 0, resuming on) and it exists, else None. Rank 0 sends it
    to the other ranks, so all resume from one state even on machines that share no disk."""
    state = None
    if read_here and last.exists():
        try:
            state = load_checkpoint(last)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; to start over, delete it or set train.resume=never") from None
    if world > 1:
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def _align_lr_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, position: int) -> None:
    """Put the LR schedule at ``position``, the step this run's epoch puts it at. Its warm-up and cosine are laid out
    in this process count's steps per epoch, so a run resumed on another number of processes (another number of steps
    per epoch) would otherwise go on from its step count: from 1 process to 2, the LR fell to min_lr halfway."""
    if scheduler.last_epoch != position:
        scheduler.last_epoch = position - 1
        scheduler.step()  # sets every group's LR for ``position``


def _check_validation_yardstick(trainer: Trainer, measured_on: dict, last: Path) -> None:
    """A best PSNR measured at other sigmas is no bar for the next validation: best.pt is chosen afresh (a finished
    run keeps its figures, and says at what they were measured)."""
    params = trainer.params
    if measured_on == validation_yardstick(params):
        return
    afresh = trainer.epoch < trainer.cfg.epochs
    log.warning("%s's best validation PSNR (%.2f dB, epoch %d) was measured at sigmas %s with noise seed %s, not "
                "at eval.sigmas %s and eval.noise_seed %s: %s", last, trainer.best_psnr, trainer.best_epoch,
                measured_on["sigmas"], measured_on["noise_seed"], params.eval.sigmas, params.eval.noise_seed,
                "best.pt is chosen afresh from the next validation" if afresh else
                "the run is finished, so training/summary.json keeps those figures")
    if afresh:
        trainer.best_psnr = -math.inf
