"""The paper's ablation numbers (package data ``paper_results.json``) and how a study's rows line up with them.

A study's ``paper`` field ("1a" ... "1f", "fig5") picks the table. Its rows are matched to ours by this rule, which
the report prints beside its verdict:

1. **By value**: a paper row matches our row when its values of the table's axes equal ours (floats by isclose),
   e.g. decoder depth 4 <-> 4, ``norm_pix_loss`` true <-> "pixel (w/ per-patch norm)", (block, 0.5) <-> "block 50%".
   Only these matches (``Comparison.by_value``) give a row a paper Δ and a verdict; the paper's Δ is the paper row
   minus the paper's row at *our* default (for decoder depth, the paper's 2 blocks, not its default 8), and a value
   the paper does not report (a mask ratio Figure 5's transcribed labels lack) matches nothing.
2. **By position**, for a table with one numeric axis when some of our values are not among the paper's (our
   CIFAR-scale decoder widths 32 / 64 / 128 / 256 against the paper's 128 ... 1024): our i-th smallest value <->
   the paper's i-th smallest, provided we have no more points than the paper. Only the ordering is compared then:
   no paper Δ and no verdict come from a position match.

Rows with no counterpart (Table 1d's PCA and dVAE targets) stay unmatched. The ordering of the matched points is
compared by Spearman's rank correlation (``stats.spearman``), per metric, over the points where both numbers exist
(ties get average ranks), and only over ``MIN_ORDERED`` (3) or more points: over 2, rho is +1 or -1 by
construction.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from mae_lab.study.stats import spearman

MIN_ORDERED = 3  # matched points an ordering needs (over 2, Spearman's rho is +-1 by construction)


@dataclass(frozen=True)
class PaperRow:
    setting: str
    values: tuple[Any, ...] | None  # our values of the table's axes; None when mae-lab has no counterpart
    ft: float | None
    lin: float | None
    default: bool = False


@dataclass(frozen=True)
class PaperTable:
    key: str
    title: str
    axes: tuple[str, ...]
    rows: tuple[PaperRow, ...]
    notes: tuple[str, ...] = ()


@dataclass
class Comparison:
    """How one study lines up with its paper table: ``matches[i]`` is the paper row of our row i (or None)."""

    table: PaperTable
    rule: str  # "value" | "position" | "none"
    matches: list[PaperRow | None]  # for the ordering: by value, or by position
    agreement: dict[str, tuple[float | None, int]] = field(default_factory=dict)  # metric -> (rho, points)
    reason: str = ""  # why nothing could be compared
    by_value: list[PaperRow | None] = field(default_factory=list)  # the value matches: the only ones with a paper Δ

    @property
    def unmatched(self) -> list[str]:
        used = {id(m) for m in self.matches if m is not None}
        return [r.setting for r in self.table.rows if id(r) not in used]

    def rule_text(self) -> str:
        if self.rule == "value":
            return "paper rows matched to ours by equal axis values"
        if self.rule == "position":
            return ("paper rows matched to ours by position (our i-th smallest value <-> the paper's i-th smallest): "
                    "the scales differ, only the ordering is compared; paper Δ and verdicts only where the values "
                    "are equal")
        return self.reason


@functools.lru_cache(maxsize=1)
def tables() -> dict[str, PaperTable]:
    """Every stored paper table by key ("1a" ... "1f", "fig5")."""
    raw = json.loads(resources.files("mae_lab.report").joinpath("paper_results.json").read_text(encoding="utf-8"))
    out = {}
    for key, t in raw["tables"].items():
        rows = tuple(PaperRow(r["setting"], None if r.get("values") is None else tuple(r["values"]), r.get("ft"),
                              r.get("lin"), bool(r.get("default", False))) for r in t["rows"])
        out[key] = PaperTable(key, t["title"], tuple(t["axes"]), rows, tuple(t.get("notes", ())))
    return out


def source() -> str:
    raw = resources.files("mae_lab.report").joinpath("paper_results.json").read_text(encoding="utf-8")
    return json.loads(raw)["source"]


def get_table(key: str | None) -> PaperTable | None:
    return tables().get(key) if key else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def match_rows(table: PaperTable, ours: Sequence[tuple[Any, ...]]
               ) -> tuple[str, list[PaperRow | None], list[PaperRow | None], str]:
    """(rule, paper row per our row for the ordering, paper row per our row by value, reason) for our rows' values
    of ``table.axes`` (see the module docstring)."""
    if len(set(map(repr, ours))) != len(ours):
        return "none", [None] * len(ours), [None] * len(ours), (
            f"not compared: the study varies axes other than {', '.join(table.axes)}, so several rows share one "
            "paper setting")
    valued = [(r, r.values) for r in table.rows if r.values is not None]  # (paper row, its values of the axes)
    by_value = [next((r for r, vals in valued if all(map(_same, vals, v))), None) for v in ours]
    rule, matches = "value", by_value
    numeric = len(table.axes) == 1 and all(_is_number(v[0]) for v in ours)
    if numeric and any(m is None for m in by_value) and len(ours) <= len(valued):
        rule = "position"
        paper_sorted = [r for r, _ in sorted(valued, key=lambda rv: rv[1][0])]
        order = sorted(range(len(ours)), key=lambda i: ours[i][0])
        matches = [None] * len(ours)
        for pos, i in enumerate(order):
            matches[i] = paper_sorted[pos]
    if all(m is None for m in matches):
        return "none", matches, by_value, f"not compared: none of the study's settings of {', '.join(table.axes)} " \
                                          f"is in {table.title}"
    return rule, matches, by_value, ""


def compare(table: PaperTable, ours: Sequence[tuple[Any, ...]], linear: Sequence[float | None],
            finetune: Sequence[float | None]) -> Comparison:
    """Match our rows (their values of ``table.axes`` and metric means) to the table; rank-correlate per metric."""
    rule, matches, by_value, reason = match_rows(table, ours)
    comp = Comparison(table, rule, matches, reason=reason, by_value=by_value)
    for metric, mine, attr in (("linear", linear, "lin"), ("finetune", finetune, "ft")):
        pairs = [(m, getattr(p, attr)) for m, p in zip(mine, matches)
                 if p is not None and m is not None and getattr(p, attr) is not None]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= MIN_ORDERED else None
        comp.agreement[metric] = (rho, len(pairs))
    return comp


def paper_delta(row: PaperRow | None, default: PaperRow | None, metric: str) -> float | None:
    """The paper's (row - default) for ``metric`` ("linear" or "finetune"): the direction a verdict checks; None
    when either row or its number is missing."""
    attr = "lin" if metric == "linear" else "ft"
    if row is None or default is None or getattr(row, attr) is None or getattr(default, attr) is None:
        return None
    return round(getattr(row, attr) - getattr(default, attr), 6)
