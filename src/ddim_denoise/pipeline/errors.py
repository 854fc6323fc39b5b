"""The package's expected errors: what the CLI reports as one line with exit code 2 instead of a traceback."""

from ddim_denoise.pipeline.checkpoint import CheckpointError
from ddim_denoise.pipeline.params import ParamsError


class DataError(ValueError):
    """The dataset is missing, truncated, corrupt or of the wrong shape; the message says how to fix it."""


class InputError(ValueError):
    """A user-supplied image or option cannot be used; the message says why."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""


class DivergedError(TrainingError):
    """The loss stayed non-finite or rose far above its lowest: these settings (mostly the lr) do not train. A sweep
    prunes such a trial instead of failing it, so the sampler learns to avoid its region."""


EXPECTED_ERRORS = (ParamsError, CheckpointError, DataError, InputError, TrainingError)
