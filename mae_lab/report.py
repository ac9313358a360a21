"""Database -> paper-style reports: one row per study point, mean +- std and n over seeds, the difference to the
study's default with a Welch 95% interval, and the paper's numbers beside ours with a rank-correlation verdict.

Accuracies are top-1 in percent and differences in percentage points (row minus default). A difference whose
interval contains 0 is marked ``≈``: within seed noise. With one seed on either side there is no interval ("n=1").
Formats: a rich table for the terminal, Markdown, booktabs LaTeX, CSV and JSON (``render_text``); ``write_site``
writes one Markdown page per study with its plots. A searched study (``mae-lab search``) also gets its Optuna side:
the best trials (the Pareto front for two objectives) and the parameter importances (table, Markdown, JSON).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine

from mae_lab import db
from mae_lab.atomic import write_atomic
from mae_lab.paper import Comparison, PaperRow, compare, get_table
from mae_lab.spec import StudyError, get_dotted, parse_study
from mae_lab.stats import Interval, welch_interval

FORMATS = ("table", "md", "csv", "latex", "json")
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
    search: Any = None  # mae_lab.search.SearchReport for a searched study

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


def _search(engine: Engine, study: db.StudyRow):
    """The Optuna side of a searched study, or None (not a search, or no Optuna study in the database)."""
    try:
        parsed = parse_study(study.spec_text, "<recorded study>")
    except StudyError:
        return None
    if parsed.search is None:
        return None
    from mae_lab.search import search_report

    return search_report(engine, study.name, list(parsed.search.objectives))


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items())


def search_tables(rep) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of a SearchReport: best trials or Pareto front, then parameter importances."""
    objs = rep.objectives
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(rep.states.items()))
    what = "Pareto front" if rep.pareto else "best trials"
    title_ = f"search: {what} ({states}" + (f"; {rep.priors} prior observations" if rep.priors else "") + ")"
    best = [[f"#{b['number']}" + (" (prior)" if b["prior"] else ""),
             *(f"{100 * b['values'][o]:.1f}" for o in objs), _params_text(b["params"])] for b in rep.best]
    tables = [(title_, ["trial", *(f"{o} top-1 %" for o in objs), "params"], best)]
    if rep.importances:
        params = list(next(iter(rep.importances.values())))
        imp = [[k, *(f"{rep.importances[o].get(k, 0.0):.3f}" for o in objs)] for k in params]
        tables.append(("search: parameter importance (fANOVA, normalized)", ["param", *objs], imp))
    return tables


def _render_search(rep, console: Console) -> None:
    for name, cols, rows in search_tables(rep):
        table = Table(title=name, title_justify="left")
        for i, c in enumerate(cols):
            table.add_column(c, justify="left" if i == 0 or c == "params" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    if rep.note:
        console.print(rep.note, markup=False, highlight=False)


def _search_markdown(rep) -> list[str]:
    lines: list[str] = []
    for name, cols, rows in search_tables(rep):
        lines += [f"**{name}**", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join(":---" if i == 0 or c == "params" else "---:" for i, c in enumerate(cols)) + "|"]
        lines += ["| " + " | ".join(c.replace("|", r"\|") for c in r) + " |" for r in rows]
        lines.append("")
    if rep.note:
        lines += [rep.note, ""]
    return lines


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


# --- cells ----------------------------------------------------------------------------------------------------

def fmt_stat(s: Stat) -> str:
    if s.mean is None:
        return "-"
    return f"{s.mean:.1f} ± {s.std:.1f} (n={s.n})"


def fmt_diff(row: Row, attr: str) -> str:
    d: Interval | None = getattr(row, f"{attr}_diff")
    if row.is_default:
        return "default"
    if d is None:
        return "-"
    if d.low is None:
        return f"{d.delta:+.1f} (n=1)"
    mark = f" {NOISE_MARK}" if d.within_noise else ""
    return f"{d.delta:+.1f} [{d.low:+.1f}, {d.high:+.1f}]{mark}"


def _num(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def axis_cells(report: StudyReport, row: Row) -> list[str]:
    return [str(row.axes.get(a, "default")) for a in report.axes] or ["default"]


def axis_names(report: StudyReport) -> list[str]:
    return [a.split(".")[-1] for a in report.axes] or ["point"]


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


def has_finetune(report: StudyReport) -> bool:
    """Whether any point has a fine-tuning result (tables leave the fine-tune columns out otherwise)."""
    return any(r.finetune.mean is not None for r in report.rows)


def has_memory(report: StudyReport) -> bool:
    """Whether any point has a recorded peak memory (databases before schema 2 have none)."""
    return any(r.peak_mem_mib.mean is not None for r in report.rows)


def _columns(report: StudyReport) -> list[str]:
    cols = axis_names(report) + ["linear %", "Δ linear [95% CI]"]
    cols += ["fine-tune %", "Δ fine-tune [95% CI]"] if has_finetune(report) else []
    if report.comparison is not None and report.comparison.rule != "none":
        cols += ["paper setting", "paper lin", "paper ft"]
    return cols + ["pretrain s", "speed vs default", "encoder GFLOPs"] + (["peak MiB"] if has_memory(report) else []) \
        + ["trials"]


def _cells(report: StudyReport, row: Row) -> list[str]:
    cells = axis_cells(report, row) + [fmt_stat(row.linear), fmt_diff(row, "linear")]
    cells += [fmt_stat(row.finetune), fmt_diff(row, "finetune")] if has_finetune(report) else []
    if report.comparison is not None and report.comparison.rule != "none":
        p = row.paper
        cells += ["-", "-", "-"] if p is None else [p.setting, _num(p.lin), _num(p.ft)]
    rel = report.relative_speed(row)
    cells += [_num(row.pretrain_s.mean, ".0f"), "-" if rel is None else f"{rel:.2f}x", _num(row.gflops, ".3g")]
    cells += [_num(row.peak_mem_mib.mean, ".0f")] if has_memory(report) else []
    cells += [", ".join(f"{v} {k}" for k, v in sorted(row.status.items()))]
    return cells


def title(report: StudyReport) -> str:
    table = get_table(report.paper)
    if table is not None:
        return f"{report.name} — paper {table.title}"
    return report.name + (f" — paper {report.paper}" if report.paper else "")


# --- formats --------------------------------------------------------------------------------------------------

# columns a narrow terminal drops first (the first listed goes first)
OPTIONAL_COLUMNS = ("peak MiB", "encoder GFLOPs", "pretrain s", "trials", "speed vs default", "paper setting", "paper ft",
                    "paper lin")


def _compact(cells: list[str], n_axes: int, n_metrics: int) -> list[str]:
    """Narrow-terminal cells: n moves to the header, a difference's interval goes on a second line."""
    out = list(cells)
    for i in range(n_axes, n_axes + n_metrics):  # alternately "mean ± std (n=k)" and "delta [low, high] mark"
        out[i] = out[i].split(" (n=")[0]
        delta, sep, rest = out[i].partition(" [")
        if sep:
            interval, _, mark = rest.partition("]")
            out[i] = f"{delta}{mark}\n[{interval}]"
    return out


def rich_table(report: StudyReport, width: int | None = None) -> Table:
    """The paper-style table for a terminal: default row bold, best mean per metric starred.

    Given the terminal ``width``, optional columns (OPTIONAL_COLUMNS, in that order) are left out until the rest
    fits; if it still does not, the cells get compact (n in the header, intervals on a second line) and may wrap.
    """
    n_axes = len(axis_names(report))
    best_lin = max((r.linear.mean for r in report.rows if r.linear.mean is not None), default=None)
    best_ft = max((r.finetune.mean for r in report.rows if r.finetune.mean is not None), default=None)
    cols = _columns(report)
    metrics = [(n_axes, "linear")] + ([(n_axes + 2, "finetune")] if has_finetune(report) else [])  # (column, attr)
    grid = []
    for r in report.rows:
        cells = _cells(report, r)
        if r.is_default:
            cells[0] += " (default)"
        if best_lin is not None and r.linear.mean == best_lin:
            cells[n_axes] += " ★"
        if best_ft is not None and r.finetune.mean == best_ft:
            cells[n_axes + 2] += " ★"
        grid.append(cells)

    def width_of(i: int, rows: list[list[str]], headers: list[str]) -> int:
        return max([len(w) for w in headers[i].split()] + [max(len(x) for x in g[i].split("\n")) for g in rows])

    def fits(keep: list[str], rows: list[list[str]], headers: list[str]) -> bool:
        need = sum(width_of(i, rows, headers) + 3 for i, c in enumerate(cols) if c in keep)
        return width is None or need + 1 <= width

    keep, headers, compact = list(cols), list(cols), False
    for c in OPTIONAL_COLUMNS:
        if fits(keep, grid, headers):
            break
        if c.startswith("paper") and not compact:  # rather compact cells than no paper columns
            compact = True
            grid = [_compact(g, n_axes, 2 * len(metrics)) for g in grid]
            for i, attr in metrics:
                ns = {getattr(r, attr).n for r in report.rows if getattr(r, attr).n}
                headers[i] += f" (n={ns.pop()})" if len(ns) == 1 else " (n varies)"
            if fits(keep, grid, headers):
                break
        if c in keep:
            keep.remove(c)
    table = Table(title=title(report), caption=report.description or None, show_lines=compact)
    for i, col in enumerate(cols):
        if col in keep:
            table.add_column(headers[i], justify="left" if i < n_axes or col == "paper setting" else "right",
                             width=width_of(i, grid, headers) if fits(keep, grid, headers) else None)
    for r, cells in zip(report.rows, grid):
        cells = [c.replace("[", r"\[") for c in cells]
        if r.is_default:
            cells[0] = f"[bold]{cells[0].removesuffix(' (default)')}[/bold] (default)"
        for i, _ in metrics:
            if cells[i].endswith(" ★"):
                cells[i] = f"[green]{cells[i]}[/green]"
        table.add_row(*(c for c, col in zip(cells, cols) if col in keep))
    return table


def render(report: StudyReport, console: Console) -> None:
    """Print the paper-style table of one study, its verdicts against the paper and the legend."""
    console.print(rich_table(report, console.width))
    for line in verdicts(report) + [LEGEND]:
        console.print(line, markup=False, highlight=False)
    if report.search is not None:
        _render_search(report.search, console)


def to_markdown(report: StudyReport, *, heading: str = "##") -> str:
    """A GitHub Markdown section: heading (none when ``heading`` is empty), table, verdicts, legend."""
    def esc(s: str) -> str:
        return s.replace("|", r"\|")

    cols = _columns(report)
    lines = [f"{heading} {esc(title(report))}", ""] if heading else []
    if report.description:
        lines += [report.description, ""]
    lines += ["| " + " | ".join(cols) + " |",
              "|" + "|".join(":---" if i < len(axis_names(report)) or c == "paper setting" else "---:"
                         for i, c in enumerate(cols)) + "|"]
    for r in report.rows:
        cells = [esc(c) for c in _cells(report, r)]
        if r.is_default:
            cells[0] = f"**{cells[0]}** (default)"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {esc(v)}" for v in verdicts(report)]
    lines += [f"- {LEGEND}", "- accuracies: top-1 %, mean ± sample std over seeds; differences in percentage points, "
              "row minus default", ""]
    if report.search is not None:
        lines += _search_markdown(report.search)
    return "\n".join(lines)


def _tex(s: str) -> str:
    out = []
    for ch in s:
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "Δ": r"$\Delta$",
                    "±": r"$\pm$", "≈": r"$\approx$", "—": "---", "ρ": r"$\rho$"}.get(ch, ch))
    return "".join(out)


def _tex_stat(s: Stat) -> str:
    return "--" if s.mean is None else f"${s.mean:.1f} \\pm {s.std:.1f}$ ({s.n})"


def _tex_diff(row: Row, attr: str) -> str:
    d: Interval | None = getattr(row, f"{attr}_diff")
    if row.is_default:
        return "default"
    if d is None:
        return "--"
    if d.low is None:
        return f"${d.delta:+.1f}$ (n=1)"
    mark = r" $\approx$" if d.within_noise else ""
    return f"${d.delta:+.1f}$ [${d.low:+.1f}$, ${d.high:+.1f}$]{mark}"


def to_latex(report: StudyReport) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): default row bold, paper columns when matched."""
    with_paper = report.comparison is not None and report.comparison.rule != "none"
    ft = has_finetune(report)
    cols = [_tex(a) for a in axis_names(report)] + ["linear", r"$\Delta$ linear [95\% CI]"]
    cols += ["fine-tune", r"$\Delta$ fine-tune [95\% CI]"] if ft else []
    if with_paper:
        cols += ["paper setting", "paper lin", "paper ft"]
    align = "l" * len(axis_names(report)) + ("rrrr" if ft else "rr") + ("lrr" if with_paper else "")
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(cols) + r" \\", r"\midrule"]
    for r in report.rows:
        cells = [_tex(c) for c in axis_cells(report, r)]
        if r.is_default:
            cells[0] = f"\\textbf{{{cells[0]}}}"
        cells += [_tex_stat(r.linear), _tex_diff(r, "linear")]
        cells += [_tex_stat(r.finetune), _tex_diff(r, "finetune")] if ft else []
        if with_paper:
            p = r.paper
            cells += ["--", "--", "--"] if p is None else [_tex(p.setting), _num(p.lin).replace("-", "--"),
                                                           _num(p.ft).replace("-", "--")]
        lines.append(" & ".join(cells) + r" \\")
    caption = (f"{report.description or report.name}. Top-1 \\% (mean $\\pm$ std over seeds, n in parentheses); "
               f"$\\Delta$: difference to the default (bold) in points with a 95\\% Welch interval, $\\approx$ when "
               f"it contains 0 (within seed noise).")
    if with_paper:
        caption += " " + " ".join(_tex(v) + "." for v in verdicts(report) if "Spearman" in v)
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}",
              f"\\label{{tab:{report.name.replace('_', '-')}}}", r"\end{table}", ""]
    return "\n".join(lines)


def _stat_dict(s: Stat) -> dict[str, Any]:
    return {"mean": s.mean, "std": s.std, "n": s.n, "values": list(s.values)}


def _diff_dict(d: Interval | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"delta": d.delta, "low": d.low, "high": d.high, "df": d.df, "level": d.level,
            "within_noise": d.within_noise, "note": d.note}


def to_dict(report: StudyReport) -> dict[str, Any]:
    comp = report.comparison
    return {
        "study": report.name, "description": report.description, "paper": report.paper, "axes": report.axes,
        "units": "top-1 %; differences in percentage points, row minus default; Welch 95% interval",
        "rows": [{
            "label": r.label, "axes": r.axes, "is_default": r.is_default, "status": r.status, "trials": r.trials,
            "seeds": r.seeds, "linear": _stat_dict(r.linear), "linear_diff": _diff_dict(r.linear_diff),
            "finetune": _stat_dict(r.finetune), "finetune_diff": _diff_dict(r.finetune_diff),
            "pretrain_s": r.pretrain_s.mean, "images_per_s": r.images_per_s.mean,
            "speed_vs_default": report.relative_speed(r), "encoder_gflops": r.gflops,
            "peak_mem_mib": r.peak_mem_mib.mean,
            "paper": None if r.paper is None else {"setting": r.paper.setting, "lin": r.paper.lin, "ft": r.paper.ft},
        } for r in report.rows],
        "paper_comparison": None if comp is None else {
            "table": comp.table.key, "title": comp.table.title, "rule": comp.rule, "rule_text": comp.rule_text(),
            "agreement": {m: {"spearman": rho, "points": n} for m, (rho, n) in comp.agreement.items()},
            "unmatched": comp.unmatched, "notes": list(comp.table.notes)},
        "search": None if report.search is None else dataclasses.asdict(report.search),
    }


CSV_COLUMNS = ("label", "is_default", "linear_mean", "linear_std", "linear_n", "linear_delta", "linear_ci_low",
               "linear_ci_high", "linear_within_noise", "finetune_mean", "finetune_std", "finetune_n",
               "finetune_delta", "finetune_ci_low", "finetune_ci_high", "finetune_within_noise", "paper_setting",
               "paper_lin", "paper_ft", "pretrain_s", "images_per_s", "speed_vs_default", "encoder_gflops",
               "peak_mem_mib", "done",
               "trials")


def to_csv(report: StudyReport) -> str:
    """One line per point: axis columns (dotted keys), then CSV_COLUMNS; empty cells for missing values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(report.axes) + list(CSV_COLUMNS))

    def v(x: Any) -> Any:
        return "" if x is None else x

    for r in report.rows:
        cells: list[Any] = [json.dumps(r.axes[a]) if isinstance(r.axes.get(a), bool) else v(r.axes.get(a))
                            for a in report.axes]
        cells += [r.label, r.is_default]
        for attr in ("linear", "finetune"):
            s, d = getattr(r, attr), getattr(r, f"{attr}_diff")
            cells += [v(s.mean), v(s.std), s.n]
            cells += [v(None if d is None else d.delta), v(None if d is None else d.low),
                      v(None if d is None else d.high), v(None if d is None else d.within_noise)]
        p = r.paper
        cells += [v(p and p.setting), v(p and p.lin), v(p and p.ft), v(r.pretrain_s.mean), v(r.images_per_s.mean),
                  v(report.relative_speed(r)), v(r.gflops), v(r.peak_mem_mib.mean), r.status.get("done", 0),
                  len(r.trials)]
        w.writerow(cells)
    return buf.getvalue()


def render_text(report: StudyReport, fmt: str, *, width: int = 200) -> str:
    """The report as text in one of FORMATS ("table" is the rich table without colour, ``width`` wide)."""
    if fmt == "md":
        return to_markdown(report)
    if fmt == "csv":
        return to_csv(report)
    if fmt == "latex":
        return to_latex(report)
    if fmt == "json":
        return json.dumps(to_dict(report), indent=2) + "\n"
    if fmt == "table":
        console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
        render(report, console)
        return console.file.getvalue()
    raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


# --- the command ----------------------------------------------------------------------------------------------

def study_names(engine: Engine, name: str | None) -> list[str]:
    from sqlalchemy.exc import OperationalError

    try:
        names = [name] if name else [s.name for s, _ in db.list_studies(engine)]
    except OperationalError:  # a file that is not (yet) a mae-lab database
        raise ValueError(f"database {db.safe_url(str(engine.url))} has no mae-lab tables") from None
    if not names:
        raise ValueError("the database holds no study yet: run one with 'mae-lab run STUDY.toml'")
    return names


def report_command(engine: Engine, name: str | None, *, fmt: str = "table", out: str | Path | None = None,
                   plots: str | Path | None = None, site: bool = False, console: Console | None = None
                   ) -> list[Path]:
    """What ``mae-lab report`` does: print or write one study (or every study), optionally with plots.

    ``site``: ``out`` is a folder that gets one Markdown page per study plus its plots (``write_site``).
    Otherwise ``out`` is one file holding every selected study in ``fmt`` (JSON: a list when several), and the
    table format prints to ``console`` when there is no ``out``. Returns the files written.
    Raises KeyError for an unknown study, ValueError for a bad format or an empty database.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    names = study_names(engine, name)
    if site:
        if out is None:
            raise ValueError("--all writes a folder of pages: give it with --out DIR (e.g. docs/results/)")
        return write_site(engine, out, names)
    reports = [summarize(engine, n) for n in names]
    written: list[Path] = []
    if plots is not None:
        from mae_lab.plots import study_plots

        for rep in reports:
            written += study_plots(engine, rep, Path(plots) / rep.name if len(reports) > 1 else Path(plots))
    if fmt == "json" and len(reports) > 1:
        text = json.dumps([to_dict(r) for r in reports], indent=2) + "\n"
    elif fmt == "csv" and len(reports) > 1:
        text = "".join(f"# {r.name}\n" + to_csv(r) for r in reports)
    else:
        text = "\n".join(render_text(r, fmt) for r in reports)
    if out is not None:
        written.insert(0, write_atomic(out, text))
    elif fmt == "table" and console is not None:
        for rep in reports:
            render(rep, console)
    elif console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    return written


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


def write_site(engine: Engine, folder: str | Path, names: list[str]) -> list[Path]:
    """One Markdown page per study (``<folder>/<study>.md``) with its tables and plots (``<folder>/<study>/``),
    plus ``<folder>/index.md`` linking them. Every file is written atomically."""
    from mae_lab.plots import study_plots
    from mae_lab.recon import ReconError, study_recon_png

    folder = Path(folder)
    written: list[Path] = []
    index = ["# mae-lab results", "",
             "| study | paper | points | trials done | best linear here | linear ordering vs the paper | "
             "within seed noise |", "|:---|:---|---:|---:|:---|:---|---:|"]
    for name in names:
        rep = summarize(engine, name)
        images = study_plots(engine, rep, folder / rep.name)
        try:
            recon = study_recon_png(engine, rep)
        except ReconError:
            recon = None
        if recon is not None:
            images.append(write_atomic(folder / rep.name / "recon.png", recon))
        page = [f"# {title(rep)}", "", to_markdown(rep, heading=""), "## Plots", ""]
        for img in images:
            page += [f"![{img.stem}]({rep.name}/{img.name})", ""]
        if not images:
            page += ["(no finished trials to plot yet)", ""]
        written.append(write_atomic(folder / f"{rep.name}.md", "\n".join(page)))
        written += images
        done = sum(r.status.get("done", 0) for r in rep.rows)
        index.append(f"| [{rep.name}]({rep.name}.md) | {rep.paper or '-'} | {len(rep.rows)} | "
                     f"{done}/{sum(len(r.trials) for r in rep.rows)} | {' | '.join(headline(rep))} |")
    written.append(write_atomic(folder / "index.md", "\n".join(index) + "\n"))
    return written
