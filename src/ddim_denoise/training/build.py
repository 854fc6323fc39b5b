"""Builds a ``Trainer``'s parts from ``Params``: where and how it runs (device, precision, compile), the network and
its EMA, the loss, the optimizer and LR schedule, the training and validation data, the guards and the records."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ddim_denoise.core.diffusion import SigmaSampler
from ddim_denoise.core.metrics import to_float
from ddim_denoise.core.precond import DenoisingLoss, Preconditioner
from ddim_denoise.core.schedule import NoiseSchedule
from ddim_denoise.data.folder import load_images
from ddim_denoise.data.patches import FixedImages, PatchSource, TrainImages
from ddim_denoise.data.prepared import data_identity, load_split, manifest_tags, read_manifest
from ddim_denoise.denoising.denoiser import build_model
from ddim_denoise.pipeline import tracking
from ddim_denoise.pipeline.checkpoint import load_checkpoint, load_model_weights
from ddim_denoise.pipeline.files import TRAINING_DIR
from ddim_denoise.pipeline.params import Params, ParamsError, TrainConfig
from ddim_denoise.pipeline.runtime import (
    Precision,
    configure_cudnn,
    device_name,
    resolve_channels_last,
    resolve_compile,
    resolve_compile_mode,
    resolve_device,
    resolve_precision,
)
from ddim_denoise.training.guards import DivergenceGuard, NonfiniteGuard
from ddim_denoise.training.records import RunRecords
from ddim_denoise.training.resume import prepare_output_folders, run_fingerprint
from ddim_denoise.training.trainer import Trainer, epoch_batches


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


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains: what the ``auto`` settings resolved to on this machine."""

    device: torch.device
    device_name: str
    precision: Precision
    channels_last: bool
    compile_mode: str | None  # the mode torch.compile gets; None: eager

    @property
    def compile(self) -> bool:
        return self.compile_mode is not None


def resolve_runtime(cfg: TrainConfig, world: int) -> Runtime:
    """``train.*``'s device, AMP, memory format and compile settings resolved for this machine (the Inductor
    settings were checked with the params)."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.amp, device)
    channels_last = resolve_channels_last(cfg.channels_last, device)
    compile_mode = resolve_compile_mode(cfg.compile_mode, device, world) if resolve_compile(cfg.compile, device) else None
    runtime = Runtime(device, device_name(device), precision, channels_last, compile_mode)
    configure_cudnn(device, cfg.cudnn_benchmark)
    return runtime


def wrap_for_training(model: torch.nn.Module, runtime: Runtime, world: int) -> torch.nn.Module:
    """The module the loss calls: compiled and/or DDP-wrapped; ``model`` stays the plain module whose parameters it
    shares, so checkpoints never carry wrapper prefixes."""
    wrapped: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return torch.compile(wrapped, mode=runtime.compile_mode) if runtime.compile else wrapped


def load_train_images(params: Params, runtime: Runtime, rank: int, world: int) -> tuple[TrainImages, int]:
    """What each epoch trains on, on the device where it fits, and the batches this rank takes of it per epoch:
    refused when that is none (full batches only: no step would ever run).

    CIFAR-10: the training images (at most ``train.max_train_images``). A folder of pictures: ``data.patches_per_epoch``
    fresh random crops of the whole pictures (at most ``train.max_train_images``, the sweeps' budget)."""
    cfg, data = params.train, params.data
    # the whole uint8 set lives on the GPU: no loader bottleneck
    device = runtime.device if runtime.device.type == "cuda" else "cpu"
    if data.source == "folder":
        per_epoch = min(data.patches_per_epoch, cfg.max_train_images or data.patches_per_epoch)
        images: TrainImages = PatchSource(load_images(data.prepared_dir, "train"), data.patch_size, per_epoch,
                                          params.seed, device)
    else:
        train_x, _ = load_split(data.prepared_dir, "train")
        images = FixedImages(train_x[: cfg.max_train_images] if cfg.max_train_images else train_x, device)
    batches_per_epoch = len(epoch_batches(len(images), cfg.batch_size, 0, params.seed, rank, world))
    if batches_per_epoch == 0:
        raise ParamsError(f"train.batch_size={cfg.batch_size} is more than the {len(images) // world} training "
                          f"images each of {world} process(es) gets per epoch: lower train.batch_size or raise "
                          "train.max_train_images")
    return images, batches_per_epoch


def build_network(params: Params, runtime: Runtime) -> tuple[Preconditioner, EMA, NoiseSchedule]:
    """The network on its device and memory format, from ``train.init_from``'s weights when given, and its EMA."""
    cfg = params.train
    model, schedule = build_model(params)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.init_from:  # before the EMA copy, so both start from the given weights
        load_model_weights(model, load_checkpoint(cfg.init_from), cfg.init_from,
                           "train.init_from needs a checkpoint trained with the same model.* params")
    return model, EMA(model, cfg.ema_decay), schedule


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, batches_per_epoch: int
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its LR schedule (``lr_factor``), laid out in this process count's steps per epoch.
    Fused: one kernel per step, and it skips a step on the device when told to (found_inf), so a non-finite loss
    never makes the host wait for the GPU (Trainer.train_step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    total, warmup = batches_per_epoch * cfg.epochs, max(1, round(cfg.warmup_epochs * batches_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, cfg.lr, cfg.min_lr))
    return optimizer, scheduler


def build_trainer(params: Params, rank: int = 0, world: int = 1, on_epoch_end=None,
                  run_tags: dict[str, str] | None = None, run_name: str | None = None,
                  training_dir: str | Path = TRAINING_DIR) -> Trainer:
    """One training run's ``Trainer``, its parts built from ``params`` (arguments: see ``Trainer``). The inputs are
    checked and the output folders made writable before the model is built."""
    cfg = params.train
    runtime = resolve_runtime(cfg, world)
    out_dir, training_dir = Path(cfg.out_dir), Path(training_dir)
    torch.manual_seed(params.seed + rank)
    train_images, batches_per_epoch = load_train_images(params, runtime, rank, world)
    val_x, _ = load_split(params.data.prepared_dir, "val")
    manifest = read_manifest(params.data.prepared_dir)
    if rank == 0:
        prepare_output_folders(out_dir, training_dir)  # after the inputs check out, before any work

    model, ema, schedule = build_network(params, runtime)
    train_model = wrap_for_training(model, runtime, world)
    d = params.diffusion
    loss_fn = DenoisingLoss(SigmaSampler(d.t_sampling, schedule, d.sigma_min, d.sigma_max, d.p_mean, d.p_std),
                            d.prediction, d.sigma_data)
    optimizer, scheduler = build_optimizer(model, cfg, batches_per_epoch)
    return Trainer(
        params, runtime, rank=rank, world=world, model=model, ema=ema, train_model=train_model, schedule=schedule,
        loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.use_grad_scaler),
        noise_gen=torch.Generator(runtime.device).manual_seed(params.seed * 7919 + rank),
        train_images=train_images, val_clean=to_float(val_x[: cfg.val_images]), batches_per_epoch=batches_per_epoch,
        fingerprint=run_fingerprint(params, data_identity(manifest)), dataset_hash=manifest["dataset_sha256"],
        nonfinite_guard=NonfiniteGuard(cfg.max_nonfinite_steps, runtime.device),
        divergence_guard=DivergenceGuard(cfg.divergence_factor, cfg.max_diverged_steps),
        records=RunRecords(params, out_dir, training_dir, run_name or tracking.training_run_name(params),
                           {**tracking.training_run_tags(params), **manifest_tags(manifest), **(run_tags or {})}),
        on_epoch_end=on_epoch_end)


def train(params: Params, rank: int = 0, world: int = 1, training_dir: str | Path = TRAINING_DIR) -> dict:
    return build_trainer(params, rank, world, training_dir=training_dir).fit()
