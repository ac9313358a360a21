"""A study's ``[search]`` space as Optuna sees it: distributions, grid values, membership, and the sampler and
pruner the space names."""
from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mae_lab.study.tables import SearchParam, SearchSection


def distributions(search: SearchSection) -> dict[str, BaseDistribution]:
    return {key: _distribution(p) for key, p in search.space.items()}


def _choices(p: SearchParam) -> list[Any]:
    assert p.choices is not None  # a categorical parameter has its choices (tables.SearchParam checks)
    return p.choices


def _bounds(p: SearchParam) -> tuple[float, float]:
    assert p.low is not None and p.high is not None  # a numeric parameter has both (tables.SearchParam checks)
    return p.low, p.high


def _distribution(p: SearchParam) -> BaseDistribution:
    if p.type == "categorical":
        return CategoricalDistribution(_choices(p))
    low, high = _bounds(p)
    if p.type == "int":
        return IntDistribution(int(low), int(high), log=p.log, step=int(p.step or 1))
    return FloatDistribution(low, high, log=p.log, step=p.step)


def grid_values(p: SearchParam) -> list[Any]:
    if p.type == "categorical":
        return list(_choices(p))
    low, high = _bounds(p)
    n = int(math.floor((high - low) / (p.step or 1) + 1e-9))
    values = [low + i * (p.step or 1) for i in range(n + 1)]
    return [int(round(v)) for v in values] if p.type == "int" else [round(v, 12) for v in values]


def in_space(p: SearchParam, value: Any) -> bool:
    if p.type == "categorical":
        return any(type(value) is type(c) and value == c for c in _choices(p))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if p.type == "int" and value != int(value):
        return False
    low, high = _bounds(p)
    if not low <= value <= high:
        return False
    return p.step is None or abs((value - low) / p.step - round((value - low) / p.step)) < 1e-6


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its ``study.stop()`` after the last point, which only works inside
    ``optimize``; the ask/tell loop checks ``is_exhausted`` itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(search: SearchSection, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if search.sampler == "grid":
        return AskTellGridSampler({k: grid_values(p) for k, p in search.space.items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(search: SearchSection, epochs: int, probe_every: int) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, probe_every), max_resource=max(1, epochs))
    return optuna.pruners.NopPruner()
