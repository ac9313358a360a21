"""Database -> the report model: one row per study point, mean +- std and n over seeds, the difference to the
study's default with a Welch 95% interval, and the paper's numbers beside ours with a rank-correlation verdict.

Accuracies are top-1 in percent and differences in percentage points (row minus default). A difference whose
interval contains 0 is marked ``≈``: within seed noise. With one seed on either side there is no interval ("n=1").
``summarize`` builds a StudyReport; ``report_format`` renders it (rich table, Markdown, LaTeX, CSV, JSON) and
``report_site`` writes files, plots and the per-study pages. A searched study (``mae-lab search``) also carries its
Optuna side (``report_search``).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from mae_lab import db
from mae_lab.expand import resolve
from mae_lab.paper import Comparison, PaperRow, compare, get_table
from mae_lab.report_search import SearchReport, search_report
from mae_lab.spec import StudyError, get_dotted, parse_study
from mae_lab.stats import Interval, welch_interval

NOISE_MARK = "≈"


LEGEND = (f"{NOISE_MARK}: the 95% Welch interval of the difference to the default contains 0 (within seed noise); "
          "n=1: one seed, no interval")


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
    trial_ids: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    linear: Stat = Stat(())  # top-1 %
    finetune: Stat = Stat(())  # top-1 %
    pretrain_s: Stat = Stat(())  # a shared pretraining counts with the figures of the trial that ran it
    images_per_s: Stat = Stat(())  # likewise
    peak_mem_mib: Stat = Stat(())  # likewise
    gflops: float | None = None
    is_default: bool = False
    linear_diff: Interval | None = None  # to the default row
    finetune_diff: Interval | None = None
    paper: PaperRow | None = None

    @property
    def speed(self) -> float | None:
        return self.images_per_s.mean


@dataclass
class StudyReport:
    name: str
    description: str
    paper: str | None
    axes: list[str]
    rows: list[Row]
    comparison: Comparison | None = None
    search: SearchReport | None = None  # for a searched study

    def default_row(self) -> Row | None:
        return next((r for r in self.rows if r.is_default), None)

    def relative_speed(self, row: Row) -> float | None:
        """Pretraining throughput relative to the study's default point (>1 is faster)."""
        base = self.default_row()
        if base is None or not base.speed or not row.speed:
            return None
        return row.speed / base.speed


def _base_values(spec_text: str, axes: list[str]) -> dict[str, Any] | None:
    """The study's default value of every axis (from its base settings and model preset)."""
    try:
        study = parse_study(spec_text, "<recorded study>")
        base = resolve(study, {}, study.study.seeds[0])
    except (StudyError, ValueError):
        return None
    try:
        return {k: get_dotted(base, k) for k in axes}
    except (AttributeError, KeyError):
        return None


def _add(stat: Stat, value: float | None, scale: float = 1.0) -> Stat:
    if value is None or math.isnan(value):
        return stat
    return Stat(stat.values + (scale * value,))


def summarize(engine: Engine, name: str) -> StudyReport:
    """Group a study's active trials by point; keep done trials' results; compare to the default and the paper."""
    study = db.get_study(engine, name)
    if study is None:
        raise KeyError(f"no study named {name!r} in the database")
    rows: dict[str, Row] = {}
    axes: list[str] = []
    trials = db.study_trials(engine, study.id)
    reused = {t.pretrain_hash for t, r in trials if t.status == "done" and r is not None and r.pretrain_reused}
    ran = db.pretraining_results(engine, reused) if reused else {}  # where shared pretrainings were timed
    for trial, result in trials:
        point = json.loads(trial.axes_json)
        for k in point:
            if k not in axes:
                axes.append(k)
        key = json.dumps(point, sort_keys=True)
        row = rows.setdefault(key, Row(label=trial.label, axes=point, spec=json.loads(trial.spec_json)))
        row.trials.append(trial.hash)
        row.trial_ids.append(trial.id)
        row.seeds.append(trial.seed)
        row.status[trial.status] = row.status.get(trial.status, 0) + 1
        if trial.status == "done" and result is not None:
            row.linear = _add(row.linear, result.linear_top1, 100.0)
            row.finetune = _add(row.finetune, result.finetune_top1, 100.0)
            timed = ran.get(trial.pretrain_hash) if result.pretrain_reused else result
            if timed is not None:
                row.pretrain_s = _add(row.pretrain_s, timed.pretrain_wall_s)
                if timed.pretrain_images_per_s:
                    row.images_per_s = _add(row.images_per_s, timed.pretrain_images_per_s)
                row.peak_mem_mib = _add(row.peak_mem_mib, timed.pretrain_peak_mem_mib)
            row.gflops = result.encoder_gflops
    out = StudyReport(study.name, study.description, study.paper, axes, list(rows.values()))
    base = _base_values(study.spec_text, axes)
    for row in out.rows:
        row.is_default = base is not None and all(row.axes.get(k, base[k]) == base[k] for k in axes)
    _differences(out)
    _paper(out)
    out.search = _search(engine, study)
    return out


def _search(engine: Engine, study: db.StudyRow) -> SearchReport | None:
    """The Optuna side of a searched study, or None (not a search, or no Optuna study in the database)."""
    try:
        parsed = parse_study(study.spec_text, "<recorded study>")
    except StudyError:
        return None
    if parsed.search is None:
        return None
    return search_report(engine, study.name, list(parsed.search.objectives))


def _differences(report: StudyReport) -> None:
    base = report.default_row()
    if base is None:
        return
    for row in report.rows:
        if row is base:
            continue
        for attr in ("linear", "finetune"):
            mine, ref = getattr(row, attr), getattr(base, attr)
            if mine.n and ref.n:
                setattr(row, f"{attr}_diff", welch_interval(mine.values, ref.values))


def _paper(report: StudyReport) -> None:
    table = get_table(report.paper)
    if table is None:
        return
    if not set(table.axes) & set(report.axes):
        report.comparison = Comparison(table, "none", [None] * len(report.rows),
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
    for row, match in zip(report.rows, comp.matches):
        row.paper = match


def has_finetune(report: StudyReport) -> bool:
    """Whether any point has a fine-tuning result (tables leave the fine-tune columns out otherwise)."""
    return any(r.finetune.mean is not None for r in report.rows)


def has_memory(report: StudyReport) -> bool:
    """Whether any point has a recorded peak memory (databases before schema 2 have none)."""
    return any(r.peak_mem_mib.mean is not None for r in report.rows)


def verdicts(report: StudyReport) -> list[str]:
    """How many differences are within seed noise; then, per metric, whether our ordering agrees with the
    paper's, the matching rule and the paper's notes."""
    lines = []
    for attr, name in (("linear", "linear"), ("finetune", "fine-tune")):
        diffs = [getattr(r, f"{attr}_diff") for r in report.rows if getattr(r, f"{attr}_diff") is not None]
        with_ci = [d for d in diffs if d.low is not None]
        if diffs:
            lines.append(f"{name}: {sum(bool(d.within_noise) for d in with_ci)} of {len(with_ci)} differences to "
                         f"the default are within seed noise" + (f" ({len(diffs) - len(with_ci)} with n=1, no "
                                                                  "interval)" if len(with_ci) < len(diffs) else ""))
    comp = report.comparison
    if comp is None:
        return lines
    if comp.rule == "none":
        return lines + [f"{comp.table.title}: {comp.reason}"]
    for metric, (rho, n) in comp.agreement.items():
        name = "linear" if metric == "linear" else "fine-tune"
        if metric == "finetune" and not has_finetune(report):
            continue
        if n < 2:
            lines.append(f"{comp.table.title}, {name}: fewer than 2 matched points, ordering not compared")
        elif rho is None:
            lines.append(f"{comp.table.title}, {name}: no ordering to compare (ties over {n} points)")
        else:
            word = "agrees with" if rho > 0.5 else ("is opposite to" if rho < -0.5 else "does not match")
            attr, short = ("linear", "lin") if metric == "linear" else ("finetune", "ft")
            pairs = [(r, p) for r, p in zip(report.rows, comp.matches) if p is not None
                     and getattr(r, attr).mean is not None and getattr(p, short) is not None]
            top_ours = max(getattr(r, attr).mean for r, _ in pairs)
            top_paper = max(getattr(p, short) for _, p in pairs)
            ours = " = ".join(r.label for r, _ in pairs if getattr(r, attr).mean == top_ours)
            theirs = " = ".join(p.setting for _, p in pairs if getattr(p, short) == top_paper)
            lines.append(f"{comp.table.title}, {name}: our ordering {word} the paper's "
                         f"(Spearman rho = {rho:+.2f} over {n} points); best here {ours}, in the paper {theirs}")
    lines.append(f"matching: {comp.rule_text()}")
    if comp.unmatched:
        lines.append(f"paper settings without a counterpart here: {', '.join(comp.unmatched)}")
    lines += [f"paper: {note}" for note in comp.table.notes]
    return lines


def title(report: StudyReport) -> str:
    table = get_table(report.paper)
    if table is not None:
        return f"{report.name} — paper {table.title}"
    return report.name + (f" — paper {report.paper}" if report.paper else "")


def headline(report: StudyReport) -> tuple[str, str, str]:
    """(best point by linear top-1, our linear ordering against the paper's, differences within seed noise)."""
    done = [r for r in report.rows if r.linear.mean is not None]
    best = max(done, key=lambda r: r.linear.mean, default=None)
    best_text = "-" if best is None else f"{best.label} ({best.linear.mean:.1f})"
    rho, n = (None, 0) if report.comparison is None else report.comparison.agreement.get("linear", (None, 0))
    if rho is None:
        order = "-"
    else:
        word = "agrees" if rho > 0.5 else ("opposite" if rho < -0.5 else "does not match")
        order = f"{word} (ρ = {rho:+.2f}, {n} points)"
    with_ci = [r.linear_diff for r in report.rows if r.linear_diff is not None and r.linear_diff.low is not None]
    noise = f"{sum(bool(d.within_noise) for d in with_ci)} of {len(with_ci)}" if with_ci else "-"
    return best_text, order, noise


def study_names(engine: Engine, name: str | None) -> list[str]:
    try:
        names = [name] if name else [s.name for s, _ in db.list_studies(engine)]
    except OperationalError:  # a file that is not (yet) a mae-lab database
        raise ValueError(f"database {db.safe_url(str(engine.url))} has no mae-lab tables") from None
    if not names:
        raise ValueError("the database holds no study yet: run one with 'mae-lab run STUDY.toml'")
    return names
