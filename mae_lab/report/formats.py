"""A StudyReport as text: the rich table for a terminal, Markdown, booktabs LaTeX, CSV and JSON."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from mae_lab.errors import BadInput
from mae_lab.report.export import to_csv, to_dict
from mae_lab.report.search_view import render_search, search_markdown
from mae_lab.report.study_report import (
    NOISE_MARK,
    Row,
    Stat,
    StudyReport,
    has_finetune,
    has_memory,
    legend,
    title,
)
from mae_lab.report.verdict_lines import verdicts
from mae_lab.study.adaptive import rule_text
from mae_lab.study.stats import Interval

FORMATS = ("table", "md", "csv", "latex", "json")
UNITS = ("accuracies: top-1 %, mean ± sample std over seeds, on the validation split (val; what every choice and "
         "verdict uses) or the test split (test; reported, never chosen on); differences in percentage points, row "
         "minus default; pretrain TFLOPs: encoder training compute, 3 x forward GFLOPs per image x images seen "
         "(the decoder not counted)")


def fmt_stat(s: Stat) -> str:
    if s.mean is None:
        return "-"
    return f"{s.mean:.1f} ± {s.std:.1f} (n={s.n})"


def _diff(row: Row, attr: str, *, num: Callable[[float], str], none: str, noise: str, welch: str) -> str:
    """A row's difference from the default, its numbers written by `num` (plain text or LaTeX)."""
    d: Interval | None = getattr(row, f"{attr}_diff")
    if row.is_default:
        return "default"
    if d is None or d.delta is None:
        return none
    if d.low is None or d.high is None:
        return f"{num(d.delta)} ({d.note})"
    mark = noise if d.within_noise else ""
    kind = welch if d.kind == "welch" else ""  # fewer than 2 seeds shared with the default
    return f"{num(d.delta)} [{num(d.low)}, {num(d.high)}]{mark}{kind}"


def fmt_diff(row: Row, attr: str) -> str:
    return _diff(row, attr, num="{:+.1f}".format, none="-", noise=f" {NOISE_MARK}", welch=" Welch")


def fmt_welch(row: Row, attr: str) -> str:
    d: Interval | None = getattr(row, f"{attr}_welch")
    if row.is_default:
        return "default"
    if d is None or d.low is None:
        return "-"
    return f"[{d.low:+.1f}, {d.high:+.1f}]"


def fmt_holm(row: Row, attr: str) -> str:
    """Whether the point's difference is detected after Holm's step-down over the study's points."""
    if row.is_default:
        return "default"
    held = row.holm.get(attr)
    return "-" if held is None else "detected" if held else "not detected"


def has_test(report: StudyReport, attr: str) -> bool:
    """Whether any point has a test-split number for ``attr`` (a dataset with a test split)."""
    return any(getattr(r, f"{attr}_test").mean is not None for r in report.rows)


def _num(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def axis_cells(report: StudyReport, row: Row) -> list[str]:
    """A row's axis values; a float that needs more than 4 digits (a sampled value, e.g. 0.7195254015709299) is
    rounded to the fewest significant digits, at least 4, that still tell its column's values apart."""
    cells = []
    for a in report.axes:
        v = row.axes.get(a, "default")
        if isinstance(v, float):
            short = f"{v:.{_digits(tuple(r.axes[a] for r in report.rows if isinstance(r.axes.get(a), float)))}g}"
            v = v if float(short) == v else short  # values written by hand keep their form (0.75, 2.0, 1e-05)
        cells.append(str(v))
    return cells or ["default"]


@functools.lru_cache(maxsize=256)
def _digits(column: tuple[float, ...]) -> int:
    values = set(column)
    return next((d for d in range(4, 17) if len({f"{v:.{d}g}" for v in values}) == len(values)), 17)


def axis_names(report: StudyReport) -> list[str]:
    return [a.split(".")[-1] for a in report.axes] or ["point"]


def _paired(report: StudyReport) -> bool:
    return report.comparison is not None and report.comparison.rule != "none"


def _decided(row: Row) -> str:
    return "default" if row.is_default else ("-" if row.decided is None else "yes" if row.decided else "no")


def _paper_cell(field: str, tex: bool = False):
    def cell(report: StudyReport, row: Row) -> str:
        p = row.paper
        if p is None:
            return "--" if tex else "-"
        if field == "setting":
            return _tex(p.setting) if tex else p.setting
        text = _num(getattr(p, field))
        return text.replace("-", "--") if tex else text
    return cell


def _speed(report: StudyReport, row: Row) -> str:
    rel = report.relative_speed(row)
    return "-" if rel is None else f"{rel:.2f}x"


def _always(report: StudyReport) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Column:
    """One report column: its header and cell in the table and Markdown, and in LaTeX when ``tex`` is given."""

    header: str
    cell: Callable[[StudyReport, Row], str]
    shown: Callable[[StudyReport], bool] = _always
    tex_header: str | None = None  # None: not in the LaTeX table
    tex: Callable[[StudyReport, Row], str] | None = None


# After the axis columns, in this order, in every table format (CSV and JSON export every field instead).
COLUMNS = (
    Column("linear val %", lambda r, row: fmt_stat(row.linear), tex_header="linear",
           tex=lambda r, row: _tex_stat(row.linear)),
    Column("Δ linear [CI]", lambda r, row: fmt_diff(row, "linear"), tex_header=r"$\Delta$ linear [CI]",
           tex=lambda r, row: _tex_diff(row, "linear")),
    Column("fine-tune val %", lambda r, row: fmt_stat(row.finetune), has_finetune, "fine-tune",
           lambda r, row: _tex_stat(row.finetune)),
    Column("Δ fine-tune [CI]", lambda r, row: fmt_diff(row, "finetune"), has_finetune,
           r"$\Delta$ fine-tune [CI]", lambda r, row: _tex_diff(row, "finetune")),
    Column("Holm linear", lambda r, row: fmt_holm(row, "linear")),
    Column("Holm fine-tune", lambda r, row: fmt_holm(row, "finetune"), has_finetune),
    Column("Δ linear Welch", lambda r, row: fmt_welch(row, "linear")),
    Column("Δ fine-tune Welch", lambda r, row: fmt_welch(row, "finetune"), has_finetune),
    Column("linear test %", lambda r, row: fmt_stat(row.linear_test), lambda r: has_test(r, "linear")),
    Column("fine-tune test %", lambda r, row: fmt_stat(row.finetune_test), lambda r: has_test(r, "finetune")),
    Column("n", lambda r, row: str(row.n), lambda r: r.plan is not None),
    Column("decided", lambda r, row: _decided(row), lambda r: r.plan is not None),
    Column("paper setting", _paper_cell("setting"), _paired, "paper setting", _paper_cell("setting", tex=True)),
    Column("paper lin", _paper_cell("lin"), _paired, "paper lin", _paper_cell("lin", tex=True)),
    Column("paper ft", _paper_cell("ft"), _paired, "paper ft", _paper_cell("ft", tex=True)),
    Column("pretrain s", lambda r, row: _num(row.pretrain_s.mean, ".0f")),
    Column("pretrain TFLOPs", lambda r, row: _num(row.pretrain_tflops.mean, ".3g")),
    Column("speed vs default", _speed),
    Column("encoder GFLOPs", lambda r, row: _num(row.gflops, ".3g")),
    Column("peak MiB", lambda r, row: _num(row.peak_mem_mib.mean, ".0f"), has_memory),
    Column("trials", lambda r, row: ", ".join(f"{v} {k}" for k, v in sorted(row.status.items()))),
)


def columns(report: StudyReport) -> list[Column]:
    """The columns this report shows (after its axes)."""
    return [c for c in COLUMNS if c.shown(report)]


def _columns(report: StudyReport) -> list[str]:
    """Every table format's headers: the axes, then ``columns``."""
    return axis_names(report) + [c.header for c in columns(report)]


def _cells(report: StudyReport, row: Row) -> list[str]:
    return axis_cells(report, row) + [c.cell(report, row) for c in columns(report)]


# columns a narrow terminal drops first (the first listed goes first)
OPTIONAL_COLUMNS = ("Δ fine-tune Welch", "Δ linear Welch", "peak MiB", "encoder GFLOPs", "pretrain TFLOPs",
                    "pretrain s", "trials", "speed vs default", "paper setting", "paper ft", "paper lin")


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
    grid = [_marked_cells(report, r, n_axes, best_lin, best_ft) for r in report.rows]

    def fits(keep: list[str], rows: list[list[str]], headers: list[str]) -> bool:
        need = sum(_width_of(i, rows, headers) + 3 for i, c in enumerate(cols) if c in keep)
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
                             width=_width_of(i, grid, headers) if fits(keep, grid, headers) else None)
    for r, cells in zip(report.rows, grid):
        cells = _rich_markup(cells, r.is_default, [i for i, _ in metrics])
        table.add_row(*(c for c, col in zip(cells, cols) if col in keep))
    return table


def _marked_cells(report: StudyReport, r: Row, n_axes: int, best_lin: float | None,
                  best_ft: float | None) -> list[str]:
    """A row's plain cells, the default row marked "(default)" and the best mean per metric starred."""
    cells = _cells(report, r)
    if r.is_default:
        cells[0] += " (default)"
    if best_lin is not None and r.linear.mean == best_lin:
        cells[n_axes] += " ★"
    if best_ft is not None and r.finetune.mean == best_ft:
        cells[n_axes + 2] += " ★"
    return cells


def _width_of(i: int, rows: list[list[str]], headers: list[str]) -> int:
    """Column i's width: its longest header word or cell line."""
    return max([len(w) for w in headers[i].split()] + [max(len(x) for x in g[i].split("\n")) for g in rows])


def _rich_markup(cells: list[str], is_default: bool, metric_columns: list[int]) -> list[str]:
    """Rich markup for a row: brackets escaped, the default row bold, a starred best mean green."""
    cells = [c.replace("[", r"\[") for c in cells]
    if is_default:
        cells[0] = f"[bold]{cells[0].removesuffix(' (default)')}[/bold] (default)"
    for i in metric_columns:
        if cells[i].endswith(" ★"):
            cells[i] = f"[green]{cells[i]}[/green]"
    return cells


def render(report: StudyReport, console: Console) -> None:
    """Print the paper-style table of one study, its verdicts against the paper and the legend."""
    console.print(rich_table(report, console.width))
    for line in verdicts(report) + [legend(report), UNITS]:
        console.print(line, markup=False, highlight=False)
    if report.search is not None:
        render_search(report.search, console)


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
    lines += [f"- {legend(report)}", f"- {UNITS}", ""]
    if report.search is not None:
        lines += search_markdown(report.search)
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
    return _diff(row, attr, num="${:+.1f}$".format, none="--", noise=r" $\approx$", welch=" (Welch)")


def to_latex(report: StudyReport) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): default row bold, paper columns when matched."""
    with_paper = _paired(report)
    tex_cols = [c for c in columns(report) if c.tex is not None]
    cols = [_tex(a) for a in axis_names(report)] + [c.tex_header or "" for c in tex_cols]
    align = "l" * len(axis_names(report)) + "".join("l" if c.header == "paper setting" else "r" for c in tex_cols)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", f"\\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(cols) + r" \\", r"\midrule"]
    for r in report.rows:
        cells = [_tex(c) for c in axis_cells(report, r)]
        if r.is_default:
            cells[0] = f"\\textbf{{{cells[0]}}}"
        cells += [c.tex(report, r) for c in tex_cols if c.tex is not None]
        lines.append(" & ".join(cells) + r" \\")
    caption = (f"{report.description or report.name}. Top-1 \\% (mean $\\pm$ std over seeds, n in parentheses); "
               f"$\\Delta$: difference to the default (bold) in points with a "
               f"{_tex(rule_text(report.plan, report.alpha))} interval paired over seeds "
               f"(Welch's where fewer than 2 are shared), $\\approx$ when it contains 0. Validation split.")
    if with_paper:
        caption += " " + " ".join(_tex(v) + "." for v in verdicts(report) if "Spearman" in v)
    lines += [r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}",
              f"\\label{{tab:{report.name.replace('_', '-')}}}", r"\end{table}", ""]
    return "\n".join(lines)


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
        buf = io.StringIO()
        render(report, Console(file=buf, width=width, color_system=None, highlight=False))
        return buf.getvalue()
    raise BadInput(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
