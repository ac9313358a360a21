"""The computed part of ``summary.md`` that states verdicts: the verdict table (each verdict's interval at the level
its decision used, with Holm's decision beside it) and what the records say about shared controls. ``site.py``
writes the page; everything here is a pure function of the study reports."""
from __future__ import annotations

from mae_lab.report.formats import fmt_diff, fmt_holm
from mae_lab.report.study_report import StudyReport, comparisons

VERDICT_WORDS = (
    "Per point: the difference to its study's default (top-1 points, validation split) with the interval its verdict "
    "uses (paired over seeds unless marked Welch) at the level that study's decisions use: 1 - alpha for a fixed "
    "list of seeds, 1 - alpha / looks for adaptive seeds (Bonferroni over the looks, so that a false \"detected\" "
    "and a false \"within ±min_effect\" each keep a chance of at most alpha over every look); then the paper's "
    "difference (its row minus its row at our default, only where the values match), the verdict, and Holm's "
    "decision over the study's points. Verdicts: *reproduces* (the interval excludes 0 on the paper's side and "
    "contains the paper's Δ), *same direction, smaller / larger than the paper* (it excludes 0 on the paper's side, "
    "the paper's Δ beyond its far / near end), *opposite* (it excludes 0 on the other side), *no effect detected, "
    "the paper's Δ ruled out here* (it contains 0 but not the paper's Δ), *not detected* (it contains 0 and the "
    "paper's Δ; it rules out every effect beyond its largest |bound|), *detected* (no paper Δ to compare with).")


def verdict_table(reports: list[StudyReport]) -> list[str]:
    """The summary's verdict table, one line per point and metric."""
    lines = [VERDICT_WORDS, "", "| study | point | metric | Δ [CI] | level | paper Δ | verdict | Holm | n | decided |",
             "|:---|:---|:---|---:|:---|---:|:---|:---|---:|:---|"]
    for rep in reports:
        for attr, name, row, d, p in comparisons(rep):
            decided = "-" if row.decided is None else ("yes" if row.decided else "no")
            verdict = row.verdict[attr].replace("|", r"\|")  # "rules out |Δ| > x" inside a table cell
            lines.append(f"| [{rep.name}]({rep.name}.md) | {row.label} | {name} | {fmt_diff(row, attr)} | "
                         f"{100 * d.level:.4g}% | {'-' if p is None else f'{p:+.1f}'} | {verdict} | "
                         f"{fmt_holm(row, attr)} | {row.n} | {decided} |")
    return lines


def shared_control(reports: list[StudyReport]) -> str:
    """One paragraph, from the records: which studies' default arms are the very same trials (one per seed)."""
    owners: dict[str, set[str]] = {}
    for rep in reports:
        base = rep.default_row()
        for h in [] if base is None else base.trials:
            owners.setdefault(h, set()).add(rep.name)
    shared = {h: names for h, names in owners.items() if len(names) > 1}
    if not shared:
        return "No two studies here share a control trial: each compares its points with its own default."
    studies = sorted(set().union(*shared.values()))
    most = max(len(n) for n in shared.values())
    return (f"One shared control: the default arms of {len(studies)} studies ({', '.join(studies)}) are the same "
            f"trials, one per seed ({len(shared)} trials whose hash appears in 2 to {most} studies; a study that "
            f"finds its default already done copies it). Every comparison in them is against one control per "
            f"seed, so their errors are correlated across studies. Holm's step-down corrects within a study (its "
            f"points against its default, one metric); nothing corrects across the studies.")
