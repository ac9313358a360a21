"""The study file's own tables, beside the trial: ``[study]`` (name, seeds or an adaptive seed plan),
``[search]`` (an Optuna space and the checks of its structure) and ``[log]`` (live views in TensorBoard or MLflow),
and the strict base every schema shares. Split out
of ``spec.py`` by job; like it, this module imports nothing else of mae-lab's (``spec.py`` adds the file name to a
TableError).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


def _int_as_float(v: Any) -> Any:
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


Float = Annotated[float, BeforeValidator(_int_as_float)]  # a float field that takes a TOML integer (lr = 1) as well


def _bool_or_auto(v: Any) -> Any:
    if v is True or v is False or v == "auto":
        return v
    raise ValueError(f"should be true, false or \"auto\" (got {v!r})")


AutoBool = Annotated[bool | Literal["auto"], BeforeValidator(_bool_or_auto)]  # true, false or "auto"


class TableError(ValueError):
    """A problem in a [study] or [search] table: ``key`` (dotted) and the reason; spec.py names the file."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key


class Strict(BaseModel):
    """Every schema of a study: unknown keys refused, frozen, no coercion, no inf or nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


SEED_LIMIT = 2**32


def check_seed(seed: int) -> int:
    """A seed is an integer in [0, 2^32) (what every RNG we seed accepts); raise ValueError saying so."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed {seed} is out of range: seeds are integers in [0, 2^32)")
    return seed


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


MAX_SEEDS = 32  # the most seeds an adaptive study may give one point
ALPHA = 0.05  # [study] alpha's default: the error rate a study's decisions hold over all their looks


class SeedPlan(Strict):
    """Adaptive seeds, ``[study] seeds = { min = 2, max = 8, until = "decided", min_effect = 1.0 }``: every point
    starts with seeds 0 .. min-1; after each round a point that is not decided gets the next seed (and the default
    point with it, so that the pairs stay matched), until it is decided or has ``max`` (see ``adaptive.py``)."""

    min: int = Field(2, ge=2, description="seeds every point gets first (2: the fewest with an interval)")
    max: int = Field(8, ge=2, le=MAX_SEEDS, description=f"the most seeds a point gets (at most {MAX_SEEDS})")
    until: Literal["decided"] = Field("decided", description="decided: the paired interval of the difference to "
                                      "the default, at the level adaptive.decision_level spends over the looks, "
                                      "excludes 0, or lies within +-min_effect")
    min_effect: Float = Field(gt=0, description="the smallest effect of interest, in top-1 points")
    metrics: list[Literal["linear", "finetune"]] = Field(["linear"], min_length=1,
                                                         description="the validation top-1s that must be decided")

    @field_validator("max")
    @classmethod
    def _at_least_min(cls, v: int, info: ValidationInfo) -> int:
        if "min" in info.data and v < info.data["min"]:
            raise ValueError(f"max {v} is below min {info.data['min']}")
        return v


class StudySection(Strict):
    name: str
    description: str = ""
    paper: str | None = Field(None, description="the paper table this study mirrors, e.g. '1a' or 'fig5'")
    seeds: list[int] = Field([0], min_length=1, description="a list, or an adaptive table (SeedPlan): then the "
                             "first round's seeds 0 .. min-1")
    adaptive: SeedPlan | None = Field(None, description="set from a seeds table, never written in a study")
    alpha: float = Field(ALPHA, gt=0.0, lt=0.5, description="the error rate of every decision: a fixed seed list's "
                         "intervals are at 1 - alpha; adaptive seeds spend alpha over their looks (adaptive.py)")

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_float(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"alpha must be a number in (0, 0.5); got {v!r}")
        if not 0.0 < v < 0.5:
            raise ValueError(f"alpha {v:g} is outside (0, 0.5): it is the chance of a false decision, e.g. 0.05")
        return float(v)

    @model_validator(mode="before")
    @classmethod
    def _seed_table(cls, data: Any) -> Any:
        """``seeds = {...}`` -> ``adaptive`` (the plan) and ``seeds`` (its first round); errors keep the key
        ``seeds.<field>``."""
        if not isinstance(data, dict):
            return data
        if "adaptive" in data:
            raise ValidationError.from_exception_data("StudySection", [
                {"type": "value_error", "loc": ("adaptive",), "input": data["adaptive"], "ctx": {"error": ValueError(
                    "unknown key (adaptive seeds are written seeds = { min, max, until, min_effect })")}}])
        if not isinstance(data.get("seeds"), dict):
            return data
        try:
            plan = SeedPlan.model_validate(data["seeds"])
        except ValidationError as exc:
            errors = []
            for e in exc.errors():
                if e["type"] == "extra_forbidden":  # name the table's own keys, not the study's
                    e = {**e, "type": "value_error",
                         "ctx": {"error": ValueError(f"unknown key (valid: {', '.join(SeedPlan.model_fields)})")}}
                errors.append({"type": e["type"], "loc": ("seeds", *e["loc"]), "input": e["input"],
                               **({"ctx": e["ctx"]} if "ctx" in e else {})})
            raise ValidationError.from_exception_data("StudySection", errors) from None
        return {**data, "seeds": list(range(plan.min)), "adaptive": plan}

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not SAFE_NAME.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not a safe name (letters, digits, '_', '-', '.'; at most 64)")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if isinstance(v, list):
            for seed in v:
                check_seed(seed)
            if len(set(v)) != len(v):
                raise ValueError(f"duplicate seeds in {v}")
        return v


TRACKERS = ("tensorboard", "mlflow")  # the views `[log] trackers` and `--log` may name


class LogSection(Strict):
    """``[log]``: live views of every trial (``mae_lab/run/tracking.py``). Execution, not science: no part of a
    trial's identity."""

    trackers: list[Literal["tensorboard", "mlflow"]] = Field([], description="where each trial is logged live")
    every: int = Field(20, ge=1, description="pretraining steps between logged losses, lrs and images/s")

    @field_validator("trackers")
    @classmethod
    def _unique_trackers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate tracker in {v}")
        return v


class SearchParam(Strict):
    """One searched dotted key: ``float`` (low, high, optional log or step), ``int`` (low, high, step, optional
    log) or ``categorical`` (choices: strings, numbers or booleans)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None


class SearchSection(Strict):
    """An Optuna search over dotted keys of the trial spec (``mae-lab search``); see ``mae_lab/run/search.py``."""

    space: dict[str, SearchParam] = Field(min_length=1)
    objectives: list[Literal["linear", "finetune"]] = Field(["linear"], min_length=1, max_length=2,
                                                            description="top-1 to maximize; two: a Pareto front")
    sampler: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = Field(
        "none", description="prunes on the kNN top-1 that pretraining reports every pretrain.probe_every epochs")
    n_trials: int = Field(10, ge=1, description="searched trials in all (a rerun tops the study up to this)")
    timeout_s: float | None = Field(None, gt=0, description="start no new trial after this many seconds")


def check_search_table(search: SearchSection, base: dict[str, Any], trial_keys: Collection[str]) -> None:
    """The [search] table's structure: each parameter's fields, and what the sampler and pruner need; raises
    TableError. ``trial_keys``: the trial spec's top-level sections. The values themselves are checked against the
    trial schema when the study is expanded (``expand.check_search``)."""
    for key, p in search.space.items():
        where = f"search.space.{key}"
        _check_space_key(where, key, trial_keys)
        if p.type == "categorical":
            _check_categorical(where, p)
        else:
            _check_numeric(where, p, search.sampler)
    _check_objectives(search, base)


def _check_space_key(where: str, key: str, trial_keys: Collection[str]) -> None:
    """A searched key names a section of the trial spec, and is not the seed."""
    if key == "seed":
        raise TableError(where, "the seed is not searched: list the seeds in [study].seeds")
    if key.split(".")[0] not in trial_keys:
        near = difflib.get_close_matches(key.split(".")[0], list(trial_keys), n=1)
        hint = f" (did you mean '{near[0]}.…'?)" if near else " (keys start with data., model., pretrain., eval.)"
        raise TableError(where, f"unknown key{hint}")


def _check_categorical(where: str, p: SearchParam) -> None:
    """A categorical parameter: distinct plain choices, and none of the numeric fields."""
    for name in ("low", "high", "step"):
        if getattr(p, name) is not None:
            raise TableError(f"{where}.{name}", f"'{name}' is for float and int parameters; a "
                             "categorical parameter has only choices")
    if p.log:
        raise TableError(f"{where}.log", "a categorical parameter cannot be log-scaled")
    if not p.choices:
        raise TableError(f"{where}.choices", "a categorical parameter needs a non-empty list of choices")
    bad = next((c for c in p.choices if not isinstance(c, (str, int, float, bool))), None)
    if bad is not None:
        raise TableError(f"{where}.choices", f"choices must be strings, numbers or booleans; got {bad!r}")
    seen = [repr(c) for c in p.choices]
    if len(set(seen)) != len(seen):
        raise TableError(f"{where}.choices", "duplicate choices")


def _check_numeric(where: str, p: SearchParam, sampler: str) -> None:
    """A float or int parameter: low <= high, log or step as its type allows, whole numbers for an int, a step for
    a float under the grid sampler."""
    if p.choices is not None:
        raise TableError(f"{where}.choices", f"choices are for categorical parameters, not {p.type}")
    if p.low is None or p.high is None:
        name = "low" if p.low is None else "high"
        raise TableError(f"{where}.{name}", f"required key is missing (a {p.type} parameter needs low and high)")
    if p.low > p.high:
        raise TableError(f"{where}.low", f"low {p.low:g} is above high {p.high:g}")
    if p.log and p.low <= 0:
        raise TableError(f"{where}.low", f"a log-scaled parameter needs low > 0; got {p.low:g}")
    if p.type == "int":
        for name in ("low", "high", "step"):
            v = getattr(p, name)
            if v is not None and v != int(v):
                raise TableError(f"{where}.{name}", f"an int parameter needs whole numbers; got {v:g}")
        if p.log and p.step not in (None, 1):
            raise TableError(f"{where}.step", "an int parameter cannot be log-scaled with a step other than 1")
    elif p.log and p.step is not None:
        raise TableError(f"{where}.step", "a float parameter takes either log or step, not both")
    if sampler == "grid" and p.type == "float" and p.step is None:
        raise TableError(f"{where}.step", "the grid sampler needs a step for a float parameter (or make it "
                         "categorical)")


def _check_objectives(search: SearchSection, base: dict[str, Any]) -> None:
    """Distinct objectives, each evaluated; the sampler and pruner able to serve them."""
    if len(set(search.objectives)) != len(search.objectives):
        raise TableError("search.objectives", f"duplicate objective in {search.objectives}")
    for obj in search.objectives:
        enabled = (base.get("eval", {}).get(obj) or {}).get("enabled", True)
        if not enabled and f"eval.{obj}.enabled" not in search.space:
            raise TableError("search.objectives", f"objective '{obj}' needs eval.{obj}.enabled = true")
    if search.sampler == "cmaes" and len(search.objectives) > 1:
        raise TableError("search.sampler", "cmaes optimizes one objective; use tpe or random for two")
    if search.pruner == "none":
        return
    if len(search.objectives) > 1:
        raise TableError("search.pruner", "Optuna prunes single-objective searches only: use "
                         "pruner = \"none\" with two objectives")
    if not base.get("pretrain", {}).get("probe_every") and "pretrain.probe_every" not in search.space:
        raise TableError("search.pruner", "a pruner needs an intermediate value: set pretrain.probe_every "
                         "> 0 (a kNN top-1 every that many pretraining epochs)")
