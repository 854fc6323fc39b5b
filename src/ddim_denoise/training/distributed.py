"""Data-parallel training across processes and machines (PyTorch DDP), started by ``torchrun``.

torchrun starts one process per GPU (or per CPU slot) and tells each who it is through the environment: ``RANK``
(0 .. WORLD_SIZE-1 over all machines), ``WORLD_SIZE``, ``LOCAL_RANK`` (its index on this machine, which is also the
GPU it drives) and ``MASTER_ADDR``/``MASTER_PORT`` (where the processes meet). This module reads that, gives each
process its device, joins the process group (NCCL between GPUs, gloo between CPUs) and leaves it at the end. The
Trainer does the rest: each rank trains on its own shard of every epoch, DDP averages the gradients so all ranks
take the same optimizer step, and rank 0 alone validates, logs to MLflow and reads and writes checkpoints.

The batch: ``train.batch_size`` is per process, so one optimizer step sees ``train.batch_size x WORLD_SIZE`` images
and an epoch takes WORLD_SIZE times fewer steps. To keep the learning dynamics of a one-process run, divide
``train.batch_size`` by the number of processes.

Without torchrun's variables, training runs as one plain process (rank 0 of 1), so the same ``ddim-denoise train``
works both ways.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_denoise.pipeline.errors import TrainingError
from ddim_denoise.pipeline.files import TRAINING_DIR
from ddim_denoise.pipeline.params import Params

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEVICES_FOLLOWING_LOCAL_RANK = ("auto", "cuda")  # train.device values that let each process take cuda:LOCAL_RANK


class LaunchError(TrainingError):
    """The processes were started in a way training cannot use (incomplete torchrun environment, too few GPUs)."""


@dataclass(frozen=True)
class Launch:
    """Who this process is among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch:
    """This process's place among torchrun's processes; a single plain process when torchrun did not start it."""
    present = [name for name in TORCHRUN_VARIABLES if name in env]
    if not present:
        return Launch()
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise LaunchError(f"{', '.join(present)} set but {', '.join(missing)} not: start the processes with torchrun "
                          "(it sets RANK, WORLD_SIZE and LOCAL_RANK), or unset them for a single process")
    try:
        rank, world_size, local_rank = (int(env[name]) for name in TORCHRUN_VARIABLES)
    except ValueError:
        raise LaunchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                          + ", ".join(f"{name}={env[name]!r}" for name in TORCHRUN_VARIABLES)) from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
                          f"LOCAL_RANK={local_rank}")
    return Launch(rank, world_size, local_rank)


def rank_device(train_device: str, launch: Launch) -> str:
    """The device this process trains on: ``train.device`` itself for one process; under DDP each process drives
    the GPU at its LOCAL_RANK (or the CPU)."""
    if not launch.distributed or train_device == "cpu":
        return train_device
    if train_device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if train_device not in DEVICES_FOLLOWING_LOCAL_RANK:
        raise LaunchError(f"train.device={train_device} would put all {launch.world_size} processes on one device: "
                          "use auto or cuda with torchrun (each process takes cuda:LOCAL_RANK), or cpu")
    visible = torch.cuda.device_count()
    if launch.local_rank >= visible:
        raise LaunchError(f"process LOCAL_RANK={launch.local_rank} has no GPU of its own ({visible} visible): start at "
                          f"most {visible} processes per machine (torchrun --nproc-per-node {max(visible, 1)})")
    return f"cuda:{launch.local_rank}"


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the duration (nothing to join for a single process), always leaving it."""
    if not launch.distributed:
        yield
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and object broadcasts use the current device
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)  # MASTER_ADDR/PORT from env
    log.info("rank %d of %d on %s (%s)", launch.rank, launch.world_size, device, backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def with_device(params: Params, device: str) -> Params:
    """``params`` with ``train.device`` replaced (an operational key: it does not change the run's fingerprint)."""
    return params.model_copy(update={"train": params.train.model_copy(update={"device": device})})


def train_as_launched(params: Params, training_dir: str | Path = TRAINING_DIR) -> dict | None:
    """Train as this process's part of the launch: a plain run, or one rank of a torchrun job, its records (CSV
    histories, summary.json) in ``training_dir``. Returns the run's summary on rank 0 and None on the other ranks
    (their numbers are not the run's)."""
    from ddim_denoise.pipeline.runtime import resolve_device
    from ddim_denoise.training.build import train

    launch = launch_from_env()
    device = rank_device(params.train.device, launch)
    with process_group(launch, resolve_device(device)):
        if not launch.is_main:  # rank 0 reports for the run; the others speak up only about problems
            logging.getLogger(__package__).setLevel(logging.WARNING)
        summary = train(with_device(params, device), launch.rank, launch.world_size, training_dir)
    return summary if launch.is_main else None


def torchrun_command(nproc_per_node: int, cli_args: list[str]) -> list[str]:
    """The command that starts ``nproc_per_node`` copies of ``ddim-denoise <cli_args>`` on this machine through
    torchrun, meeting on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "ddim_denoise.cli", *cli_args]


def relaunch_with_torchrun(nproc_per_node: int, cli_args: list[str]) -> int:
    """Run ``ddim-denoise <cli_args>`` as ``nproc_per_node`` torchrun processes; return torchrun's exit code."""
    if any(name in os.environ for name in TORCHRUN_VARIABLES):
        raise LaunchError("already running under torchrun: drop --nproc-per-node (torchrun sets the process count)")
    command = torchrun_command(nproc_per_node, cli_args)
    log.info("launching %d processes: %s", nproc_per_node, " ".join(command))
    return subprocess.run(command).returncode
