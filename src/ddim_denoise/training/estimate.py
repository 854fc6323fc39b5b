"""An early word on how long a run will take, so that a day-long run on the wrong hardware is stopped in minutes.

The estimate is made inside the first epoch, from the training rate between two log points: the first interval is
left out because it pays one-time costs (torch.compile, CUDA-graph capture, cuDNN's algorithm search).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

LONG_RUN_SECONDS = 2 * 3600
QUICK_PROFILE = "quick"  # conf/profile/quick.yaml: the profile a CPU finishes in minutes


def format_duration(seconds: float) -> str:
    """'2 h 05 min', '12 min', '40 s': how long (the rest of) a run will take."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def long_run_warning(images_left: int, images_per_s: float, device: str, profile: str | None) -> str | None:
    """The warning for a run whose remaining steps alone take more than two hours at ``images_per_s``; else None."""
    seconds = images_left / max(images_per_s, 1e-9)
    if seconds <= LONG_RUN_SECONDS:
        return None
    faster = (f"for a first look use the {QUICK_PROFILE} profile (dvc exp run -S profile={QUICK_PROFILE})"
              if profile != QUICK_PROFILE else "use fewer train.epochs or train.max_train_images")
    return (f"this run needs about {format_duration(seconds)} of training on {device} "
            f"({images_per_s:.0f} img/s for {images_left:,} more images): {faster}, or cap it with train.max_minutes")


class FirstEpochEstimate:
    """Say once, at the second log point of a process's first epoch, whether the run will take over two hours."""

    def __init__(self, images_to_train: int, device: str, profile: str | None):
        self.images_to_train = images_to_train  # all ranks, all epochs left in this process
        self.device, self.profile = device, profile
        self.mark: tuple[int, float] | None = None  # (images seen, seconds) at the first log point
        self.done = False

    def log_point(self, images_seen: int, seconds: float) -> str | None:
        """Called at each log point with this process's images and seconds so far; returns the warning it logged."""
        if self.done:
            return None
        if self.mark is None:
            self.mark = (images_seen, seconds)
            return None
        self.done = True
        rate = (images_seen - self.mark[0]) / max(seconds - self.mark[1], 1e-9)
        warning = long_run_warning(self.images_to_train - images_seen, rate, self.device, self.profile)
        if warning:
            log.warning(warning)
        return warning
