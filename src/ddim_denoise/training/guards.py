"""What stops a run early: non-finite steps, a loss that diverged, and the time budget (``train.max_minutes``)."""

from __future__ import annotations

import math
import time

import torch

from ddim_denoise.pipeline.errors import DivergedError


class NonfiniteGuard:
    """Counts non-finite steps on the device, so that a step never makes the host wait for the GPU; the host reads the
    count back (a sync) only in ``check``, and stops once ``max_steps`` come in a row."""

    def __init__(self, max_steps: int, device: torch.device):
        self.max_steps = max_steps
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.consecutive = torch.zeros((), dtype=torch.long, device=device)

    def count(self, step_loss: torch.Tensor) -> torch.Tensor:
        """Record one step's (all-reduced) loss; return the device flag that tells the optimizer to skip the step."""
        nonfinite = ~torch.isfinite(step_loss)
        self.total += nonfinite
        self.consecutive = (self.consecutive + 1) * nonfinite
        return nonfinite

    @property
    def steps(self) -> int:
        return int(self.total)

    def check(self, step: int, last_checkpoint) -> None:
        consecutive = int(self.consecutive)
        if consecutive >= self.max_steps:
            raise DivergedError(f"loss was non-finite for {consecutive} steps in a row (step {step}): lower "
                                f"train.lr or set train.amp=off; the last good checkpoint is {last_checkpoint}")


class DivergenceGuard:
    """Stops a run whose loss has risen far above its lowest and stays there: it will not come back down. A too high
    learning rate can send eps-prediction to an output of zero (loss 1.0 against ~0.09 before) with every loss
    finite, and the run would spend its remaining hours there. ``factor`` None switches it off."""

    def __init__(self, factor: float | None, max_steps: int):
        self.factor, self.max_steps = factor, max_steps
        self.lowest_interval_loss, self.diverged_steps = math.inf, 0

    def observe(self, interval_loss: float, n_steps: int, step: int, checkpoints_kept: str) -> None:
        """One log interval's mean loss over ``n_steps`` steps; ``checkpoints_kept`` says what a stop leaves behind."""
        self.lowest_interval_loss = min(self.lowest_interval_loss, interval_loss)
        if self.factor is None or interval_loss <= self.factor * self.lowest_interval_loss:
            self.diverged_steps = 0
            return
        self.diverged_steps += n_steps
        if self.diverged_steps >= self.max_steps:
            raise DivergedError(f"training diverged: the mean loss has stayed above {self.factor:g}x its lowest "
                                f"({interval_loss:.4g} against {self.lowest_interval_loss:.4g}) for "
                                f"{self.diverged_steps} steps (step {step}): lower train.lr (or raise "
                                f"train.divergence_factor); {checkpoints_kept}")


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


def out_of_time(clock: EpochClock, max_minutes: float | None, world: int, device: torch.device) -> bool:
    """Whether another epoch (at this process's epoch time so far) would overrun ``max_minutes`` (None: no budget).
    Ranks decide together, so that none waits on a collective the others have stopped calling."""
    if max_minutes is None:
        return False
    stop = clock.elapsed() + clock.seconds_per_epoch() > 60 * max_minutes
    if world > 1:
        flag = torch.tensor([float(stop)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop
