"""The sweep's search space file (``pipelines/sweep/space.yaml``): its schema, and its validation against params.yaml.

Users edit the space without touching code, so every mistake must fail before the first trial starts, in one
message that lists all problems: an unknown params key (with a did-you-mean), a range that params.yaml's schema
would reject, a condition on a parameter that does not exist, a pruner or sampler setting Optuna does not know.

A trial is exactly a set of params.yaml overrides: the fixed ``budget`` plus one sampled value per active parameter
(a parameter with a ``condition`` is sampled only when an earlier categorical parameter took one of the given
values; otherwise params.yaml's value stands).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from ddim_denoise.pipeline.params import Params, ParamsError, flatten, read_yaml_mapping, set_dotted, validate_params

DEFAULT_SPACE_FILE = Path("pipelines/sweep/space.yaml")
# Set by the sweep for every trial (its own output folder, never resuming another trial's checkpoint).
RESERVED_KEYS = ("train.out_dir", "train.resume")
PRUNERS = ("median", "hyperband", "threshold", "none")
OPTUNA_CATEGORICAL_TYPES = (type(None), bool, int, float, str)


log = logging.getLogger(__name__)


class SpaceError(ParamsError):
    """The space file is missing, unreadable or invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ParamSpec(_Strict):
    condition: dict[str, Any] | None = None  # {earlier categorical key: value or [values]}: sample only then

    def candidates(self) -> list[Any]:
        """The values that bound what this parameter can take: each must pass params.yaml's schema."""
        raise NotImplementedError

    def suggest(self, trial, name: str) -> Any:
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in this parameter's range (or among its choices)."""
        bounds = self.candidates()
        if isinstance(self, CategoricalSpec):
            return value in bounds
        return isinstance(value, (int, float)) and bounds[0] <= value <= bounds[-1]

    def is_active(self, sampled: dict[str, Any]) -> bool:
        for key, wanted in (self.condition or {}).items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if key not in sampled or sampled[key] not in allowed:
                return False
        return True


class FloatSpec(_ParamSpec):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> "FloatSpec":
        _check_range(self.low, self.high, self.log, self.step is not None)
        return self

    def candidates(self) -> list[Any]:
        # and a value with a fraction, as the sampler draws: an integer key (diffusion.T) takes 500.0 but not those
        inner = self.low + self.step if self.step is not None else math.nextafter(self.low, self.high)
        return [self.low, min(inner, self.high), self.high]

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)


class IntSpec(_ParamSpec):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> "IntSpec":
        _check_range(self.low, self.high, self.log, self.step != 1)
        return self

    def candidates(self) -> list[Any]:
        return [self.low, self.high]

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)


class CategoricalSpec(_ParamSpec):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _scalars(cls, v: list[Any]) -> list[Any]:
        bad = [c for c in v if not isinstance(c, OPTUNA_CATEGORICAL_TYPES)]
        if bad:
            raise ValueError(f"choices must be single values (number, string, bool or null), got {bad}")
        if len(set(map(repr, v))) != len(v):
            raise ValueError(f"choices repeat a value: {v}")
        return v

    def candidates(self) -> list[Any]:
        return list(self.choices)

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)


def _check_range(low: float, high: float, log: bool, stepped: bool) -> None:
    if not low < high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0, got {low}")
    if log and stepped:
        raise ValueError("log and step cannot be combined")


ParamSpec = Annotated[Union[FloatSpec, IntSpec, CategoricalSpec], Field(discriminator="type")]


class ObjectiveSettings(_Strict):
    metric: str = "val_psnr_mean"  # a validation metric the Trainer reports each epoch; never a test-set figure
    ddim_steps: int | None = Field(None, ge=1)  # steps of the end-of-trial DDIM score; null: eval.ddim_steps
    ddim_images: int | None = Field(None, ge=1)  # first N validation images for it (steps x one-step cost); null: all
    baseline: bool = False  # run params.yaml's own values first (at the same budget), as the reference
    # trials to run next, in order, each {parameter: value, ...} with params.yaml's values for the rest: a lever
    # study's one change at a time, or a search warm-started from known configurations
    enqueue: list[dict[str, Any]] = []

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        if not (v.startswith("val_psnr") or v.startswith("val_ssim")):
            raise ValueError(f"must be a validation PSNR/SSIM the Trainer reports (val_psnr_mean, val_psnr_sigma0.1, "
                             f"val_ssim_sigma0.1, ...), got {v!r}")
        return v


class PrunerSettings(_Strict):
    default: Literal["median", "hyperband", "threshold", "none"] = "median"
    median: dict[str, Any] = {}  # optuna.pruners.MedianPruner arguments (steps are epochs)
    hyperband: dict[str, Any] = {}  # optuna.pruners.HyperbandPruner arguments; max_resource is the budget's epochs
    threshold: dict[str, Any] = {}  # optuna.pruners.ThresholdPruner arguments, e.g. lower: 20 (dB)


class SpaceFile(_Strict):
    parameters: dict[str, ParamSpec] = {}
    budget: dict[str, Any] = {}
    objective: ObjectiveSettings = ObjectiveSettings()
    pruner: PrunerSettings = PrunerSettings()
    sampler: dict[str, Any] = {}  # optuna.samplers.TPESampler arguments


@dataclass(frozen=True)
class SearchSpace:
    """A validated space file: what to sample, what to fix, what to optimise, and how to prune and sample."""

    path: Path
    spec: SpaceFile

    @property
    def parameters(self) -> dict[str, _ParamSpec]:
        return self.spec.parameters

    @property
    def budget(self) -> dict[str, Any]:
        return self.spec.budget

    @property
    def objective(self) -> ObjectiveSettings:
        return self.spec.objective

    def sample(self, trial) -> dict[str, Any]:
        """One value per active parameter, in file order (so conditions see the values they depend on)."""
        sampled: dict[str, Any] = {}
        for key, spec in self.parameters.items():
            if spec.is_active(sampled):
                sampled[key] = spec.suggest(trial, key)
        return sampled

    def baseline(self, base: Params, changes: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """params.yaml's own values of the active parameters, to enqueue as a study's first trial so the search is
        compared with the defaults at the same budget; with ``changes`` (an ``objective.enqueue`` entry), the same
        with those values instead. None (with a warning) when a value lies outside the space."""
        flat, chosen = flatten(base), {}
        for key, spec in self.parameters.items():
            if spec.is_active(chosen):
                value = (changes or {}).get(key, flat[key])
                if not spec.contains(value):
                    log.warning("no trial %s: %s=%r lies outside the space", changes or "of params.yaml's values",
                                key, value)
                    return None
                chosen[key] = value
        return chosen

    def trial_params(self, base: Params, sampled: dict[str, Any], out_dir: str | Path) -> Params:
        """params.yaml + budget + sampled values, writing checkpoints to ``out_dir`` and never resuming. Trials
        validate every epoch unless the budget says otherwise: the pruners' steps are epochs."""
        overrides = {"train.val_every": 1, **self.budget, **sampled, "train.out_dir": str(out_dir),
                     "train.resume": "never"}
        return validate_params(with_overrides(base, overrides), source="trial params")

    def budget_params(self, base: Params) -> Params:
        """params.yaml with the budget applied: what every trial shares before sampling."""
        return validate_params(with_overrides(base, self.budget), source=f"{self.path} budget")

    def build_pruner(self, name: str | None, max_epochs: int):
        """The pruner named by ``name`` (or the file's default), configured from the file; steps are epochs."""
        import optuna

        name = name or self.spec.pruner.default
        if name not in PRUNERS:
            raise SpaceError(f"unknown pruner {name!r}: use one of {', '.join(PRUNERS)}")
        settings = self.spec.pruner
        try:
            if name == "median":
                return optuna.pruners.MedianPruner(**settings.median)
            if name == "hyperband":
                return optuna.pruners.HyperbandPruner(**{"max_resource": max_epochs, **settings.hyperband})
            if name == "threshold":
                return optuna.pruners.ThresholdPruner(**settings.threshold)
            return optuna.pruners.NopPruner()
        except (TypeError, ValueError) as e:
            raise SpaceError(f"{self.path}: pruner.{name}: {e}") from None

    def build_sampler(self, seed_offset: int = 0):
        """TPE with the file's arguments; an integer seed is shifted by ``seed_offset`` (the trials already in the
        study) so a resumed search does not replay the first run's random draws."""
        import optuna

        kwargs = dict(self.spec.sampler)
        if kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + seed_offset
        try:
            with warnings.catch_warnings():  # multivariate/group/constant_liar are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.samplers.TPESampler(**kwargs)
        except (TypeError, ValueError) as e:
            raise SpaceError(f"{self.path}: sampler: {e}") from None

    def describe(self) -> dict[str, Any]:
        """What defines a trial's result (parameters, budget, objective): part of a study's fingerprint."""
        return self.spec.model_dump(include={"parameters", "budget", "objective"}, mode="json")


def with_overrides(base: Params, overrides: dict[str, Any]) -> dict:
    raw = copy.deepcopy(base.model_dump())
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw


def params_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the params schema, e.g. 'train.lr'."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += params_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def load_space(path: str | Path, base: Params, budget: dict[str, Any] | None = None) -> SearchSpace:
    """Read and validate a space file against ``base`` (params.yaml), with ``budget``'s keys over the file's budget;
    SpaceError lists every problem at once."""
    path = Path(path)
    raw = read_yaml_mapping(path, SpaceError, "pass --space PATH", "a mapping with a 'parameters' section")
    if budget:
        raw = {**raw, "budget": {**(raw.get("budget") or {}), **budget}}
    spec, problems = _parse(raw)
    space = SearchSpace(path, spec)
    problems += _semantic_problems(space, base)
    if problems:
        raise SpaceError(_problems_message(path, problems))
    return space


_SPEC_TYPES = TypeAdapter(ParamSpec)


def _parse(raw: dict) -> tuple[SpaceFile, list[str]]:
    """The file against the schema, each parameter on its own so that one malformed entry does not hide the
    problems of the others; malformed entries are left out of the returned space."""
    problems, valid = [], {}
    entries = raw.get("parameters")
    if not isinstance(entries, dict) or not entries:
        problems.append("parameters: must be a non-empty mapping of params.yaml keys to {type: ...} entries")
        entries = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("type") not in ("float", "int", "categorical"):
            problems.append(f"parameters.{key}: needs type: float, int or categorical")
            continue
        try:
            valid[key] = _SPEC_TYPES.validate_python(entry)
        except ValidationError as e:
            problems += [f"parameters.{key}{_where(err['loc'][1:])}: {_message(err)}" for err in e.errors()]
    try:
        spec = SpaceFile.model_validate({**raw, "parameters": {}})
    except ValidationError as e:
        problems += [f"{_where(err['loc']).lstrip('.')}: {_message(err)}" for err in e.errors()]
        spec = SpaceFile()
    return spec.model_copy(update={"parameters": valid}), problems


def _where(loc: tuple) -> str:
    return "".join(f".{part}" for part in loc)


def _message(error: dict) -> str:
    return error["msg"].removeprefix("Value error, ")


def _problems_message(path: Path, problems: list[str]) -> str:
    return f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)


def _semantic_problems(space: SearchSpace, base: Params) -> list[str]:
    """Everything the schema alone cannot see: keys, conditions, values against params.yaml, Optuna settings."""
    known = params_keys()
    problems = []

    def check_key(section: str, key: str) -> bool:
        if key in RESERVED_KEYS:
            problems.append(f"{section}.{key}: set by the sweep for each trial; remove it")
            return False
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{section}.{key}: unknown params.yaml key{hint}")
            return False
        return True

    budget_ok = all([check_key("budget", key) for key in space.budget])
    for key in set(space.budget) & set(space.parameters):
        problems.append(f"parameters.{key}: also fixed in budget; keep it in one place")
    if budget_ok:
        try:
            budget_base = space.budget_params(base)
        except ParamsError as e:
            problems.append(f"budget: rejected by params.yaml's schema: {e}")
            budget_base = base
    else:
        budget_base = base

    seen: dict[str, _ParamSpec] = {}
    for key, spec in space.parameters.items():
        if check_key("parameters", key):
            for value in spec.candidates():
                try:
                    validate_params(with_overrides(budget_base, {key: value}))
                except ParamsError as e:
                    problems.append(f"parameters.{key}: value {value!r} rejected by params.yaml's schema: "
                                    f"{str(e).split('problem(s): ', 1)[-1]}")
        for dep, wanted in (spec.condition or {}).items():
            parent = seen.get(dep)
            if not isinstance(parent, CategoricalSpec):
                problems.append(f"parameters.{key}.condition: {dep!r} must be a categorical parameter listed above "
                                f"{key!r}")
                continue
            missing = [w for w in (wanted if isinstance(wanted, list) else [wanted]) if w not in parent.choices]
            if missing:
                problems.append(f"parameters.{key}.condition: {missing} not among {dep}'s choices {parent.choices}")
        seen[key] = spec

    problems += _objective_problems(space.objective, budget_base)
    for i, changes in enumerate(space.objective.enqueue):
        for key, value in changes.items():
            spec = space.parameters.get(key)
            if spec is None:
                problems.append(f"objective.enqueue[{i}].{key}: not a parameter of this space")
            elif not spec.contains(value):
                problems.append(f"objective.enqueue[{i}].{key}: {value!r} lies outside its range or choices")
    configured = {name for name in PRUNERS if getattr(space.spec.pruner, name, None)} | {space.spec.pruner.default}
    for build, args in ((space.build_sampler, ()), *((space.build_pruner, (name, 1)) for name in sorted(configured))):
        try:
            build(*args)
        except SpaceError as e:
            problems.append(str(e).split(": ", 1)[-1])
    return problems


def _objective_problems(objective: ObjectiveSettings, params: Params) -> list[str]:
    reported = {"val_psnr_mean"} | {f"val_{kind}_sigma{s:g}" for s in params.eval.sigmas for kind in ("psnr", "ssim")}
    if objective.metric not in reported:
        return [f"objective.metric: {objective.metric!r} is not reported by validation with eval.sigmas "
                f"{params.eval.sigmas}; use one of {', '.join(sorted(reported))}"]
    return []
