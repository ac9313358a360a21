"""Statistics: the paired interval equals scipy's ttest_rel interval, Welch's equals a hand computation, verdicts
follow the interval and the paper's direction."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from mae_lab.report import paper
from mae_lab.study.stats import (
    by_seed,
    holm,
    paired_interval,
    paired_p,
    spearman,
    t_ppf,
    verdict,
    verdict_text,
    welch_interval,
)


def test_t_quantiles_match_the_printed_table():
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (1e6, 1.9600)):
        assert t_ppf(0.975, df) == pytest.approx(t, abs=1e-4)
    assert t_ppf(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)
    with pytest.raises(ValueError):
        t_ppf(1.0, 3)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 30])
def test_paired_interval_matches_ttest_rel(n):
    rng = np.random.default_rng(n)
    shared = rng.normal(70, 3, n)  # the seed's effect, common to both arms
    a, b = shared + 1.5 + rng.normal(0, 0.7, n), shared + rng.normal(0, 0.7, n)
    for level in (0.9, 0.95, 0.99):
        ci = paired_interval(list(a), list(b), level)
        ref = sps.ttest_rel(a, b).confidence_interval(confidence_level=level)
        assert abs(ci.low - ref.low) < 1e-9 and abs(ci.high - ref.high) < 1e-9
        assert ci.delta == pytest.approx(float(np.mean(a - b)), abs=1e-12)
        assert ci.kind == "paired" and ci.n == n and ci.df == n - 1
    # the seeds are shared, so pairing removes their spread: the paired interval is the narrower one here
    assert paired_interval(list(a), list(b)).largest_bound < welch_interval(list(a), list(b)).largest_bound


def test_paired_interval_without_an_interval():
    assert paired_interval([], []).note == "no pairs"
    one = paired_interval([71.0], [70.0])
    assert one.delta == 1.0 and one.low is None and one.note == "n=1" and one.within_noise is None
    flat = paired_interval([71.0, 72.0], [70.0, 71.0])
    assert (flat.delta, flat.low, flat.note) == (1.0, None, "no spread") and flat.within_noise is None
    with pytest.raises(ValueError):
        paired_interval([1.0, 2.0], [1.0])


def test_welch_interval_matches_a_hand_computation():
    # means 60 and 72, sample variances 4 and 4, n = 3 each: se = sqrt(8/3), df = 4, t(0.975, 4) = 2.776445
    ci = welch_interval([58, 60, 62], [70, 72, 74])
    half = 2.776445 * math.sqrt(8 / 3)
    assert ci.delta == pytest.approx(-12.0) and ci.df == pytest.approx(4.0) and ci.kind == "welch"
    assert (ci.low, ci.high) == (pytest.approx(-12 - half, abs=1e-5), pytest.approx(-12 + half, abs=1e-5))
    assert ci.within_noise is False
    ci = welch_interval([69, 70, 71], [70, 72, 74])  # df = (1/3 + 4/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17
    assert ci.df == pytest.approx(50 / 17) and ci.within_noise is True
    one = welch_interval([70], [70, 72, 74])
    assert one.low is None and one.note == "n=1" and one.within_noise is None


def test_pairs_are_matched_by_seed():
    seeds, a, b = by_seed({0: 71.0, 1: 73.0, 3: 99.0}, {1: 72.0, 0: 70.0, 2: 50.0})
    assert seeds == [0, 1] and a == [71.0, 73.0] and b == [70.0, 72.0]


def test_verdicts():
    up = paired_interval([72.0, 73.0, 74.5], [70.0, 70.5, 71.0])  # [+0.8, +4.6]: excludes 0 above
    down = paired_interval([70.0, 70.5, 71.0], [72.0, 73.0, 74.5])
    none = paired_interval([70.0, 71.5, 70.2], [70.4, 70.9, 70.6])  # [-1.5, +1.4]: contains 0
    assert up.low > 0 and down.high < 0 and none.within_noise
    # reproduces: 0 excluded on the paper's side AND the paper's Δ inside; never for a sign alone
    assert verdict(up, +1.2) == "reproduces" and verdict(down, -2.0) == "reproduces"
    assert verdict(up, +13.9) == "same direction, smaller" and verdict(down, -0.4) == "same direction, larger"
    assert verdict(up, -3.0) == "opposite" and verdict(down, +0.1) == "opposite"
    assert verdict(up, 0.0) == "opposite" and verdict(up, None) == "detected"
    assert verdict(none, +5.0) == "paper's Δ ruled out" and verdict(none, -1.0) == "not detected"
    assert verdict(none, None) == "not detected" and verdict(paired_interval([1.0], [2.0]), 1.0) == "no interval"
    assert verdict_text(none, -1.0) == f"not detected (paired 95%; rules out |Δ| > {none.largest_bound:.1f})"
    assert verdict_text(none, 5.0, "99%, Bonferroni over 5 looks") == (
        "no effect detected, the paper's Δ ruled out here (paired 99%, Bonferroni over 5 looks; rules "
        f"out |Δ| > {none.largest_bound:.1f})")
    assert none.largest_bound == max(abs(none.low), abs(none.high))
    assert verdict_text(welch_interval([75.0, 76.0, 77.0], [70.0, 70.5, 71.0]), 5.0) == "reproduces (Welch 95%)"
    assert verdict_text(up, 9.0) == "same direction, smaller than the paper (paired 95%)"


def test_holm_steps_down_and_paired_p_is_ttest_rel():
    assert holm([0.01, 0.04, 0.03, None], 0.05) == [True, False, False, None]  # 0.01 <= 0.05/3; 0.03 > 0.05/2
    assert holm([0.01, 0.02, 0.04], 0.05) == [True, True, True]  # 0.01 <= .05/3, 0.02 <= .05/2, 0.04 <= .05
    assert holm([0.2, 0.001], 0.05) == [False, True]
    a, b = [72.0, 73.0, 74.5], [70.0, 70.5, 71.0]
    assert paired_p(a, b) == pytest.approx(float(sps.ttest_rel(a, b).pvalue)) and paired_p([1.0], [2.0]) is None


def test_spearman_matches_scipy_and_paper_directions():
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    assert spearman([1, 2], [2, 1]) == -1.0  # exactly: rounded to 12 digits
    assert spearman([1, 1], [1, 2]) is None and spearman([1], [1]) is None
    fig5 = paper.get_table("fig5")
    p75 = next(r for r in fig5.rows if r.values == (0.75,))
    p10 = next(r for r in fig5.rows if r.values == (0.1,))
    assert p75.ft == 84.9 and p75.lin == 73.5 and p10.lin == 54.6
    assert paper.paper_delta(p10, p75, "linear") == pytest.approx(-18.9)
    assert paper.paper_delta(p10, p75, "finetune") is None
    # a ratio the transcribed figure does not plot matches nothing, never the nearest other ratio
    _, _, by_value, _ = paper.match_rows(fig5, [(0.25,), (0.5,), (0.75,), (0.9,)])
    assert by_value == [None, None, p75, None]
    # by position (decoder widths at CIFAR scale): ordering only; paper Δ only where the values are equal
    t1b = paper.get_table("1b")
    comp = paper.compare(t1b, [(32,), (64,), (128,), (256,)], [1.0, 2.0, 3.0, 4.0], [None] * 4)
    assert comp.rule == "position" and [m.values for m in comp.matches] == [(128,), (256,), (512,), (768,)]
    assert [m and m.values for m in comp.by_value] == [None, None, (128,), (256,)]
    assert paper.paper_delta(comp.by_value[3], comp.by_value[2], "linear") == pytest.approx(2.2)
    assert comp.agreement["linear"] == (pytest.approx(0.8), 4)  # paper 69.1 < 71.3 < 73.5 > 73.1
    two = paper.compare(t1b, [(128,), (256,)], [2.0, 1.0], [None] * 2)  # rho over 2 points is +-1: not given
    assert two.agreement["linear"] == (None, 2)
