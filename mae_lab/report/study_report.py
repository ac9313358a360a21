"""Trial records -> the report model: one row per study point, mean +- std and n over seeds, the difference to the
study's default with its paired 95% interval over shared seeds and the unpaired (Welch) one beside it, verdicts
against the paper's direction, and the paper's numbers beside ours with a rank-correlation check.

Accuracies are top-1 in percent on the validation split unless a column says "test"; differences are in
percentage points (row minus default). Seed s gives every arm the same init, data order and masks, so the
difference of each point is taken per seed against the default's same seed (paired); a verdict uses the paired
interval and says so, or Welch's when fewer than 2 seeds are shared. A difference whose interval contains 0 is
marked ``≈``. ``summarize_records`` builds a StudyReport from ``trial_records`` (from the database or a committed
trials.csv); ``report_format`` renders it and ``report_site`` writes files, plots and the per-study pages. A searched
study (``mae-lab search``) also carries its Optuna side (``report_search``).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from mae_lab.errors import BadInput
from mae_lab.report.paper import Comparison, PaperRow, compare, get_table, paper_delta
from mae_lab.report.search_view import SearchReport, search_report
from mae_lab.store.engine import safe_url
from mae_lab.store.reads import get_study, list_studies
from mae_lab.store.records import StudyRecords, from_db
from mae_lab.store.tables import StudyRow
from mae_lab.study.adaptive import (
    Decision,
    comparison_p,
    decision_level,
    is_decided,
    point_decisions,
    rule_text,
    to_points,
)
from mae_lab.study.expand import resolve_settings
from mae_lab.study.spec import Study, StudyError, get_dotted, parse_study
from mae_lab.study.stats import Interval, by_seed, holm, paired_interval, verdict, verdict_text, welch_interval
from mae_lab.study.tables import ALPHA, SeedPlan

NOISE_MARK = "≈"
METRICS = (("linear", "linear"), ("finetune", "fine-tune"))  # (attribute, name)


def legend(report: StudyReport) -> str:
    """The table's legend, with the level of this study's intervals and the rule that sets it."""
    return (f"Δ: row minus default in points with its interval at {rule_text(report.plan, report.alpha)}, paired over "
            f"the seeds both share (Welch's unpaired interval when fewer than 2 are shared; the Welch column shows it "
            f"for every point); Holm: detected after Holm's step-down over the study's points at alpha "
            f"{report.alpha:g}; {NOISE_MARK}: the interval contains 0; n=1: one seed, no interval")


@dataclass(frozen=True)
class Stat:
    """Mean, sample std and count of one metric over seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else (0.0 if self.n == 1 else None)


@dataclass
class Row:
    label: str
    axes: dict[str, Any]
    spec: dict[str, Any] = field(default_factory=dict)  # the resolved spec of the point's first trial
    trials: list[str] = field(default_factory=list)  # hashes
    seeds: list[int] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    linear: Stat = Stat(())  # top-1 %, validation split
    finetune: Stat = Stat(())  # top-1 %, validation split
    linear_test: Stat = Stat(())  # top-1 %, test split (when the dataset has one)
    finetune_test: Stat = Stat(())
    by_seed: dict[str, dict[int, float]] = field(default_factory=lambda: {"linear": {}, "finetune": {}})
    pretrain_s: Stat = Stat(())  # a shared pretraining counts with the figures of the trial that ran it
    images_per_s: Stat = Stat(())  # likewise
    peak_mem_mib: Stat = Stat(())  # likewise
    pretrain_tflops: Stat = Stat(())  # encoder training compute: 3 x forward GFLOPs x images seen / 1000
    losses: list[tuple[int, list[float]]] = field(default_factory=list)  # (seed, pretraining loss per epoch)
    gflops: float | None = None
    is_default: bool = False
    linear_diff: Interval | None = None  # to the default row: the interval the verdict uses (paired if it can)
    finetune_diff: Interval | None = None
    linear_welch: Interval | None = None  # the unpaired interval, beside it
    finetune_welch: Interval | None = None
    verdict: dict[str, str] = field(default_factory=dict)  # metric -> verdict_text
    p: dict[str, float | None] = field(default_factory=dict)  # metric -> adaptive.comparison_p
    holm: dict[str, bool | None] = field(default_factory=dict)  # metric -> detected after Holm over the points
    decisions: list[Decision] = field(default_factory=list)  # adaptive seeds: per metric of the plan
    decided: bool | None = None  # None: the study's seeds are a fixed list
    paper: PaperRow | None = None

    @property
    def speed(self) -> float | None:
        return self.images_per_s.mean

    @property
    def n(self) -> int:
        """Seeds with a validation result."""
        return max(self.linear.n, self.finetune.n)


@dataclass
class StudyReport:
    name: str
    description: str
    paper: str | None
    axes: list[str]
    rows: list[Row]
    comparison: Comparison | None = None
    search: SearchReport | None = None  # for a searched study
    plan: SeedPlan | None = None  # adaptive seeds
    alpha: float = ALPHA  # [study] alpha: every decision's error rate

    @property
    def level(self) -> float:
        """The level of every interval of this report (``adaptive.decision_level``)."""
        return decision_level(self.plan, self.alpha)

    def default_row(self) -> Row | None:
        return next((r for r in self.rows if r.is_default), None)

    def relative_speed(self, row: Row) -> float | None:
        """Pretraining throughput relative to the study's default point (>1 is faster)."""
        base = self.default_row()
        if base is None or not base.speed or not row.speed:
            return None
        return row.speed / base.speed


def _parse(toml: str) -> Study | None:
    try:
        return parse_study(toml, "<recorded study>")
    except StudyError:
        return None


def _base_values(study: Study | None, axes: list[str]) -> dict[str, Any] | None:
    """The study's default value of every axis, from its recorded text and model preset alone (no file is read: the
    init file may be gone, or on another machine)."""
    if study is None:
        return None
    try:
        base = resolve_settings(study, {}, study.study.seeds[0])
        return {k: get_dotted(base, k) for k in axes}
    except (StudyError, ValueError, AttributeError, KeyError):
        return None


def _add(stat: Stat, value: float | None, scale: float = 1.0) -> Stat:
    if value is None or math.isnan(value):
        return stat
    return Stat(stat.values + (scale * value,))


def summarize(engine: Engine, name: str) -> StudyReport:
    """The report of one study in the database (BadInput for an unknown study), with its Optuna side."""
    out = summarize_records(from_db(engine, name))
    study = get_study(engine, name)
    out.search = _search(engine, study) if study is not None else None  # (from_db refused an unknown study)
    return out


def summarize_records(records: StudyRecords) -> StudyReport:
    """Group a study's trial records by point; keep done trials' results; compare to the default and the paper."""
    rows: dict[str, Row] = {}
    axes: list[str] = []
    for t in records.trials:
        point = t["axes"]
        for k in point:
            if k not in axes:
                axes.append(k)
        key = repr(sorted(point.items()))
        row = rows.setdefault(key, Row(label=t["label"], axes=point, spec=t["spec"]))
        row.trials.append(t["hash"])
        row.seeds.append(t["seed"])
        row.status[t["status"]] = row.status.get(t["status"], 0) + 1
        if t["status"] != "done":
            continue
        for attr, col in (("linear", "linear_val_top1"), ("finetune", "finetune_val_top1"),
                          ("linear_test", "linear_test_top1"), ("finetune_test", "finetune_test_top1")):
            setattr(row, attr, _add(getattr(row, attr), None if t[col] is None else to_points(t[col])))
            if attr in row.by_seed and t[col] is not None:
                row.by_seed[attr][t["seed"]] = to_points(t[col])
        row.pretrain_s = _add(row.pretrain_s, t["timed_pretrain_wall_s"])
        if t["timed_pretrain_images_per_s"]:
            row.images_per_s = _add(row.images_per_s, t["timed_pretrain_images_per_s"])
            if t["encoder_gflops"] is not None and t["timed_pretrain_wall_s"] is not None:
                seen = t["timed_pretrain_images_per_s"] * t["timed_pretrain_wall_s"]
                row.pretrain_tflops = _add(row.pretrain_tflops, 3.0 * t["encoder_gflops"] * seen / 1000.0)
        row.peak_mem_mib = _add(row.peak_mem_mib, t["timed_pretrain_peak_mem_mib"])
        row.gflops = t["encoder_gflops"]
        if t["pretrain_losses"]:
            row.losses.append((t["seed"], list(t["pretrain_losses"])))
    study = _parse(records.toml)
    out = StudyReport(records.name, records.description, records.paper, axes, list(rows.values()),
                      plan=None if study is None else study.study.adaptive,
                      alpha=ALPHA if study is None else study.study.alpha)
    base = _base_values(study, axes)
    for row in out.rows:
        row.is_default = base is not None and all(row.axes.get(k, base[k]) == base[k] for k in axes)
    _differences(out)
    _paper(out)
    _verdicts(out)
    return out


def _search(engine: Engine, study: StudyRow) -> SearchReport | None:
    """The Optuna side of a searched study, or None (not a search, or no Optuna study in the database)."""
    try:
        parsed = parse_study(study.spec_text, "<recorded study>")
    except StudyError:
        return None
    if parsed.search is None:
        return None
    return search_report(engine, study.name, list(parsed.search.objectives))


def _differences(report: StudyReport) -> None:
    """Per point and metric, at the report's level: the paired interval over shared seeds (Welch's when fewer than 2
    are shared) and the Welch interval; for adaptive seeds, the decision of every metric of the plan (the same
    function and level the rounds used); the p-value and Holm's decision over the study's points."""
    base = report.default_row()
    if base is None:
        return
    level = report.level
    for row in report.rows:
        if row is base:
            continue
        for attr, _ in METRICS:
            mine, ref = getattr(row, attr), getattr(base, attr)
            if not (mine.n and ref.n):
                continue
            welch = welch_interval(mine.values, ref.values, level)
            _, a, b = by_seed(row.by_seed[attr], base.by_seed[attr])
            paired = paired_interval(a, b, level)
            row.p[attr] = comparison_p(report.plan, row.by_seed[attr], base.by_seed[attr])
            setattr(row, f"{attr}_welch", welch)
            setattr(row, f"{attr}_diff", paired if paired.low is not None else welch)
        if report.plan is not None:
            row.decisions = point_decisions(report.plan, row.by_seed, base.by_seed, report.alpha)
            row.decided = is_decided(row.decisions)
    for attr, _ in METRICS:  # the family: the study's points against its default, one metric
        others = [r for r in report.rows if r is not base and attr in r.p]
        for row, rejected in zip(others, holm([r.p[attr] for r in others], report.alpha)):
            row.holm[attr] = rejected


def _paper(report: StudyReport) -> None:
    table = get_table(report.paper)
    if table is None:
        return
    if not set(table.axes) & set(report.axes):
        report.comparison = Comparison(table, "none", [None] * len(report.rows), by_value=[None] * len(report.rows),
                                       reason=f"not compared: the study does not vary {', '.join(table.axes)}")
        return
    ours = []
    for row in report.rows:
        try:
            ours.append(tuple(get_dotted(row.spec, k) for k in table.axes))
        except (KeyError, TypeError):
            ours.append((row.label,))
    comp = compare(table, ours, [r.linear.mean for r in report.rows], [r.finetune.mean for r in report.rows])
    report.comparison = comp
    for row, match in zip(report.rows, comp.by_value):  # a position match gives ordering only: no Δ, no verdict
        row.paper = match


def _verdicts(report: StudyReport) -> None:
    """Each point's verdict per metric, against the paper's direction from our default's paper row."""
    base = report.default_row()
    for row in report.rows:
        for attr, _ in METRICS:
            d = getattr(row, f"{attr}_diff")
            if d is not None:
                row.verdict[attr] = verdict_text(d, paper_delta(row.paper, base.paper if base else None, attr),
                                                 rule_text(report.plan, report.alpha))


def verdict_counts(report: StudyReport, attr: str = "linear") -> dict[str, int]:
    """How many points got each verdict word for ``attr``."""
    counts: dict[str, int] = {}
    for row in report.rows:
        d = getattr(row, f"{attr}_diff")
        if d is not None:
            base = report.default_row()
            word = verdict(d, paper_delta(row.paper, base.paper if base else None, attr))
            counts[word] = counts.get(word, 0) + 1
    return counts


def has_finetune(report: StudyReport) -> bool:
    """Whether any point has a fine-tuning result (tables leave the fine-tune columns out otherwise)."""
    return any(r.finetune.mean is not None for r in report.rows)


def has_memory(report: StudyReport) -> bool:
    """Whether any point has a recorded peak memory (databases before schema 2 have none)."""
    return any(r.peak_mem_mib.mean is not None for r in report.rows)


def comparisons(report: StudyReport) -> Iterator[tuple[str, str, Row, Interval, float | None]]:
    """(metric attribute, metric name, row, its difference to the default, the paper's Δ) for every compared point,
    metric by metric in study order: what the verdict lines and the summary's table both list."""
    base = report.default_row()
    for attr, name in METRICS:
        for row in report.rows:
            d = getattr(row, f"{attr}_diff")
            if d is not None:
                yield attr, name, row, d, paper_delta(row.paper, base.paper if base else None, attr)


def title(report: StudyReport) -> str:
    table = get_table(report.paper)
    if table is not None:
        return f"{report.name} — paper {table.title}"
    return report.name + (f" — paper {report.paper}" if report.paper else "")


def headline(report: StudyReport) -> tuple[str, str, str]:
    """(best point by linear top-1 over every point, our linear ordering against the paper's, linear verdicts)."""
    done = [(r.linear.mean, r.label) for r in report.rows if r.linear.mean is not None]
    best = max(done, key=lambda d: d[0], default=None)  # the first of equal means, as before
    best_text = "-" if best is None else f"{best[1]} ({best[0]:.1f})"
    rho, n = (None, 0) if report.comparison is None else report.comparison.agreement.get("linear", (None, 0))
    if rho is None:
        order = "-"
    else:
        word = "agrees" if rho > 0.5 else ("opposite" if rho < -0.5 else "does not match")
        order = f"{word} (ρ = {rho:+.2f}, {n} points)"
    counts = verdict_counts(report, "linear")
    return best_text, order, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def study_names(engine: Engine, name: str | None) -> list[str]:
    try:
        names = [name] if name else [s.name for s, _ in list_studies(engine)]
    except OperationalError:  # a file that is not (yet) a mae-lab database
        raise BadInput(f"database {safe_url(str(engine.url))} has no mae-lab tables") from None
    if not names:
        raise BadInput("the database holds no study yet: run one with 'mae-lab run STUDY.toml'")
    return names
