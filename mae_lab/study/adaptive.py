"""Adaptive seeds: after each round, which points get another seed (pure functions over per-seed results).

A study with ``[study] seeds = { min = 2, max = 8, until = "decided", min_effect = 1.0 }`` runs every point with
seeds 0 .. min-1. A point (other than the default) is **decided** for a metric when the paired 95% interval of its
per-seed differences to the default (``stats.paired_interval``):

- excludes 0 (a difference was detected), or
- lies within +-min_effect (it rules out every effect of interest: its largest |bound| is at most min_effect).

A point that is not decided on every metric of ``SeedPlan.metrics`` gets the next seed (the smallest it has not
had), and the default point gets that seed too, so that every pair shares its seed. This repeats round after round
until every point is decided or has ``max`` seeds. Nothing here reads a database: ``rounds.py`` feeds these
functions from one, so a rerun recomputes the same rounds from the recorded results.

Values are keyed ``values[point][metric][seed]`` (top-1 in points); a point key is any hashable name.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from mae_lab.study.stats import Interval, by_seed, paired_interval
from mae_lab.study.tables import SeedPlan

Values = Mapping[Hashable, Mapping[str, Mapping[int, float]]]


@dataclass(frozen=True)
class Decision:
    """One metric of one point: its paired interval to the default and whether it is decided (``why``)."""

    metric: str
    interval: Interval
    decided: bool
    why: str  # "excludes 0" | "within ±min_effect" | "undecided" | "no interval"


def decide(point: Mapping[int, float], default: Mapping[int, float], min_effect: float, metric: str = "linear",
           level: float = 0.95) -> Decision:
    """Decide one metric of one point from its values and the default's, paired by seed."""
    _, a, b = by_seed(dict(point), dict(default))
    ci = paired_interval(a, b, level)
    if ci.low is None:
        return Decision(metric, ci, False, "no interval")
    if not ci.within_noise:
        return Decision(metric, ci, True, "excludes 0")
    if ci.largest_bound <= min_effect:
        return Decision(metric, ci, True, "within ±min_effect")
    return Decision(metric, ci, False, "undecided")


def point_decisions(plan: SeedPlan, point: Mapping[str, Mapping[int, float]],
                    default: Mapping[str, Mapping[int, float]]) -> list[Decision]:
    """The decision of each of the plan's metrics that the point has values for."""
    return [decide(point[m], default.get(m, {}), plan.min_effect, m) for m in plan.metrics if point.get(m)]


def is_decided(decisions: Sequence[Decision]) -> bool:
    """Decided on every metric (and at least one)."""
    return bool(decisions) and all(d.decided for d in decisions)


def _complete(plan: SeedPlan, seeds: Sequence[int], point: Mapping[str, Mapping[int, float]],
              default: Mapping[str, Mapping[int, float]]) -> bool:
    """Whether every assigned seed has its value on both sides for each metric the point has values for (a
    point waiting for a result, or whose trial failed, gets no further seed)."""
    metrics = [m for m in plan.metrics if point.get(m)]
    return bool(metrics) and all(s in point[m] and s in default.get(m, {}) for m in metrics for s in seeds)


def _next_seed(have: Sequence[int]) -> int:
    taken = set(have)
    return next(s for s in range(len(taken) + 1) if s not in taken)


def next_round(plan: SeedPlan, seeds: Mapping[Hashable, Sequence[int]], values: Values,
               default: Hashable | None) -> dict[Hashable, list[int]]:
    """Every point's seeds after the next round (a superset of ``seeds``, the seeds each point has been given).

    Points below ``plan.min`` are filled up to it. Without a default point nothing is paired, so no point gets more
    than ``min``. The result equals ``seeds`` (as sorted lists) when the study is finished: every point decided, at
    ``max``, or waiting for a missing result.
    """
    out = {k: sorted(v) for k, v in seeds.items()}
    for key, have in seeds.items():
        target = list(have)
        while len(target) < plan.min:
            target.append(_next_seed(target))
        if len(target) == len(have) and default is not None and key != default and len(have) < plan.max:
            mine, base = values.get(key, {}), values.get(default, {})
            if _complete(plan, have, mine, base) and not is_decided(point_decisions(plan, mine, base)):
                target.append(_next_seed(have))
        out[key] = sorted(target)
    if default is not None and default in out:
        out[default] = sorted(set(out[default]).union(*out.values()))
    return out
