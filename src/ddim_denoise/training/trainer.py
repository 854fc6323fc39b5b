"""The training loop (``Trainer``), handed its built parts (``build.build_trainer`` builds them from ``Params``): it
runs the epochs and steps, validates, and has the checkpoints (``resume``), guards (``guards``) and records
(``records``) kept at the end of each epoch.

Outputs (paths from ``train.out_dir`` and the fixed ``training/`` folder that DVC reads as metrics and plots):
- ``models/last.pt`` every epoch, ``models/epoch_NNNN.pt`` every ``checkpoint_every`` epochs, ``models/best.pt`` on a
  new best validation PSNR (EMA weights). Each holds everything needed to resume bit-for-bit.
- ``training/steps.csv`` (step, epoch, loss: the mean since the previous row, lr), ``training/val.csv`` (epoch,
  sigma, psnr, ssim), ``training/summary.json`` (run id, parameter count, time, throughput, best validation PSNR).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from ddim_denoise.core.metrics import make_noisy, psnr_ssim
from ddim_denoise.core.precond import DenoisingLoss, Preconditioner
from ddim_denoise.core.scale import uint8_to_model
from ddim_denoise.core.schedule import NoiseSchedule
from ddim_denoise.core.unet import count_parameters
from ddim_denoise.data.patches import TrainImages
from ddim_denoise.denoising.denoiser import Denoiser
from ddim_denoise.pipeline.errors import TrainingError
from ddim_denoise.pipeline.files import BEST_CHECKPOINT, LAST_CHECKPOINT, epoch_checkpoint
from ddim_denoise.pipeline.params import Params
from ddim_denoise.pipeline.runtime import compile_context
from ddim_denoise.training import guards, resume
from ddim_denoise.training.estimate import FirstEpochEstimate, format_duration
from ddim_denoise.training.guards import DivergenceGuard, EpochClock, NonfiniteGuard
from ddim_denoise.training.records import History, RunRecords

if TYPE_CHECKING:
    from ddim_denoise.training.build import EMA, Runtime

log = logging.getLogger(__name__)


def stream_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """A 64-bit seed for one random stream of one rank in one epoch, unrelated to every other (seed, rank, epoch)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's index batches for an epoch: one seeded permutation shared by all ranks, sharded like
    DistributedSampler, full batches only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    per_rank = perm[rank : len(perm) - (len(perm) % world) : world] if world > 1 else perm
    usable = len(per_rank) - len(per_rank) % batch_size
    return list(per_rank[:usable].split(batch_size)) if usable else []  # split() of nothing is one empty batch


class Trainer:
    """One training run, handed its parts (``build.build_trainer``). ``on_epoch_end(epoch, metrics)`` is called on
    rank 0 after each epoch's checkpoint (a sweep reports validation PSNR to Optuna there and may raise to prune).
    ``records`` keeps the MLflow run (with its name and tags) and the CSV histories and summary.json in its
    ``training_dir``: a sweep trial passes its own folder so trials never overwrite the main pipeline's DVC metrics.
    ``model`` is the plain module checkpoints hold; ``train_model`` the (compiled, DDP) module the loss calls."""

    def __init__(self, params: Params, runtime: Runtime, *, rank: int, world: int, model: Preconditioner, ema: EMA,
                 train_model: torch.nn.Module, schedule: NoiseSchedule, loss_fn: DenoisingLoss,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler, noise_gen: torch.Generator, train_images: TrainImages,
                 val_clean: np.ndarray, batches_per_epoch: int, fingerprint: str, dataset_hash: str,
                 nonfinite_guard: NonfiniteGuard, divergence_guard: DivergenceGuard, records: RunRecords,
                 on_epoch_end=None):
        self.params, self.cfg, self.runtime = params, params.train, runtime
        self.rank, self.world = rank, world
        self.model, self.ema, self.train_model, self.schedule, self.loss_fn = model, ema, train_model, schedule, loss_fn
        self.optimizer, self.scheduler, self.scaler, self.noise_gen = optimizer, scheduler, scaler, noise_gen
        self.train_images, self.val_clean, self.batches_per_epoch = train_images, val_clean, batches_per_epoch
        self.fingerprint, self.dataset_hash = fingerprint, dataset_hash
        self.nonfinite_guard, self.divergence_guard = nonfinite_guard, divergence_guard
        self.records, self.on_epoch_end = records, on_epoch_end
        self.out_dir, self.training_dir = records.out_dir, records.training_dir
        self.history, self.epoch, self.step = History(), 0, 0
        self.best_psnr, self.best_epoch = -math.inf, 0
        self.train_seconds, self.images_seen = 0.0, 0
        # Where the rest of a run's time goes (its first epoch's compilation is part of train_seconds)
        self.validation_seconds, self.checkpoint_seconds = 0.0, 0.0
        # Until a fresh run's first checkpoint, out_dir's epoch_*.pt are an earlier run's (resume.save_checkpoints)
        self.earlier_checkpoints_pending = True
        self.stopped_early: str | None = None  # why fit() ended before train.epochs (train.max_minutes)
        self.clock = EpochClock()  # for the time left and the epoch's rate (reset by fit)
        self.estimate: FirstEpochEstimate | None = None  # the early word on a run over two hours (set by fit)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def compile(self) -> bool:
        return self.runtime.compile

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def run(self):
        """The MLflow run (``tracking.SafeRun``); None before ``fit`` starts it, and on ranks other than 0."""
        return self.records.run

    @property
    def nonfinite_steps(self) -> int:
        return self.nonfinite_guard.steps

    def try_resume(self) -> str | None:
        """Restore the last checkpoint of this same run (same fingerprint); return its MLflow run id."""
        return resume.try_resume(self)

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

    def _seed_epoch(self) -> None:
        """Seed this rank's dropout and noise streams from (seed, rank, epoch). A run resumed at an epoch boundary
        then draws exactly what an uninterrupted run would have, and each rank keeps its own streams even when the
        run resumes on another number of processes (the checkpoint holds rank 0's state only)."""
        torch.manual_seed(stream_seed(self.params.seed, self.rank, self.epoch, "torch"))
        self.noise_gen.manual_seed(stream_seed(self.params.seed, self.rank, self.epoch, "noise"))

    # ---- one epoch -----------------------------------------------------------------------------------------------
    def _batch_to_model_scale(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = uint8_to_model(x_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2))
        if self.cfg.hflip:
            flip = torch.rand(x.shape[0], device=self.device, generator=self.noise_gen) < 0.5
            x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(3), x)
        if self.cfg.rot90:  # a quarter turn or none, then the flip above: all eight orientations of a square
            turn = torch.rand(x.shape[0], device=self.device, generator=self.noise_gen) < 0.5
            x = torch.where(turn.reshape(-1, 1, 1, 1), x.rot90(1, (2, 3)), x)
        # Either way explicitly: the permuted uint8 batch has channels_last strides, and a channels_last input makes
        # the convolutions run channels_last even where train.channels_last resolves to off (bf16 training on a CPU
        # then ran at 0.6x its speed: benchmarks/train_speed.py, bf16 against bf16_cl).
        return x.contiguous(memory_format=torch.channels_last if self.runtime.channels_last else torch.contiguous_format)

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
        first_step, nonfinite_before, images_before = self.step, self.nonfinite_guard.steps, self.images_seen
        interval_start, interval_nonfinite_before = first_step, nonfinite_before
        start = time.perf_counter()
        for i, batch in enumerate(bar):
            loss = self.train_step(self._batch_to_model_scale(batch))
            interval_sum += torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)  # a skipped step adds nothing
            self.images_seen += len(batch) * self.world
            if self.step % self.cfg.log_every == 0:
                nonfinite = self._log_interval(interval_sum, interval_start, interval_nonfinite_before, bar,
                                               images=(i + 1) * len(batch) * self.world, started=start)
                if self.is_main and self.estimate is not None:
                    self.estimate.log_point(self.images_seen, self.clock.elapsed())
                loss_sum += interval_sum
                interval_sum.zero_()
                interval_start, interval_nonfinite_before = self.step, nonfinite
            elif self.step % self.cfg.max_nonfinite_steps == 0:
                self._check_nonfinite()
        self._check_nonfinite()
        loss_sum += interval_sum
        # Reading the count waits for the last step: the epoch's time below is the device's, too.
        n_finite = self.step - first_step - (self.nonfinite_guard.steps - nonfinite_before)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        self.clock.epoch_done(self.images_seen - images_before, seconds)
        return float(loss_sum) / n_finite if n_finite else float("nan")

    def _log_interval(self, interval_sum: torch.Tensor, interval_start: int, nonfinite_before: int, bar, images: int,
                      started: float) -> int:
        """A log point: the guards' checks, and the mean loss of the interval's finite steps to the history, MLflow
        and the progress bar (``images`` trained on this epoch since ``started``). Returns the non-finite step count
        it read back."""
        self._check_nonfinite()
        total, nonfinite = torch.stack([interval_sum, self.nonfinite_guard.total.float()]).tolist()  # one read-back
        n_finite_steps = self.step - interval_start - (int(nonfinite) - nonfinite_before)
        if n_finite_steps:
            value = total / n_finite_steps
            self.divergence_guard.observe(value, self.step - interval_start, self.step, self._checkpoints_kept())
            lr = self.scheduler.get_last_lr()[0]
            self.history.steps.append([self.step, self.epoch + 1, value, lr])
            self.records.log_metrics({"train_loss": value, "lr": lr}, step=self.step)
            rate = images / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        return int(nonfinite)

    def _check_nonfinite(self) -> None:
        self.nonfinite_guard.check(self.step, self.out_dir / LAST_CHECKPOINT)

    def train_step(self, x0: torch.Tensor) -> torch.Tensor:
        """One optimizer step, queued without reading anything back from the device; returns the detached loss.

        A non-finite loss skips the update on the device: fused AdamW leaves weights and moments alone when
        ``found_inf`` is set (under fp16 the GradScaler sets it from the gradients, which a non-finite loss makes
        non-finite too). ``NonfiniteGuard.check`` stops the run on the host when that goes on too long.
        """
        if self.compile:
            # A new step: CUDA graphs (compile_mode reduce-overhead) may now reuse the last step's buffers. No-op else.
            torch.compiler.cudagraph_mark_step_begin()
        with self.runtime.precision.autocast(self.device):
            loss = self.loss_fn(self.train_model, x0, self.noise_gen)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = loss.detach().float()
        if self.world > 1:
            # One all-reduce: every rank gets the mean loss over the global batch (what is logged), and a rank's
            # non-finite loss makes the sum non-finite everywhere, so all ranks skip the update together.
            step_loss = step_loss.reshape(1).clone()
            torch.distributed.all_reduce(step_loss)
            step_loss = step_loss[0] / self.world
        nonfinite = self.nonfinite_guard.count(step_loss)
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
        n_params = count_parameters(self.model)
        log.info("training %s parameters on %s (%s), %d images/epoch, %d epochs", f"{n_params:,}", self.device,
                 self.runtime.precision.name, len(self.train_images), self.cfg.epochs)
        # The epoch log's time left, and a warning inside the first epoch: a CPU given the gpu profile learns in
        # minutes that it faces days.
        self.clock = EpochClock()
        images_per_epoch = self.batches_per_epoch * self.cfg.batch_size * self.world
        self.estimate = FirstEpochEstimate(self.images_seen + (self.cfg.epochs - self.epoch) * images_per_epoch,
                                           str(self.device), self.params.profile)
        try:
            while self.epoch < self.cfg.epochs:
                with compile_context(self.cfg.compile, self.compile, self.cfg.inductor):
                    mean_loss = self._train_epoch_or_explain_oom(self.train_images.epoch_images(self.epoch))
                self.epoch += 1
                out_of_time = self.epoch < self.cfg.epochs and guards.out_of_time(
                    self.clock, self.cfg.max_minutes, self.world, self.device)
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
                                self.out_dir / LAST_CHECKPOINT)
                    break
        except BaseException as e:
            self.records.failed(e)
            raise
        summary = self._summary(n_params)
        if self.is_main:
            self.records.finish(summary, self.history, self.step)
        return summary

    def _train_epoch_or_explain_oom(self, data: torch.Tensor) -> float:
        """``train_epoch``, with running out of device memory turned into one line naming the fix: params.yaml's batch
        (512, the GPU recipe) needs a large GPU."""
        try:
            return self.train_epoch(data)
        except torch.OutOfMemoryError as e:
            batch, lr = self.cfg.batch_size, self.cfg.lr
            raise TrainingError(
                f"out of memory on {self.runtime.device_name} at train.batch_size={batch}: train with a smaller batch "
                f"and the LR scaled with it, e.g. -S train.batch_size={max(batch // 2, 1)} -S train.lr={lr / 2:g} "
                f"({self.out_dir / 'last.pt'} holds the last finished epoch)") from e

    def _end_of_epoch(self, metrics: dict) -> None:
        names = []
        if self.epoch % self.cfg.checkpoint_every == 0:
            names.append(epoch_checkpoint(self.epoch))
        new_best = metrics.get("val_psnr_mean", -math.inf) > self.best_psnr
        if new_best:
            self.best_psnr, self.best_epoch = metrics["val_psnr_mean"], self.epoch
            names.append(BEST_CHECKPOINT)
        # last.pt last: it is what a rerun resumes from, so it must not record a best.pt that a failed write lost
        resume.save_checkpoints(self, [*names, LAST_CHECKPOINT])
        self.records.epoch_logged(metrics, self.step, names)
        val = f", val PSNR {metrics['val_psnr_mean']:.2f} dB" if "val_psnr_mean" in metrics else ""
        epochs_left = self.cfg.epochs - self.epoch
        left = f", {format_duration(self.clock.seconds_per_epoch() * epochs_left)} left" if epochs_left else ""
        log.info("epoch %d/%d: loss %.4f%s, %.0f img/s%s%s", self.epoch, self.cfg.epochs, metrics["epoch_loss"], val,
                 self.clock.last_rate(), left, " (best)" if new_best else "")

    def _summary(self, n_params: int) -> dict:
        runtime = self.runtime
        return {"mlflow_run_id": self.records.run_id, "parameters": n_params,
                "epochs": self.epoch, "steps": self.step, "train_images_seen": self.images_seen,
                "train_seconds": round(self.train_seconds, 2),
                "images_per_s": round(self.images_seen / max(self.train_seconds, 1e-9), 2),
                "validation_seconds": round(self.validation_seconds, 2),
                "checkpoint_seconds": round(self.checkpoint_seconds, 2),
                # without this process's first epoch (compilation, CUDA-graph capture): null if it ran one epoch
                "steady_images_per_s": None if (steady := self.clock.steady_rate()) is None else round(steady, 2),
                "precision": runtime.precision.name, "device": str(runtime.device), "device_name": runtime.device_name,
                "compile": runtime.compile_mode, "channels_last": runtime.channels_last, "world_size": self.world,
                "best_val_psnr": round(self.best_psnr, 4), "best_epoch": self.best_epoch,
                "nonfinite_steps": self.nonfinite_steps, "stopped_early": self.stopped_early}

    def _start_tracking(self, run_id: str | None) -> None:
        """Open the run's MLflow run (``run_id``: a resume's), described by what it trains and where."""
        runtime = self.runtime
        self.records.start(run_id, {
            "dataset_sha256": self.dataset_hash, "parameters": str(count_parameters(self.model)),
            "precision": runtime.precision.name, "device": str(runtime.device), "device_name": runtime.device_name,
            # what train.compile / channels_last: auto resolved to on this machine
            "compile": runtime.compile_mode or "off", "channels_last": str(runtime.channels_last),
            "fingerprint": self.fingerprint})
