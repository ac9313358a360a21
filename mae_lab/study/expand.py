"""Study -> trials: each a resolved, checked spec and its point (``identity`` hashes a spec under a run's context)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from mae_lab.study.init_check import FieldError, resolve_fields
from mae_lab.study.presets import PRESETS, MAEConfig, config_problem
from mae_lab.study.spec import Study, StudyError, TrialSpec, schedule_problem, set_dotted, validate_trial


@dataclass(frozen=True)
class Trial:
    """One expanded trial: its resolved spec and the values of the study's axes. It has no hash: what it hashes to
    depends on how it runs (``identity.bind`` gives it its hashes under a run's context)."""

    spec: TrialSpec
    axes: dict[str, Any]  # dotted key -> value, for this trial's grid point / case

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()) or "default"


def mae_config(spec: TrialSpec) -> MAEConfig:
    return MAEConfig(**spec.model.model_dump(exclude={"preset"}))


@functools.cache
def _mae_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(MAEConfig)}


def resolve(study: Study, point: dict[str, Any], seed: int) -> TrialSpec:
    """Fill the model from its preset and check what depends on several fields, then the probed blocks, the fine-tune
    size and the init file (its sha256 into the spec); errors name the key."""
    spec = resolve_settings(study, point, seed)
    try:  # probed blocks, fine-tune size, and the init file's sha256 into the spec (issue 17)
        return resolve_fields(spec)
    except FieldError as exc:
        raise StudyError(study.path, f"grid.{exc.key}" if exc.key in point else exc.key, exc.reason) from None


def resolve_settings(study: Study, point: dict[str, Any], seed: int) -> TrialSpec:
    """``resolve`` without reading any file: the settings as written, the model filled from its preset and checked
    (what a report compares points against: a pure function of the study text)."""
    raw = set_dotted(study.base, "seed", seed)
    spec = validate_trial(study.path, raw, point)
    model = spec.model
    if model.preset not in PRESETS:
        key = "grid.model.preset" if "model.preset" in point else "model.preset"
        raise StudyError(study.path, key, f"unknown preset {model.preset!r} (valid: {', '.join(PRESETS)})")
    full = {**_mae_defaults(), **PRESETS[model.preset], **model.model_dump(exclude_none=True)}
    spec = spec.model_copy(update={"model": type(model).model_validate(full)})

    def where(*keys: str) -> str:
        for k in keys:
            if f"model.{k}" in point:
                return f"grid.model.{k}"
        return f"model.{keys[0]}"

    problem = config_problem(full)  # the model checks, once: MAEConfig makes the same
    if problem is not None:
        raise StudyError(study.path, where(*problem[0]), problem[1])
    ft, depth = spec.eval.finetune, spec.model.depth
    if ft.last_k_blocks is not None and ft.last_k_blocks > depth:
        key = "grid.eval.finetune.last_k_blocks" if "eval.finetune.last_k_blocks" in point \
            else "eval.finetune.last_k_blocks"
        raise StudyError(study.path, key, f"last_k_blocks {ft.last_k_blocks} exceeds the encoder depth {depth}")
    schedule = schedule_problem(spec)
    if schedule is not None:
        key, reason = schedule
        stage = key.rsplit(".", 1)[0]
        raise StudyError(study.path, next((f"grid.{k}" for k in (key, f"{stage}.epochs") if k in point), key), reason)
    return spec


def search_values(study: Study) -> dict[str, list[tuple[str, Any]]]:
    """Per searched key, the (field, value) pairs that bound it: low and high, or every choice."""
    out = {}
    for key, p in study.search.space.items():
        if p.type == "categorical":
            out[key] = [("choices", c) for c in p.choices]
        else:
            conv = int if p.type == "int" else float
            out[key] = [("low", conv(p.low)), ("high", conv(p.high))]
    return out


def check_search(study: Study) -> None:
    """Each searched key's bounds (or choices), alone on the base settings, must make a valid trial; errors name
    ``search.space.KEY.FIELD``. (Combinations are checked as they are sampled: an invalid one fails its trial.)"""
    for key, pairs in search_values(study).items():
        for name, value in pairs:
            try:
                resolve(study, {key: value}, study.study.seeds[0])
            except StudyError as exc:
                if exc.reason.startswith("unknown key"):
                    raise StudyError(study.path, f"search.space.{key}", exc.reason) from None
                reason = exc.reason if exc.reason.startswith("value ") else f"value {value!r}: {exc.reason}"
                raise StudyError(study.path, f"search.space.{key}.{name}", reason) from None


def expand(study: Study) -> list[Trial]:
    """One trial per (point, seed), in file order; seeds vary fastest. A search study expands to its base point
    (the search samples the rest), after its space is checked."""
    if study.search is not None:
        check_search(study)
    trials = []
    for point in study.points:
        first = resolve(study, point, study.study.seeds[0])  # validated once per point: seeds change only `seed`
        trials += [Trial(first if seed == first.seed else first.model_copy(update={"seed": seed}), dict(point))
                   for seed in study.study.seeds]
    return trials
