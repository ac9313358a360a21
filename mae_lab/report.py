"""Database -> paper-style tables: one row per study point, mean +- std and n over seeds."""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine

from mae_lab import db
from mae_lab.spec import StudyError, get_dotted, parse_study


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
    trials: list[str] = field(default_factory=list)  # hashes
    status: dict[str, int] = field(default_factory=dict)
    linear: Stat = Stat(())
    finetune: Stat = Stat(())
    pretrain_s: Stat = Stat(())
    images_per_s: Stat = Stat(())
    gflops: float | None = None
    is_default: bool = False

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
    from mae_lab.expand import resolve  # resolving presets needs the model module

    try:
        study = parse_study(spec_text, "<recorded study>")
        base = resolve(study, {}, study.study.seeds[0])
    except (StudyError, ValueError):
        return None
    try:
        return {k: get_dotted(base, k) for k in axes}
    except (AttributeError, KeyError):
        return None


def summarize(engine: Engine, name: str) -> StudyReport:
    """Group a study's active trials by point; keep done trials' results."""
    study = db.get_study(engine, name)
    if study is None:
        raise KeyError(f"no study named {name!r} in the database")
    rows: dict[str, Row] = {}
    axes: list[str] = []
    for trial, result in db.study_trials(engine, study.id):
        point = json.loads(trial.axes_json)
        for k in point:
            if k not in axes:
                axes.append(k)
        key = json.dumps(point, sort_keys=True)
        row = rows.setdefault(key, Row(label=trial.label, axes=point))
        row.trials.append(trial.hash)
        row.status[trial.status] = row.status.get(trial.status, 0) + 1
        if trial.status == "done" and result is not None:
            for attr, value in (("linear", result.linear_top1), ("finetune", result.finetune_top1),
                                ("pretrain_s", result.pretrain_wall_s),
                                ("images_per_s", result.pretrain_images_per_s)):
                if value is not None and not math.isnan(value):
                    setattr(row, attr, Stat(getattr(row, attr).values + (value,)))
            row.gflops = result.encoder_gflops
    out = StudyReport(study.name, study.description, study.paper, axes, list(rows.values()))
    base = _base_values(study.spec_text, axes)
    for row in out.rows:
        row.is_default = base is not None and all(row.axes.get(k, base[k]) == base[k] for k in axes)
    return out


def fmt_pct(s: Stat) -> str:
    if s.mean is None:
        return "-"
    return f"{100 * s.mean:.1f} ± {100 * s.std:.1f} (n={s.n})"


def render(report: StudyReport, console: Console) -> None:
    """Print the paper-style table of one study."""
    title = f"{report.name}" + (f" — paper Table {report.paper}" if report.paper else "")
    table = Table(title=title, caption=report.description or None, show_lines=False)
    axis_names = [a.split(".")[-1] for a in report.axes] or ["point"]
    for a in axis_names:
        table.add_column(a)
    for col in ("linear top-1 %", "fine-tune top-1 %", "pretrain s", "speed vs default", "trials"):
        table.add_column(col, justify="right")
    best_lin = max((r.linear.mean for r in report.rows if r.linear.mean is not None), default=None)
    best_ft = max((r.finetune.mean for r in report.rows if r.finetune.mean is not None), default=None)
    for r in report.rows:
        cells = [str(r.axes.get(a, "default")) for a in report.axes] or ["default"]
        if r.is_default:
            cells[0] = f"[bold]{cells[0]}[/bold] (default)"
        lin, ft = fmt_pct(r.linear), fmt_pct(r.finetune)
        if best_lin is not None and r.linear.mean == best_lin:
            lin = f"[green]{lin} ★[/green]"
        if best_ft is not None and r.finetune.mean == best_ft:
            ft = f"[green]{ft} ★[/green]"
        pre = "-" if r.pretrain_s.mean is None else f"{r.pretrain_s.mean:.0f}"
        rel = report.relative_speed(r)
        status = ", ".join(f"{v} {k}" for k, v in sorted(r.status.items()))
        table.add_row(*cells, lin, ft, pre, "-" if rel is None else f"{rel:.2f}x", status)
    console.print(table)
