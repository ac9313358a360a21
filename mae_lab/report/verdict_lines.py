"""A study report's verdicts as lines of text: per point the difference with the interval its verdict used, the
verdict, Holm and the paper's Δ; then the seed rule and level, and the ordering against the paper."""
from __future__ import annotations

from mae_lab.report.paper import MIN_ORDERED
from mae_lab.report.study_report import StudyReport, comparisons, has_finetune
from mae_lab.study.adaptive import rule_text
from mae_lab.study.stats import Interval


def _fmt_interval(d: Interval) -> str:
    if d.low is None:
        return f"{d.delta:+.1f} ({d.note})"
    return f"{d.delta:+.1f} [{d.low:+.1f}, {d.high:+.1f}]"


def point_verdicts(report: StudyReport) -> list[str]:
    """One line per point and metric: the difference with the interval its verdict uses, the verdict, the paper's
    difference, and for adaptive seeds n and whether the point is decided."""
    lines = []
    for attr, name, row, d, p in comparisons(report):
        line = f"{name}, {row.label}: Δ {_fmt_interval(d)} -> {row.verdict[attr]}"
        line += "" if p is None else f"; paper Δ {p:+.1f}"
        if row.holm.get(attr) is not None:
            line += "; Holm: " + ("detected" if row.holm[attr] else "not detected")
        if row.decided is not None:
            line += f"; n={row.n}, " + ("decided" if row.decided else "not decided")
        lines.append(line)
    return lines


def verdicts(report: StudyReport) -> list[str]:
    """Per point the computed verdict (``point_verdicts``); then, per metric, whether our ordering agrees with the
    paper's, the best point here (over every point) and in the paper, the matching rule and the paper's notes."""
    lines = point_verdicts(report)
    if report.plan is not None:
        plan = report.plan
        lines.append(f"adaptive seeds: {plan.min} to {plan.max} per point until the paired interval of "
                     f"{' and '.join(plan.metrics)} excludes 0 or lies within ±{plan.min_effect:g} points, at "
                     f"{rule_text(plan, report.alpha)}: a false \"detected\" and a false \"within "
                     f"±{plan.min_effect:g}\" each have a chance of at most alpha = {report.alpha:g} over all looks")
    else:
        lines.append(f"intervals at {rule_text(None, report.alpha)}: a fixed list of seeds, one look")
    comp = report.comparison
    if comp is None:
        return lines
    if comp.rule == "none":
        return lines + [f"{comp.table.title}: {comp.reason}"]
    for metric, (rho, n) in comp.agreement.items():
        name = "linear" if metric == "linear" else "fine-tune"
        if metric == "finetune" and not has_finetune(report):
            continue
        if n < MIN_ORDERED:
            lines.append(f"{comp.table.title}, {name}: {n} matched point{'s' * (n != 1)}, fewer than "
                         f"{MIN_ORDERED}: ordering not compared")
        elif rho is None:
            lines.append(f"{comp.table.title}, {name}: no ordering to compare (ties over {n} points)")
        else:
            word = "agrees with" if rho > 0.5 else ("is opposite to" if rho < -0.5 else "does not match")
            attr, short = ("linear", "lin") if metric == "linear" else ("finetune", "ft")
            done = [r for r in report.rows if getattr(r, attr).mean is not None]
            top_ours = max(getattr(r, attr).mean for r in done)
            papers = [p for p in comp.matches if p is not None and getattr(p, short) is not None]
            top_paper = max(getattr(p, short) for p in papers)
            ours = " = ".join(r.label for r in done if getattr(r, attr).mean == top_ours)
            theirs = " = ".join(p.setting for p in papers if getattr(p, short) == top_paper)
            lines.append(f"{comp.table.title}, {name}: our ordering {word} the paper's "
                         f"(Spearman rho = {rho:+.2f} over {n} matched points); best here {ours}, in the paper "
                         f"{theirs}")
    lines.append(f"matching: {comp.rule_text()}")
    base = report.default_row()
    paper_default = next((r for r in comp.table.rows if r.default), None)
    if base is not None and base.paper is not None and paper_default is not None and base.paper is not paper_default:
        lines.append(f"paper Δ: each paper row minus the paper's row at our default ({base.paper.setting}), not "
                     f"minus the paper's own default ({paper_default.setting})")
    if comp.unmatched:
        lines.append(f"paper settings without a counterpart here: {', '.join(comp.unmatched)}")
    lines += [f"paper: {note}" for note in comp.table.notes]
    return lines
