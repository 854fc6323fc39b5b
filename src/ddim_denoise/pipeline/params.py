"""params.yaml: its schema, loading with every problem reported at once, overrides, and flattening for MLflow.

The schema holds types and bounds; the defaults are written once, in conf/config.yaml, which DVC composes into
params.yaml with a profile (conf/profile/) and which fills any key a params file or a checkpoint leaves out.

Every stage validates the whole file before any work starts, so a typo in a key fails in one second, not after an
hour of training. Unknown keys are errors (``extra='forbid'``).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # config.yaml (defaults) and profile/*.yaml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


def _off_as_written(value: object) -> object:
    # YAML 1.1 (PyYAML, and DVC's -S) reads a bare `off` as False: `amp: off` means the setting "off"
    return "off" if value is False else value


Precision = Annotated[Literal["auto", "bf16", "fp16", "off"], BeforeValidator(_off_as_written)]


FileShare = Annotated[float, Field(gt=0, lt=1)] | Annotated[int, Field(ge=1)] | list[str]


class DataConfig(_Section):
    source: Literal["cifar10", "folder"]
    raw_dir: str  # cifar10: the archive's folder; folder: the pictures themselves
    prepared_dir: str
    val_size: int = Field(ge=1)  # cifar10: held-out training images; folder: validation crops
    val_split: Literal["auto", "random", "originals"]
    download: bool  # fall back to torchvision's download when data/raw holds no archive
    originals: str | None  # .npz of original pixels of the first train/test images (for JPEG copies), or "auto"
    originals_only: bool  # train split = those original-pixel images alone (a fine-tuning set)
    # source folder (data/folder.py): the split by file, what to do with files it cannot use, the crops
    val_files: FileShare  # a fraction of the files, a count, or the file names
    test_files: FileShare
    bad_files: Literal["skip", "refuse"]  # unreadable, smaller than patch_size, or a duplicate
    patch_size: int = Field(ge=8)
    patches_per_epoch: int = Field(ge=1)


class ModelConfig(_Section):
    base_channels: int = Field(ge=8)
    channel_mult: list[int]
    num_res_blocks: int = Field(ge=1)
    attention_resolutions: list[int]
    num_heads: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    groups: int = Field(ge=1)


class DiffusionConfig(_Section):
    schedule: Literal["linear", "cosine"]
    T: int = Field(ge=2)
    beta_start: float = Field(gt=0, lt=1)
    beta_end: float = Field(gt=0, lt=1)
    prediction: Literal["eps", "x0", "v", "edm"]
    sigma_data: float = Field(gt=0)
    t_sampling: Literal["uniform", "log_uniform", "log_normal"]
    sigma_min: float = Field(gt=0)  # pixel scale, for log_uniform (as params.yaml)
    sigma_max: float = Field(gt=0)  # pixel scale, for log_uniform
    p_mean: float  # model-scale log-sigma mean, for log_normal
    p_std: float = Field(gt=0)


class TrainConfig(_Section):
    out_dir: str
    device: str  # auto | cpu | cuda | cuda:N
    epochs: int = Field(ge=1)
    max_train_images: int | None = Field(ge=1)  # a subset per epoch, for quick runs and sweeps
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_epochs: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)
    ema_decay: float = Field(ge=0, lt=1)
    hflip: bool
    rot90: bool  # random quarter turns too (square crops: the folder source's patches, CIFAR-10)
    amp: Precision
    channels_last: Literal["auto"] | bool  # see runtime.resolve_channels_last
    compile: Literal["auto"] | bool  # see runtime.resolve_compile
    # torch.compile's mode; reduce-overhead replays each step as CUDA graphs (one GPU only:
    # runtime.resolve_compile_mode)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    # torch._inductor.config settings while compiling (runtime.compile_context). Forcing Inductor's layout
    # optimisation, which skips U-Nets by default, trained the gpu profile faster (benchmarks/train_speed.py).
    inductor: dict[str, bool | int | float | str]
    cudnn_benchmark: bool  # GPU: time cuDNN's convolution algorithms once per shape and keep the fastest
    num_workers: int = Field(ge=0)
    pin_memory: bool
    checkpoint_every: int = Field(ge=1)
    val_every: int = Field(ge=1)
    val_images: int = Field(ge=1)
    log_every: int = Field(ge=1)  # steps between loss/LR points logged to MLflow
    max_nonfinite_steps: int = Field(ge=1)
    # Divergence guard: stop once the mean loss over log_every steps has stayed above divergence_factor x its lowest
    # value for max_diverged_steps steps (a too-high lr can collapse the output to zero with a finite loss).
    divergence_factor: float | None = Field(gt=1)  # null: never stop on a rising loss
    max_diverged_steps: int = Field(ge=1)
    resume: Literal["auto", "never"]
    # Wall-clock budget of one training process, minutes: it stops after the last epoch that its mean epoch time
    # says fits (that epoch validated and checkpointed; rerun to go on). The LR schedule still spans train.epochs.
    max_minutes: float | None = Field(gt=0)
    init_from: str | None  # start from this checkpoint's EMA weights (fine-tuning); optimizer starts fresh

    @field_validator("inductor")
    @classmethod
    def _inductor_settings_exist(cls, settings: dict) -> dict:
        # A misspelt key would otherwise fail at the first compiled step, on the GPU box, after minutes of work.
        if settings:  # torch's Inductor config takes a second to import: not for an empty mapping
            from ddim_denoise.pipeline.runtime import check_inductor_settings

            check_inductor_settings(settings)
        return settings

    @model_validator(mode="after")
    def _lr_schedule_makes_sense(self) -> "TrainConfig":
        # Both were accepted before and ran without a word: an LR that rose during its "decay", or never peaked.
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr:g} is above lr={self.lr:g}, so the cosine decay would raise the "
                             "LR: set train.min_lr at or below train.lr")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g} is longer than epochs={self.epochs}, so the LR "
                             "would never reach train.lr: set train.warmup_epochs at most train.epochs")
        return self


class EvalConfig(_Section):
    out_dir: str
    n_images: int = Field(ge=1)
    sigmas: list[float]
    ddim_steps: int = Field(ge=1)
    ddim_stop_sigma: float = Field(ge=0, lt=1)  # where the DDIM rows stop walking down (Denoiser.denoise)
    ddim_images: int | None = Field(ge=1)  # the DDIM rows on the first N images only (ddim_steps calls each)
    bm3d_images: int = Field(ge=0)
    nlm_images: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    amp: Precision  # denoising precision; see runtime.resolve_inference_precision
    noise_seed: int
    unclip_passes: int = Field(ge=0)  # extra one-step passes for images with clipped noise (pixels at 0 or 1)
    unclip_passes_estimated: int = Field(ge=0)  # the same when sigma is estimated (re-estimated every pass)
    clipped_images: int = Field(ge=0)  # one-step also on these first noisy images stored as 8-bit; 0 = off
    grid_images: int = Field(ge=1)
    # processes for the classical baselines (BM3D is ~1 s per image per core); auto: one per CPU core this process
    # may use
    workers: Literal["auto"] | Annotated[int, Field(ge=1)]

    @field_validator("sigmas")
    @classmethod
    def _sigmas_in_range(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s <= 1]
        if bad or not v:
            raise ValueError(f"every sigma must lie in (0, 1] on the pixel scale, got {v}")
        return v


class ReportConfig(_Section):
    out_dir: str


class MlflowConfig(_Section):
    experiment: str
    log_model: bool  # evaluate logs the evaluated model into the training's run (training logs none)
    log_checkpoints: bool  # periodic checkpoints as they are written, the best one at the end
    registered_model: str  # and registers it under this name (when log_model); "" = log only


class Params(_Section):
    profile: str | None  # the conf/profile/ file params.yaml was composed with (names the MLflow run)
    seed: int
    data: DataConfig
    model: ModelConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    eval: EvalConfig
    report: ReportConfig
    mlflow: MlflowConfig


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message lists every problem."""


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of blanks as single spaces: YAML's and pydantic's messages quote the
    input over several lines, and an error is one line."""
    return " ".join(str(text).split())


def parse_yaml(text: str, where: str, error: type[Exception]) -> object:
    """``text`` read as YAML by the safe loader (plain data only, never an object a tag names); every way it can fail
    is one ``error`` line naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML ({one_line(e)})") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise error(f"{where}: not valid YAML ({one_line(e)})") from None
    except RecursionError:
        raise error(f"{where}: not valid YAML (nested too deeply)") from None


def parse_overrides(items, option: str = "--set", error: type[Exception] = ParamsError) -> dict[str, object]:
    """``KEY=VALUE`` command-line items (``-S``/``--set``, a sweep's ``--budget``) as overrides, each value read as
    YAML (``key=`` is the empty string); a malformed item is one ``error`` line naming ``option``."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise error(f"{option} {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
        overrides[key.strip()] = parse_yaml(value, f"{option} {item!r}", error) if value.strip() else ""
    return overrides


def read_yaml_mapping(path: str | Path, error: type[ValueError], missing_hint: str, expected: str) -> dict:
    """A YAML file that must hold a mapping; every way it can fail is one ``error`` line naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: not found; {missing_hint}") from None
    except OSError as e:  # a folder, no permission
        raise error(f"{path}: cannot be read ({one_line(e.strerror)})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as "
                    "UTF-8") from None
    raw = parse_yaml(text, str(path), error) or {}
    if not isinstance(raw, dict):
        raise error(f"{path}: must be {expected}, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict[str, object] | None = None) -> Params:
    raw = read_yaml_mapping(path, ParamsError, "run from the project root or pass --params PATH",
                            "a mapping of sections")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return validate_params(raw, source=str(path))


@functools.cache
def _read_defaults(path: Path) -> dict:
    defaults = read_yaml_mapping(path, ParamsError, "reinstall the package", "a mapping")
    defaults.pop("defaults", None)  # Hydra's defaults list: which profile DVC composes in
    return defaults


def default_params() -> dict:
    """Every key's default: conf/config.yaml, the one place defaults are written (DVC composes params.yaml from it).
    Read once per process; each caller gets its own copy."""
    return copy.deepcopy(_read_defaults(CONF_DIR / "config.yaml"))


def with_defaults(raw: dict) -> dict:
    """``raw`` over the defaults, section by section: a params file, or a checkpoint's params, may leave keys out
    (a key added after the checkpoint was written). A leaf that holds a mapping (``train.inductor``) is replaced whole;
    anything that is not a mapping where a section belongs is kept for validation to refuse."""
    merged = default_params()
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif value is not None or not isinstance(merged.get(key), dict):  # `train:` left empty keeps the defaults
            merged[key] = value
    return merged


def validate_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(with_defaults(raw))
    except ValidationError as e:
        problems: dict[str, list[str]] = {}  # one entry per key: a union's branches (e.g. 'auto' or an int) each fail
        for err in e.errors():
            problems.setdefault(_params_key(err["loc"]), []).append(err["msg"])
        text = one_line("; ".join(f"{key}: {_either(messages)}" for key, messages in problems.items()))
        raise ParamsError(f"{source}: {len(problems)} problem(s): {text}") from None


def _params_key(loc: tuple) -> str:
    """The dotted params key an error's location names, without pydantic's union-branch tags ('literal[...]', 'int')."""
    model, key = Params, []
    for part in loc:
        if model is None and not isinstance(part, int):  # below a leaf key: a list index stays, a branch tag goes
            break
        key.append(str(part) if str(part).isprintable() else repr(part))  # a key holding a line break stays visible
        field = model.model_fields.get(part) if model is not None else None  # None: a misspelt key, or a list item
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(key)


def _either(messages: list[str]) -> str:
    """'Input should be 'auto'' and 'Input should be a valid boolean' -> 'Input should be 'auto' or a valid boolean'."""
    prefix = "Input should be "
    rest = [m.removeprefix(prefix) if m.startswith(prefix) and i else m for i, m in enumerate(messages)]
    return " or ".join(dict.fromkeys(rest))


def set_dotted(tree: dict, dotted_key: str, value: object) -> None:
    node = tree
    *parents, leaf = dotted_key.split(".")
    for depth, key in enumerate(parents):
        if node.get(key) is None:  # absent, or a section left empty in the file
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            section = ".".join(parents[:depth + 1])
            raise ParamsError(one_line(f"{dotted_key}: {section} is a value, not a section: set {section} itself"))
    node[leaf] = value


def flatten(params: Params) -> dict[str, object]:
    """{'train.lr': 1e-4, ...}: one entry per leaf, the form MLflow and DVC use."""
    out: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", params.model_dump())
    return out
