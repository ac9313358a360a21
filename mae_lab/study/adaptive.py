"""Adaptive seeds: after each round, which points get another seed (pure functions over per-seed results).

A study with ``[study] seeds = { min = 2, max = 8, until = "decided", min_effect = 1.0 }`` runs every point with
seeds 0 .. min-1. A point (other than the default) is **decided** for a metric when the paired interval of its
per-seed differences to the default (``stats.paired_interval``), at the level ``decision_level`` gives:

- excludes 0 (a difference was detected), or
- lies within +-min_effect (it rules out every effect of interest: its largest |bound| is at most min_effect).

A point that is not decided on every metric of ``SeedPlan.metrics`` gets the next seed (the smallest it has not
had), and the default point gets that seed too, so that every pair shares its seed. This repeats round after round
until every point is decided or has ``max`` seeds. Nothing here reads a database: ``rounds.py`` feeds these
functions from one, and the report calls the same ones, so a rerun recomputes the same rounds and the page shows
the decisions the rounds took.

**Why the level is 1 - alpha / looks (Bonferroni over the planned looks).** A point is looked at after each of at
most ``looks(plan) = max - min + 1`` rounds and stops at the first decision. Checking a fixed 95% interval at every
look lets the chance of a false "detected" grow with the looks (about 14% at min 2 / max 6, simulated in
tests/test_sequential.py). Spending alpha / looks at each look bounds the chance of any false decision over all
looks by alpha (the union bound), for "detected" at a true effect of 0 and for "within +-min_effect" at a true
effect of min_effect alike (the latter needs one side of the interval wrong, a chance of at most alpha / 2 / looks a
look). We chose it over the alternatives for these studies' sizes (2 to 10 seeds): Lan-DeMets spending boundaries
(O'Brien-Fleming, Pocock) are derived for normal statistics with known variance, and at 1 to 9 degrees of freedom
the t-statistics are far from that, so their stated rates would not hold without recalibrating each (min, max) by
simulation; anytime-valid confidence sequences for an unknown variance are wider still at n <= 10 than the
Bonferroni t interval. Bonferroni needs only (min, max, alpha), is the same in rounds, report and test, and its
price is measured: at min 2 / max 6 the power at a true effect of 2 standard deviations falls from 98% to 79%.

Values are keyed ``values[point][metric][seed]`` (top-1 in points, ``to_points``); a point key is any hashable name.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from mae_lab.study.stats import Interval, by_seed, paired_interval, paired_p
from mae_lab.study.tables import ALPHA, SeedPlan

Values = Mapping[Hashable, Mapping[str, Mapping[int, float]]]


def to_points(fraction: float) -> float:
    """A recorded top-1 (a fraction) in the percentage points every decision and page uses."""
    return 100.0 * fraction


def looks(plan: SeedPlan) -> int:
    """How many times a point can be looked at: once at ``min`` seeds and once after each added seed."""
    return plan.max - plan.min + 1


def decision_level(plan: SeedPlan | None, alpha: float = ALPHA) -> float:
    """The confidence level of every interval a decision reads: 1 - alpha for a fixed seed list (one look), 1 -
    alpha / looks for adaptive seeds (Bonferroni over the planned looks; see the module docstring)."""
    return 1.0 - alpha / (1 if plan is None else looks(plan))


def rule_text(plan: SeedPlan | None, alpha: float = ALPHA) -> str:
    """The level and the rule that set it, as a verdict names them, e.g. "99%, Bonferroni over 5 looks"."""
    level = f"{100 * decision_level(plan, alpha):.4g}%"
    if plan is None:
        return f"{level}, one look"
    return f"{level}, Bonferroni over {looks(plan)} looks"


@dataclass(frozen=True)
class Decision:
    """One metric of one point: its paired interval to the default and whether it is decided (``why``)."""

    metric: str
    interval: Interval
    decided: bool
    why: str  # "excludes 0" | "within ±min_effect" | "undecided" | "no interval"


def decide(point: Mapping[int, float], default: Mapping[int, float], min_effect: float, metric: str = "linear",
           level: float = 0.95) -> Decision:
    """Decide one metric of one point from its values and the default's, paired by seed, at ``level``."""
    _, a, b = by_seed(dict(point), dict(default))
    ci = paired_interval(a, b, level)
    bound = ci.largest_bound  # None: no interval (low and high are None together)
    if bound is None:
        return Decision(metric, ci, False, "no interval")
    if not ci.within_noise:
        return Decision(metric, ci, True, "excludes 0")
    if bound <= min_effect:
        return Decision(metric, ci, True, "within ±min_effect")
    return Decision(metric, ci, False, "undecided")


def point_decisions(plan: SeedPlan, point: Mapping[str, Mapping[int, float]],
                    default: Mapping[str, Mapping[int, float]], alpha: float = ALPHA) -> list[Decision]:
    """The decision of each of the plan's metrics that the point has values for, at ``decision_level``."""
    level = decision_level(plan, alpha)
    return [decide(point[m], default.get(m, {}), plan.min_effect, m, level) for m in plan.metrics if point.get(m)]


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
               default: Hashable | None, alpha: float = ALPHA) -> dict[Hashable, list[int]]:
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
            if _complete(plan, have, mine, base) and not is_decided(point_decisions(plan, mine, base, alpha)):
                target.append(_next_seed(have))
        out[key] = sorted(target)
    if default is not None and default in out:
        out[default] = sorted(set(out[default]).union(*out.values()))
    return out


def comparison_p(plan: SeedPlan | None, point: Mapping[int, float], default: Mapping[int, float]) -> float | None:
    """A p-value for "this point differs from the default" that holds over the looks its seeds were taken in: for
    adaptive seeds, looks x the smallest paired p-value over the looks (seeds in order, from ``min`` on; Bonferroni,
    as ``decision_level``), capped at 1; for a fixed seed list, the paired p-value of every pair. Holm's step-down
    over a study's points reads these (``stats.holm``)."""
    _, a, b = by_seed(dict(point), dict(default))
    if plan is None:
        return paired_p(a, b)
    ps = [p for n in range(plan.min, min(len(a), plan.max) + 1) if (p := paired_p(a[:n], b[:n])) is not None]
    return min(1.0, looks(plan) * min(ps)) if ps else None
