"""The training loop: AMP, EMA, warmup + cosine LR, validation, atomic checkpoints, resume, MLflow logging.

Outputs (paths from ``train.out_dir`` and the fixed ``training/`` folder that DVC reads as metrics and plots):
- ``models/last.pt`` every epoch, ``models/epoch_NNNN.pt`` every ``checkpoint_every`` epochs, ``models/best.pt`` on a
  new best validation PSNR (EMA weights). Each holds everything needed to resume bit-for-bit.
- ``training/steps.csv`` (step, epoch, loss: the mean since the previous row, lr), ``training/val.csv`` (epoch,
  sigma, psnr, ssim), ``training/summary.json`` (run id, parameter count, time, throughput, best validation PSNR).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddim_denoise.pipeline import tracking
from ddim_denoise.pipeline.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, load_model_weights, save_checkpoint
from ddim_denoise.pipeline.params import Params, ParamsError, flatten
from ddim_denoise.data.cifar10 import data_identity, load_split, read_manifest
from ddim_denoise.denoising.denoiser import Denoiser, build_model
from ddim_denoise.pipeline.errors import DivergedError, TrainingError
from ddim_denoise.core.diffusion import SigmaSampler
from ddim_denoise.core.metrics import make_noisy, psnr_ssim, to_float
from ddim_denoise.core.precond import DenoisingLoss, Preconditioner
from ddim_denoise.pipeline.runtime import (check_inductor_settings, compile_context, configure_cudnn, device_name, resolve_channels_last,
                      resolve_compile, resolve_compile_mode, resolve_device, resolve_precision)
from ddim_denoise.pipeline.stage_code import code_digest
from ddim_denoise.core.unet import count_parameters

log = logging.getLogger(__name__)

TRAINING_DIR = Path("training")
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


def format_duration(seconds: float) -> str:
    """'2 h 05 min', '12 min', '40 s': how long the rest of a run will take, for the epoch log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def stream_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """A 64-bit seed for one random stream of one rank in one epoch, unrelated to every other (seed, rank, epoch)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def lr_factor(step: int, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to lr, then cosine decay to min_lr, as a multiplier of lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


class EMA:
    """Exponential moving average of the weights, with the usual warm-up so early averages are not all init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.load_state_dict(model.state_dict())
        self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        # One multi-tensor kernel for all parameters, not one launch each (hundreds per step on a GPU).
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class History:
    steps: list = field(default_factory=list)  # [step, epoch, loss, lr]
    val: list = field(default_factory=list)  # [epoch, sigma, psnr, ssim]

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / "steps.csv", "step,epoch,loss,lr\n" + "".join(
            f"{int(s)},{int(e)},{l:.6g},{lr:.6g}\n" for s, e, l, lr in self.steps))
        atomic_write_text(folder / "val.csv", "epoch,sigma,psnr,ssim\n" + "".join(
            f"{int(e)},{s:g},{p:.4f},{q:.4f}\n" for e, s, p, q in self.val))


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's index batches for an epoch: one seeded permutation shared by all ranks, sharded like
    DistributedSampler, full batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    per_rank = perm[rank : len(perm) - (len(perm) % world) : world] if world > 1 else perm
    usable = len(per_rank) - len(per_rank) % batch_size
    return list(per_rank[:usable].split(batch_size)) if usable else []  # split() of nothing is one empty batch


class EpochClock:
    """This process's epochs: wall time per epoch (validation and checkpoints included) for the time left and
    ``train.max_minutes``, and the training rate. A first epoch also pays one-time costs (torch.compile and CUDA-graph
    capture took 60 of a GPU run's 250 s), so once a later epoch has ended, estimates and the steady rate leave it out."""

    def __init__(self):
        self.start = time.perf_counter()
        self.ends: list[float] = []  # seconds since start when each epoch's training steps ended
        self.images: list[int] = []  # images each epoch trained on (all ranks)
        self.seconds: list[float] = []  # seconds each epoch's training steps took

    def epoch_done(self, images: int, seconds: float) -> None:
        self.ends.append(self.elapsed())
        self.images.append(images)
        self.seconds.append(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def seconds_per_epoch(self) -> float:
        if len(self.ends) <= 1:
            return self.elapsed() / max(len(self.ends), 1)
        return (self.elapsed() - self.ends[0]) / (len(self.ends) - 1)

    def last_rate(self) -> float:
        return self.images[-1] / max(self.seconds[-1], 1e-9)

    def steady_rate(self) -> float | None:
        """Images/s of this process's epochs after its first; None before a second epoch has ended."""
        return sum(self.images[1:]) / max(sum(self.seconds[1:]), 1e-9) if len(self.images) > 1 else None


class Trainer:
    """One training run. ``on_epoch_end(epoch, metrics)`` is called on rank 0 after each epoch's checkpoint (a sweep
    reports validation PSNR to Optuna there and may raise to prune); ``run_tags`` are added to the MLflow run (e.g.
    ``mlflow.parentRunId`` nests it under a sweep's parent run). ``training_dir`` receives the CSV histories and
    summary.json: the pipeline's ``training/`` by default; a sweep trial passes its own folder so trials never
    overwrite the main pipeline's DVC metrics."""

    def __init__(self, params: Params, rank: int = 0, world: int = 1, on_epoch_end=None,
                 run_tags: dict[str, str] | None = None, run_name: str | None = None,
                 training_dir: str | Path = TRAINING_DIR):
        self.params, self.cfg = params, params.train
        self.training_dir = Path(training_dir)
        self.on_epoch_end, self.run_tags = on_epoch_end, {**tracking.training_run_tags(params), **(run_tags or {})}
        self.run_name = run_name or tracking.training_run_name(params)
        self.rank, self.world = rank, world
        self.device = resolve_device(self.cfg.device)
        self.precision = resolve_precision(self.cfg.amp, self.device)
        self.channels_last = resolve_channels_last(self.cfg.channels_last, self.device)
        # the mode torch.compile gets; None: eager
        self.compile_mode = (resolve_compile_mode(self.cfg.compile_mode, self.device, world)
                             if resolve_compile(self.cfg.compile, self.device) else None)
        check_inductor_settings(self.cfg.inductor, "train.inductor", ParamsError)  # on a CPU too: before the GPU box
        self.device_name = device_name(self.device)
        configure_cudnn(self.device, self.cfg.cudnn_benchmark)
        self.out_dir = Path(self.cfg.out_dir)
        torch.manual_seed(params.seed + rank)

        self.train_x, _ = load_split(params.data.prepared_dir, "train")
        if self.cfg.max_train_images:
            self.train_x = self.train_x[: self.cfg.max_train_images]
        self.batches_per_epoch = len(epoch_batches(len(self.train_x), self.cfg.batch_size, 0, params.seed, rank, world))
        if self.batches_per_epoch == 0:  # full batches only: no step would ever run
            raise ParamsError(f"train.batch_size={self.cfg.batch_size} is more than the {len(self.train_x) // world} "
                              f"training images each of {world} process(es) gets per epoch: lower train.batch_size "
                              "or raise train.max_train_images")
        val_x, _ = load_split(params.data.prepared_dir, "val")
        self.val_clean = to_float(val_x[: self.cfg.val_images])
        manifest = read_manifest(params.data.prepared_dir)
        self.dataset_hash = manifest["dataset_sha256"]
        if self.is_main:
            self._prepare_output_folders()  # after the inputs check out, before any work

        self.model, self.schedule = build_model(params)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.cfg.init_from:  # before the EMA copy, so both start from the given weights
            load_model_weights(self.model, load_checkpoint(self.cfg.init_from), self.cfg.init_from,
                               "train.init_from needs a checkpoint trained with the same model.* params")
        self.ema = EMA(self.model, self.cfg.ema_decay)
        self.train_model = self._wrap_for_training(self.model)
        d = params.diffusion
        sampler = SigmaSampler(d.t_sampling, self.schedule, d.sigma_min, d.sigma_max, d.p_mean, d.p_std)
        self.loss_fn = DenoisingLoss(sampler, d.prediction, d.sigma_data)
        # Fused: one kernel per step, and it skips a step on the device when told to (found_inf), so a non-finite
        # loss never makes the host wait for the GPU (train_step).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                           fused=True)
        total = self.batches_per_epoch * self.cfg.epochs
        warmup = max(1, round(self.cfg.warmup_epochs * self.batches_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total, self.cfg.lr, self.cfg.min_lr))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)
        self.noise_gen = torch.Generator(self.device).manual_seed(params.seed * 7919 + rank)
        self.fingerprint = run_fingerprint(params, data_identity(manifest))
        self.history, self.epoch, self.step = History(), 0, 0
        self.best_psnr, self.best_epoch = -math.inf, 0
        self.train_seconds, self.images_seen = 0.0, 0
        # Where the rest of a run's time goes (its first epoch's compilation is part of train_seconds)
        self.validation_seconds, self.checkpoint_seconds = 0.0, 0.0
        self.stopped_early: str | None = None  # why fit() ended before train.epochs (train.max_minutes)
        # Device-side counters: train_step updates them without reading anything back (see _check_nonfinite).
        self.nonfinite_total = torch.zeros((), dtype=torch.long, device=self.device)
        self.consecutive_nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self.lowest_interval_loss, self.diverged_steps = math.inf, 0  # the divergence guard (_check_divergence)
        self.clock = EpochClock()  # for the time left and the epoch's rate (reset by fit)
        self.run: tracking.SafeRun | None = None

    # ---- setup helpers -------------------------------------------------------------------------------------------
    def _batches(self, data: torch.Tensor):
        """This epoch's uint8 batches: indexed straight from memory, or through a DataLoader with worker
        processes and pinned memory when ``train.num_workers`` > 0 (data kept off the GPU)."""
        batches = epoch_batches(len(data), self.cfg.batch_size, self.epoch, self.params.seed, self.rank, self.world)
        if data.device.type != "cpu" and batches:
            # Indexing GPU data with a host index copies the index first, and that blocking copy waits for every
            # queued step: the host could never run ahead of the GPU. One copy per epoch instead.
            batches = torch.cat(batches).to(data.device).split(self.cfg.batch_size)
        if data.device.type != "cpu" or self.cfg.num_workers == 0:
            return len(batches), (data[idx] for idx in batches)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_sampler=batches,
                                             num_workers=self.cfg.num_workers,
                                             pin_memory=self.cfg.pin_memory and self.device.type == "cuda")
        return len(batches), (x for (x,) in loader)

    def _wrap_for_training(self, model: Preconditioner) -> torch.nn.Module:
        """The module the loss calls: compiled and/or DDP-wrapped; ``self.model`` stays the plain module whose
        parameters it shares, so checkpoints never carry wrapper prefixes."""
        wrapped: torch.nn.Module = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(wrapped, mode=self.compile_mode) if self.compile else wrapped

    @property
    def compile(self) -> bool:
        return self.compile_mode is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nonfinite_steps(self) -> int:
        return int(self.nonfinite_total)

    def _prepare_output_folders(self) -> None:
        """Fail before any work when a checkpoint or training record could not be written, not after the first
        epoch; and delete the temporary files a write killed mid-way left in ``out_dir`` (never read: a checkpoint
        only appears under its name once complete, so they are just litter in DVC's ``models`` output)."""
        for folder in (self.out_dir, self.training_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as e:
                raise TrainingError(f"cannot write to {folder}/ ({e.strerror or e}): make it writable or choose another "
                                    + ("train.out_dir" if folder == self.out_dir else "working folder")) from None
        for stale in self.out_dir.glob(f".*{STALE_WRITE_SUFFIX}"):
            log.info("removing %s, left by a checkpoint write that was interrupted", stale)
            stale.unlink(missing_ok=True)

    def _seed_epoch(self) -> None:
        """Seed this rank's dropout and noise streams from (seed, rank, epoch). A run resumed at an epoch boundary
        then draws exactly what an uninterrupted run would have, and each rank keeps its own streams even when the
        run resumes on another number of processes (the checkpoint holds rank 0's state only)."""
        torch.manual_seed(stream_seed(self.params.seed, self.rank, self.epoch, "torch"))
        self.noise_gen.manual_seed(stream_seed(self.params.seed, self.rank, self.epoch, "noise"))

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "params": self.params.model_dump(), "fingerprint": self.fingerprint,
            "model": _plain_state(self.model), "ema": _plain_state(self.ema.model),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "best_psnr": self.best_psnr, "best_epoch": self.best_epoch, "train_seconds": self.train_seconds,
            "images_seen": self.images_seen, "validation_seconds": self.validation_seconds,
            "checkpoint_seconds": self.checkpoint_seconds, "nonfinite_steps": self.nonfinite_steps,
            "lowest_interval_loss": self.lowest_interval_loss, "diverged_steps": self.diverged_steps,
            "history": {"steps": self.history.steps, "val": self.history.val},
            "validation": self.validation_yardstick(),
            "mlflow_run_id": self.run.run_id if self.run else None,
        }

    def try_resume(self) -> str | None:
        """Restore the last checkpoint of this same run (same fingerprint); return its MLflow run id."""
        last = self.out_dir / "last.pt"
        state = self._read_last_checkpoint(last)
        if state is None:
            return None
        if state.get("fingerprint") != self.fingerprint:
            log.info("%s belongs to a run with other params; starting a new run", last)
            return None
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self._align_lr_schedule()
        self.best_psnr, self.best_epoch = state["best_psnr"], state["best_epoch"]
        self._check_validation_yardstick(state.get("validation", self.validation_yardstick()), last)
        self.train_seconds, self.images_seen = state["train_seconds"], state["images_seen"]
        self.nonfinite_total.fill_(state["nonfinite_steps"])
        self.lowest_interval_loss = state.get("lowest_interval_loss", math.inf)  # absent before the guard existed
        self.diverged_steps = state.get("diverged_steps", 0)
        self.validation_seconds = state.get("validation_seconds", 0.0)  # absent before they were timed
        self.checkpoint_seconds = state.get("checkpoint_seconds", 0.0)
        self.history = History(state["history"]["steps"], state["history"]["val"])
        log.info("resumed from %s at epoch %d (step %d)", last, self.epoch, self.step)
        return state.get("mlflow_run_id")

    def validation_yardstick(self) -> dict:
        """What a validation PSNR is measured at, besides the validation images (train.val_images is part of the
        fingerprint): eval.sigmas and eval.noise_seed. They can change without changing what the run learns."""
        return {"sigmas": list(self.params.eval.sigmas), "noise_seed": self.params.eval.noise_seed}

    def _check_validation_yardstick(self, measured_on: dict, last: Path) -> None:
        """A best PSNR measured at other sigmas is no bar for the next validation: best.pt is chosen afresh (a finished
        run keeps its figures, and says at what they were measured)."""
        if measured_on == self.validation_yardstick():
            return
        afresh = self.epoch < self.cfg.epochs
        log.warning("%s's best validation PSNR (%.2f dB, epoch %d) was measured at sigmas %s with noise seed %s, not "
                    "at eval.sigmas %s and eval.noise_seed %s: %s", last, self.best_psnr, self.best_epoch,
                    measured_on["sigmas"], measured_on["noise_seed"], self.params.eval.sigmas,
                    self.params.eval.noise_seed,
                    "best.pt is chosen afresh from the next validation" if afresh else
                    "the run is finished, so training/summary.json keeps those figures")
        if afresh:
            self.best_psnr = -math.inf

    def _align_lr_schedule(self) -> None:
        """Put the LR schedule where this run's epoch puts it. Its warm-up and cosine are laid out in this process
        count's steps per epoch, so a run resumed on another number of processes (another number of steps per epoch)
        would otherwise go on from its step count: from 1 process to 2, the LR fell to min_lr halfway."""
        position = self.epoch * self.batches_per_epoch
        if self.scheduler.last_epoch != position:
            self.scheduler.last_epoch = position - 1
            self.scheduler.step()  # sets every group's LR for ``position``

    def _read_last_checkpoint(self, last: Path) -> dict | None:
        """``last.pt`` when resuming is on and it exists, else None. Rank 0 reads it and sends it to the other
        ranks, so all resume from one state even on machines that share no disk."""
        state = None
        if self.is_main and self.cfg.resume == "auto" and last.exists():
            try:
                state = load_checkpoint(last)
            except CheckpointError as e:
                raise CheckpointError(f"{e}; to start over, delete it or set train.resume=never") from None
        if self.world > 1:
            box = [state]
            torch.distributed.broadcast_object_list(box, src=0)
            state = box[0]
        return state

    def save(self, names: list[str]) -> None:
        """Write the checkpoints and histories; a failed write (disk full) leaves every earlier file as it was."""
        started = time.perf_counter()
        state = self.state()
        try:
            for name in names:
                save_checkpoint(self.out_dir / name, state)
            self.history.write(self.training_dir)
            self.checkpoint_seconds += time.perf_counter() - started
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            reason = (e.strerror if isinstance(e, OSError) else None) or str(e).splitlines()[0]
            raise TrainingError(f"could not write the epoch {self.epoch} checkpoint to {self.out_dir}/ ({reason}): "
                                f"free disk space and rerun to resume from the previous checkpoint, which is "
                                f"intact") from None

    # ---- one epoch -----------------------------------------------------------------------------------------------
    def _batch_to_model_scale(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        if self.cfg.hflip:
            flip = torch.rand(x.shape[0], device=self.device, generator=self.noise_gen) < 0.5
            x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(3), x)
        # Either way explicitly: the permuted uint8 batch has channels_last strides, and a channels_last input makes
        # the convolutions run channels_last even where train.channels_last resolves to off (bf16 training on a CPU
        # then ran at 0.6x its speed: benchmarks/train_speed.py, bf16 against bf16_cl).
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def train_epoch(self, data: torch.Tensor) -> float:
        self.model.train()
        self._seed_epoch()
        n_batches, batches = self._batches(data)
        bar = tqdm(batches, total=n_batches, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", disable=not self.is_main,
                   leave=False, mininterval=2.0)
        # The loss sums stay on the device; the host reads them back only every log_every steps (and checks the
        # non-finite count every max_nonfinite_steps steps), so it can queue steps ahead of a GPU instead of waiting
        # on each one. What is logged is the mean over the steps since the last log point (this epoch's only, so a
        # run resumed at an epoch boundary logs exactly what an uninterrupted one does).
        loss_sum, interval_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        first_step, nonfinite_before, images_before = self.step, int(self.nonfinite_total), self.images_seen
        interval_start, interval_nonfinite_before = first_step, nonfinite_before
        start = time.perf_counter()
        for i, batch in enumerate(bar):
            loss = self.train_step(self._batch_to_model_scale(batch))
            interval_sum += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)  # a skipped step adds nothing
            self.images_seen += len(batch) * self.world
            if self.step % self.cfg.log_every == 0:
                self._check_nonfinite()
                total, nonfinite = torch.stack([interval_sum, self.nonfinite_total.float()]).tolist()  # one read-back
                n_finite_steps = self.step - interval_start - (int(nonfinite) - interval_nonfinite_before)
                if n_finite_steps:
                    value = total / n_finite_steps
                    self._check_divergence(value, n_steps=self.step - interval_start)
                    lr = self.scheduler.get_last_lr()[0]
                    self.history.steps.append([self.step, self.epoch + 1, value, lr])
                    if self.run:
                        self.run.log_metrics({"train_loss": value, "lr": lr}, step=self.step)
                    rate = (i + 1) * len(batch) * self.world / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                loss_sum += interval_sum
                interval_sum.zero_()
                interval_start, interval_nonfinite_before = self.step, int(nonfinite)
            elif self.step % self.cfg.max_nonfinite_steps == 0:
                self._check_nonfinite()
        self._check_nonfinite()
        loss_sum += interval_sum
        # Reading the count waits for the last step: the epoch's time below is the device's, too.
        n_finite = self.step - first_step - (int(self.nonfinite_total) - nonfinite_before)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.clock.epoch_done(self.images_seen - images_before, seconds)
        return float(loss_sum) / n_finite if n_finite else float("nan")

    def train_step(self, x0: torch.Tensor) -> torch.Tensor:
        """One optimizer step, queued without reading anything back from the device; returns the detached loss.

        A non-finite loss skips the update on the device: fused AdamW leaves weights and moments alone when
        ``found_inf`` is set (under fp16 the GradScaler sets it from the gradients, which a non-finite loss makes
        non-finite too). ``_check_nonfinite`` stops the run on the host when that goes on too long.
        """
        if self.compile:
            # A new step: CUDA graphs (compile_mode reduce-overhead) may now reuse the last step's buffers. No-op else.
            torch.compiler.cudagraph_mark_step_begin()
        with self.precision.autocast(self.device):
            loss = self.loss_fn(self.train_model, x0, self.noise_gen)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = loss.detach().float()
        if self.world > 1:
            # One all-reduce: every rank gets the mean loss over the global batch (what is logged), and a rank's
            # non-finite loss makes the sum non-finite everywhere, so all ranks skip the update together.
            step_loss = step_loss.reshape(1).clone()
            torch.distributed.all_reduce(step_loss)
            step_loss = step_loss[0] / self.world
        nonfinite = ~torch.isfinite(step_loss)
        self.nonfinite_total += nonfinite
        self.consecutive_nonfinite = (self.consecutive_nonfinite + 1) * nonfinite
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.found_inf = nonfinite.float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model, self.step)  # after a skipped step it averages in the unchanged weights
        self.step += 1
        return step_loss

    def _check_nonfinite(self) -> None:
        """Read the device's count of non-finite steps in a row (a sync) and stop once it reaches the limit."""
        consecutive = int(self.consecutive_nonfinite)
        if consecutive >= self.cfg.max_nonfinite_steps:
            raise DivergedError(f"loss was non-finite for {consecutive} steps in a row (step {self.step}): lower "
                                f"train.lr or set train.amp=off; the last good checkpoint is {self.out_dir / 'last.pt'}")

    def _check_divergence(self, interval_loss: float, n_steps: int) -> None:
        """Stop a run whose loss has risen far above its lowest and stays there: it will not come back down. A too
        high learning rate can send eps-prediction to an output of zero (loss 1.0 against ~0.09 before) with every
        loss finite, and the run would spend its remaining hours there."""
        self.lowest_interval_loss = min(self.lowest_interval_loss, interval_loss)
        factor = self.cfg.divergence_factor
        if factor is None or interval_loss <= factor * self.lowest_interval_loss:
            self.diverged_steps = 0
            return
        self.diverged_steps += n_steps
        if self.diverged_steps >= self.cfg.max_diverged_steps:
            raise DivergedError(f"training diverged: the mean loss has stayed above {factor:g}x its lowest "
                                f"({interval_loss:.4g} against {self.lowest_interval_loss:.4g}) for "
                                f"{self.diverged_steps} steps (step {self.step}): lower train.lr (or raise "
                                f"train.divergence_factor); {self._checkpoints_kept()}")

    def _checkpoints_kept(self) -> str:
        if self.epoch == 0:
            return "no checkpoint was written yet"
        return (f"{self.out_dir / 'last.pt'} is from epoch {self.epoch}, {self.out_dir / 'best.pt'} holds the best "
                f"validated weights")

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """One-step PSNR/SSIM of the EMA model on the fixed validation subset with fixed noise seeds."""
        started = time.perf_counter()
        denoiser = Denoiser(self.ema.model, self.schedule, self.params, self.device)
        results = {}
        for sigma in self.params.eval.sigmas:
            noisy = make_noisy(self.val_clean, sigma, self.params.eval.noise_seed)
            psnr, ssim = psnr_ssim(self.val_clean, denoiser.denoise(noisy, sigma, batch_size=self.params.eval.batch_size))
            results[f"val_psnr_sigma{sigma:g}"], results[f"val_ssim_sigma{sigma:g}"] = psnr.mean(), ssim.mean()
            self.history.val.append([self.epoch, sigma, float(psnr.mean()), float(ssim.mean())])
        results["val_psnr_mean"] = float(np.mean([v for k, v in results.items() if k.startswith("val_psnr_sigma")]))
        self.validation_seconds += time.perf_counter() - started
        return results

    # ---- the whole run -------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        run_id = self.try_resume()
        if self.is_main:
            self._start_tracking(run_id)
        data = torch.from_numpy(self.train_x)
        if self.device.type == "cuda":
            data = data.to(self.device)  # the whole uint8 set lives on the GPU: no loader bottleneck
        n_params = count_parameters(self.model)
        log.info("training %s parameters on %s (%s), %d images/epoch, %d epochs", f"{n_params:,}", self.device,
                 self.precision.name, len(data), self.cfg.epochs)
        # The epoch log's time left: a CPU given the GPU-sized params.yaml learns in the first epoch that it faces a
        # day, not an hour.
        self.clock = EpochClock()
        try:
            while self.epoch < self.cfg.epochs:
                with compile_context(self.cfg.compile, self.compile, self.cfg.inductor):
                    mean_loss = self._train_epoch_or_explain_oom(data)
                self.epoch += 1
                out_of_time = self._out_of_time()
                metrics = {"epoch_loss": mean_loss}
                last = self.epoch == self.cfg.epochs or out_of_time
                if self.is_main and (self.epoch % self.cfg.val_every == 0 or last):
                    metrics.update(self.validate())
                if self.is_main:
                    self._end_of_epoch(metrics)
                    if self.on_epoch_end is not None:
                        self.on_epoch_end(self.epoch, metrics)
                if out_of_time:
                    self.stopped_early = (f"train.max_minutes={self.cfg.max_minutes:g} reached after epoch "
                                          f"{self.epoch} of {self.cfg.epochs}")
                    log.warning("%s: stopping; rerun the same command to go on from %s", self.stopped_early,
                                self.out_dir / "last.pt")
                    break
        except BaseException as e:
            if self.run:
                self.run.set_tags({"error": f"{type(e).__name__}: {e}"[:5000]})
                self.run.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        summary = self._summary(n_params)
        if self.is_main:
            self._finish_tracking(summary)
        return summary

    def _train_epoch_or_explain_oom(self, data: torch.Tensor) -> float:
        """``train_epoch``, with running out of device memory turned into one line naming the fix: params.yaml's batch
        (512, the GPU recipe) needs a large GPU."""
        try:
            return self.train_epoch(data)
        except torch.OutOfMemoryError as e:
            batch, lr = self.cfg.batch_size, self.cfg.lr
            raise TrainingError(
                f"out of memory on {self.device_name} at train.batch_size={batch}: train with a smaller batch "
                f"and the LR scaled with it, e.g. -S train.batch_size={max(batch // 2, 1)} -S train.lr={lr / 2:g} "
                f"({self.out_dir / 'last.pt'} holds the last finished epoch)") from e

    def _out_of_time(self) -> bool:
        """Whether another epoch (at this process's epoch time so far, EpochClock) would overrun ``train.max_minutes``.
        Ranks decide together, so that none waits on a collective the others have stopped calling."""
        if self.cfg.max_minutes is None or self.epoch >= self.cfg.epochs:
            return False
        stop = self.clock.elapsed() + self.clock.seconds_per_epoch() > 60 * self.cfg.max_minutes
        if self.world > 1:
            flag = torch.tensor([float(stop)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _end_of_epoch(self, metrics: dict) -> None:
        names = []
        if self.epoch % self.cfg.checkpoint_every == 0:
            names.append(f"epoch_{self.epoch:04d}.pt")
        new_best = metrics.get("val_psnr_mean", -math.inf) > self.best_psnr
        if new_best:
            self.best_psnr, self.best_epoch = metrics["val_psnr_mean"], self.epoch
            names.append("best.pt")
        # last.pt last: it is what a rerun resumes from, so it must not record a best.pt that a failed write lost
        self.save([*names, "last.pt"])
        if self.run:
            self.run.log_metrics(metrics, step=self.step)
            if self.params.mlflow.log_checkpoints:  # periodic ones now; the best once, at the end (it changes often)
                for name in names:
                    if name.startswith("epoch_"):
                        self.run.log_artifact(self.out_dir / name, "checkpoints")
        val = f", val PSNR {metrics['val_psnr_mean']:.2f} dB" if "val_psnr_mean" in metrics else ""
        epochs_left = self.cfg.epochs - self.epoch
        left = f", {format_duration(self.clock.seconds_per_epoch() * epochs_left)} left" if epochs_left else ""
        log.info("epoch %d/%d: loss %.4f%s, %.0f img/s%s%s", self.epoch, self.cfg.epochs, metrics["epoch_loss"], val,
                 self.clock.last_rate(), left, " (best)" if new_best else "")

    def _summary(self, n_params: int) -> dict:
        return {"mlflow_run_id": self.run.run_id if self.run else None, "parameters": n_params,
                "epochs": self.epoch, "steps": self.step, "train_images_seen": self.images_seen,
                "train_seconds": round(self.train_seconds, 2),
                "images_per_s": round(self.images_seen / max(self.train_seconds, 1e-9), 2),
                "validation_seconds": round(self.validation_seconds, 2),
                "checkpoint_seconds": round(self.checkpoint_seconds, 2),
                # without this process's first epoch (compilation, CUDA-graph capture): null if it ran one epoch
                "steady_images_per_s": None if (steady := self.clock.steady_rate()) is None else round(steady, 2),
                "precision": self.precision.name, "device": str(self.device), "device_name": self.device_name,
                "compile": self.compile_mode, "channels_last": self.channels_last, "world_size": self.world,
                "best_val_psnr": round(self.best_psnr, 4), "best_epoch": self.best_epoch,
                "nonfinite_steps": self.nonfinite_steps, "stopped_early": self.stopped_early}

    def _start_tracking(self, run_id: str | None) -> None:
        self.run = tracking.start_run(self.params.mlflow.experiment, run_name=self.run_name, run_id=run_id,
                                      tags=self.run_tags)
        if run_id is not None and self.run.run_id is None:  # deleted, or last.pt came from another tracking store
            log.warning("MLflow run %s of %s cannot be reopened: logging to a new run", run_id,
                        self.out_dir / "last.pt")
            run_id = None
            self.run = tracking.start_run(self.params.mlflow.experiment, run_name=self.run_name, tags=self.run_tags)
        if run_id is None:
            self.run.log_params(flatten(self.params))
            self.run.set_tags({"git_commit": git_commit(), "dataset_sha256": self.dataset_hash,
                               "parameters": str(count_parameters(self.model)), "precision": self.precision.name,
                               "device": str(self.device), "device_name": self.device_name,
                               # what train.compile / channels_last: auto resolved to on this machine
                               "compile": self.compile_mode or "off", "channels_last": str(self.channels_last),
                               "fingerprint": self.fingerprint})

    def _finish_tracking(self, summary: dict) -> None:
        atomic_write_text(self.training_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.history.write(self.training_dir)
        if not self.run or self.run.run_id is None:
            return
        metrics = {"parameters": summary["parameters"], "train_images_per_s": summary["images_per_s"],
                   "train_seconds": summary["train_seconds"], "best_val_psnr": summary["best_val_psnr"],
                   "validation_seconds": summary["validation_seconds"],
                   "checkpoint_seconds": summary["checkpoint_seconds"]}
        if summary["steady_images_per_s"] is not None:
            metrics["train_images_per_s_steady"] = summary["steady_images_per_s"]
        self.run.log_metrics(metrics, step=self.step)
        self.run.log_artifacts(self.training_dir, "training")
        if self.params.mlflow.log_checkpoints and (self.out_dir / "best.pt").is_file():
            self.run.log_artifact(self.out_dir / "best.pt", "checkpoints")
        if self.params.mlflow.log_model:
            self._log_model()
        self.run.finish()

    def _log_model(self) -> None:
        try:
            import mlflow.pytorch

            with tracking.active_run(self.run) as active:
                if active is not None:
                    mlflow.pytorch.log_model(copy.deepcopy(self.ema.model).cpu().float(), name="model",
                                             pip_requirements=["torch", "ddim-denoise"],
                                             # pt2 (torch.export) needs single-tensor signatures; forward takes
                                             # (y, sigma). The pickle-free, servable model is the pyfunc that
                                             # evaluate registers.
                                             serialization_format="pickle")
        except Exception as e:  # the run's other records stand; a model upload failure is not fatal
            log.warning("could not log the model to MLflow (%s: %s)", type(e).__name__, e)


def _plain_state(model: torch.nn.Module) -> dict:
    """State dict without torch.compile's '_orig_mod.' prefixes, so checkpoints load into a plain model."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()}


def train(params: Params, rank: int = 0, world: int = 1) -> dict:
    return Trainer(params, rank, world).fit()
