"""Adaptive seeds over a database: the trials of a study's current round, recomputed from the recorded results.

``runner.run_study`` calls ``current_trials`` before each round: starting from the study's first round (seeds
0 .. min-1 of every point) it applies ``adaptive.next_round`` to the results the database holds, as long as every
trial it proposes has finished there, and returns the trials up to the first round that still has to run. A rerun
of an interrupted study therefore lands on the same round, and a finished study adds nothing.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Engine

from mae_lab.store.reads import get_study, study_trials
from mae_lab.store.states import FINAL, METRIC_COLUMNS
from mae_lab.study.adaptive import next_round, to_points
from mae_lab.study.expand import Trial, expand, resolve
from mae_lab.study.identity import BoundTrial
from mae_lab.study.spec import Study, get_dotted


def point_key(axes: dict[str, Any]) -> str:
    """A point's name: its axis values as canonical JSON (as the report groups trials)."""
    return json.dumps(axes, sort_keys=True)


def default_key(study: Study, trials: Sequence[Trial]) -> str | None:
    """The point whose values of every axis of the study are the base settings' (None when no point is)."""
    base = resolve(study, {}, study.study.seeds[0])
    axes = list(dict.fromkeys(k for t in trials for k in t.axes))
    values = {k: get_dotted(base, k) for k in axes}
    for t in trials:
        if all(t.axes.get(k, values[k]) == values[k] for k in axes):
            return point_key(t.axes)
    return None


def _with_seed(study: Study, axes: dict[str, Any], seed: int) -> list[Trial]:
    """The trials of one point and one seed, expanded as the study's own are."""
    one = study.model_copy(update={"points": [axes], "study": study.study.model_copy(update={"seeds": [seed]})})
    return expand(one)


def current_trials(engine: Engine, study: Study, trials: list[BoundTrial], *, bind: Callable[[Trial], BoundTrial],
                   trusted: Callable[[str], bool] = lambda h: True) -> list[BoundTrial]:
    """``trials`` (the first round) plus every later round that the recorded results call for, up to and including
    the first round with a trial that has not finished. ``bind`` gives a new trial the hashes the runner records
    (``planning.binder``); ``trusted(hash)`` says whether a recorded result counts (``--rerun`` trusts only what
    this run recorded)."""
    plan = study.study.adaptive
    if plan is None:
        return trials
    row = get_study(engine, study.study.name)
    recorded = {} if row is None else {t.hash: (t.status, r) for t, r in study_trials(engine, row.id,
                                                                                        active_only=False)
                                       if trusted(t.hash)}
    default = default_key(study, trials)
    axes = {point_key(t.axes): t.axes for t in trials}
    out = list(trials)
    while True:
        seeds: dict[str, list[int]] = {k: [] for k in axes}
        values: dict[str, dict[str, dict[int, float]]] = {k: {m: {} for m in METRIC_COLUMNS} for k in axes}
        for t in out:
            key = point_key(t.axes)
            seeds[key].append(t.spec.seed)
            status, result = recorded.get(t.hash, ("pending", None))
            for metric, column in METRIC_COLUMNS.items():
                value = None if status != "done" or result is None else getattr(result, column)
                if value is not None:
                    values[key][metric][t.spec.seed] = to_points(value)
        target = next_round(plan, seeds, values, default, study.study.alpha)
        fresh = [bind(t) for key, ss in target.items() for s in ss if s not in seeds[key]
                 for t in _with_seed(study, axes[key], s)]
        if not fresh:
            return out
        out += fresh
        if any(recorded.get(t.hash, ("pending", None))[0] not in FINAL for t in fresh):
            return out
