"""Intervals and verdicts for differences of top-1 between a study point and its default (scipy.stats underneath).

- ``paired_interval``: seed s gives every arm of a study the same init, data order and masks (common random
  numbers), so the per-seed differences ``a[s] - b[s]`` are the sample: mean difference +- t_{(1+level)/2, n-1} *
  sd / sqrt(n), the interval of ``scipy.stats.ttest_rel``.
- ``welch_interval``: the arms treated as independent samples (``scipy.stats.ttest_ind(equal_var=False)``); wider
  when the seeds are correlated, shown beside the paired one.
- ``verdict``: what an interval says against the paper's difference (its words: ``verdict``'s docstring).
- ``paired_p`` and ``holm``: a comparison's p-value and Holm's step-down over a study's comparisons.

scipy returns NaN where an interval does not exist; these functions say why instead (``Interval.note``).
"""
from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats as sps

Kind = Literal["paired", "welch"]


@functools.lru_cache(maxsize=4096)  # adaptive rounds and the simulation test ask for the same few quantiles
def t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p}")
    if df <= 0:
        raise ValueError(f"df must be positive; got {df}")
    return float(sps.t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """A difference (row minus default, in points) with its confidence interval; ``low``/``high`` are None when
    there is no interval (``note`` says why: "n=1", or "no pairs" for a paired interval without shared seeds)."""

    delta: float | None
    low: float | None
    high: float | None
    df: float | None
    level: float
    kind: Kind = "welch"
    n: int = 0  # paired: the number of seed pairs; welch: the smaller of the two sample sizes
    note: str = ""  # "n=1", "no pairs", or "no spread" (every difference equal: no estimate of the spread)

    @property
    def within_noise(self) -> bool | None:
        """True when the interval contains 0 (the difference is within seed noise); None without an interval."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 0.0 <= self.high

    @property
    def largest_bound(self) -> float | None:
        """max(|low|, |high|): an interval containing 0 rules out every effect at least this large."""
        if self.low is None or self.high is None:
            return None
        return max(abs(self.low), abs(self.high))


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The t interval of mean(a - b) over pairs (``a[i]`` and ``b[i]`` share seed i), as ``ttest_rel`` gives it."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths; got {len(a)} and {len(b)}")
    if not a:
        return Interval(None, None, None, None, level, "paired", 0, "no pairs")
    diffs = [x - y for x, y in zip(a, b)]
    delta = statistics.fmean(diffs)
    n = len(diffs)
    if n < 2:
        return Interval(delta, None, None, None, level, "paired", n, "n=1")
    sd = math.sqrt(math.fsum((d - delta) ** 2 for d in diffs) / (n - 1))  # as statistics.stdev, in floats:
    # its exact fractions cost 20x more, and the rounds and the simulation test call this many thousand times
    if sd <= 1e-9 * max(1.0, abs(delta)):  # every pair differs by the same amount (up to rounding): no estimate
        # of the spread, so no interval
        return Interval(delta, None, None, None, level, "paired", n, "no spread")
    half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(delta, delta - half, delta + half, float(n - 1), level, "paired", n)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Welch's t interval for mean(a) - mean(b) (unequal variances, Welch-Satterthwaite df), as
    ``ttest_ind(a, b, equal_var=False)`` gives it."""
    if not a or not b:
        raise ValueError("both samples need at least one value")
    delta = statistics.fmean(a) - statistics.fmean(b)
    n = min(len(a), len(b))
    if n < 2:
        return Interval(delta, None, None, None, level, "welch", n, "n=1")
    if statistics.variance(a) == 0.0 and statistics.variance(b) == 0.0:
        return Interval(delta, None, None, None, level, "welch", n, "no spread")
    res = sps.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=level)
    return Interval(delta, float(ci.low), float(ci.high), float(res.df), level, "welch", n)


def by_seed(a: dict[int, float], b: dict[int, float]) -> tuple[list[int], list[float], list[float]]:
    """The seeds both sides have, in order, with their values: the pairs of a paired interval."""
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds]


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho (``scipy.stats.spearmanr``, ties get average ranks); None with fewer than 2 points or a
    constant side."""
    if len(xs) != len(ys) or len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return round(float(sps.spearmanr(xs, ys).statistic), 12)  # so that a perfect (anti)correlation is exactly +-1


def paired_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The two-sided p-value of ``scipy.stats.ttest_rel(a, b)``; None without one (fewer than 2 pairs, no spread)."""
    ci = paired_interval(a, b)
    if ci.low is None:
        return None
    return float(sps.ttest_rel(a, b).pvalue)


def holm(pvalues: Sequence[float | None], alpha: float) -> list[bool | None]:
    """Holm's step-down over a family: which hypotheses are rejected at family-wise error ``alpha`` (None where a
    p-value is missing; the family is the comparisons that have one)."""
    have = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[bool | None] = [None if p is None else False for p in pvalues]
    for rank, (p, i) in enumerate(have):
        if p > alpha / (len(have) - rank):
            break
        out[i] = True
    return out


Verdict = Literal["reproduces", "same direction, smaller", "same direction, larger", "opposite",
                  "paper's Δ ruled out", "not detected", "detected", "no interval"]


def verdict(interval: Interval | None, paper_delta: float | None) -> Verdict:
    """What an interval of (row - default) says, against the paper's (row - default) when there is one.

    - "reproduces": the interval excludes 0 on the paper's side and contains the paper's Δ;
    - "same direction, smaller" / "larger": it excludes 0 on the paper's side, and the paper's Δ lies beyond its
      far / near bound;
    - "opposite": it excludes 0 on the other side (or the paper saw no difference at all);
    - "paper's Δ ruled out": it contains 0 but not the paper's Δ (no effect detected; the paper's effect is ruled
      out at this scale);
    - "not detected": it contains 0 and the paper's Δ (or there is no paper Δ): ``Interval.largest_bound`` is the
      smallest effect it rules out;
    - "detected": it excludes 0 and the paper has no number to compare with;
    - "no interval": one seed, or no pairs.

    Never "reproduces" for a sign alone.
    """
    if interval is None or interval.low is None or interval.high is None:
        return "no interval"
    lo, hi = interval.low, interval.high
    if interval.within_noise:
        if paper_delta is None or lo <= paper_delta <= hi:
            return "not detected"
        return "paper's Δ ruled out"
    if paper_delta is None:
        return "detected"
    if paper_delta == 0 or (lo > 0) != (paper_delta > 0):
        return "opposite"
    if lo <= paper_delta <= hi:
        return "reproduces"
    return "same direction, smaller" if abs(paper_delta) > max(abs(lo), abs(hi)) else "same direction, larger"


def verdict_text(interval: Interval | None, paper_delta: float | None, rule: str = "") -> str:
    """``verdict`` in words with the interval's kind and level (``rule`` says how the level was chosen), e.g.
    "not detected (paired 99%, Bonferroni over 5 looks; rules out |Δ| > 1.3)"."""
    word = verdict(interval, paper_delta)
    if word == "no interval" or interval is None:  # (verdict says "no interval" for None)
        return f"no interval ({interval.note if interval is not None else 'no data'})"
    kind = "paired" if interval.kind == "paired" else "Welch"
    how = f"{kind} {rule}" if rule else f"{kind} {100 * interval.level:.4g}%"
    if word == "not detected":
        return f"not detected ({how}; rules out |Δ| > {interval.largest_bound:.1f})"
    if word == "paper's Δ ruled out":
        return f"no effect detected, the paper's Δ ruled out here ({how}; rules out |Δ| > " \
               f"{interval.largest_bound:.1f})"
    if word == "opposite" and paper_delta == 0:
        return f"opposite ({how}; the paper saw no difference)"
    if word.startswith("same direction"):
        return f"{word} than the paper ({how})"
    return f"{word} ({how})"
