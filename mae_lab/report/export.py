"""A StudyReport as data: CSV (one line per point, every field) and JSON (the whole report), for other tools."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Any

from mae_lab.report.study_report import Stat, StudyReport
from mae_lab.study.stats import Interval


def _stat_dict(s: Stat) -> dict[str, Any]:
    return {"mean": s.mean, "std": s.std, "n": s.n, "values": list(s.values)}


def _diff_dict(d: Interval | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {"delta": d.delta, "low": d.low, "high": d.high, "df": d.df, "level": d.level, "kind": d.kind, "n": d.n,
            "within_noise": d.within_noise, "note": d.note}


def to_dict(report: StudyReport) -> dict[str, Any]:
    comp = report.comparison
    return {
        "study": report.name, "description": report.description, "paper": report.paper, "axes": report.axes,
        "units": "top-1 % on the validation split (*_test: the test split); differences in percentage points, row "
                 "minus default; *_diff: the interval the verdict uses (paired over seeds, Welch's when fewer than 2 "
                 "are shared); *_welch: the unpaired interval",
        "adaptive": None if report.plan is None else report.plan.model_dump(),
        "rows": [{
            "label": r.label, "axes": r.axes, "is_default": r.is_default, "status": r.status, "trials": r.trials,
            "seeds": r.seeds, "linear": _stat_dict(r.linear), "linear_diff": _diff_dict(r.linear_diff),
            "finetune": _stat_dict(r.finetune), "finetune_diff": _diff_dict(r.finetune_diff),
            "linear_welch": _diff_dict(r.linear_welch), "finetune_welch": _diff_dict(r.finetune_welch),
            "linear_test": _stat_dict(r.linear_test), "finetune_test": _stat_dict(r.finetune_test),
            "verdict": r.verdict, "n": r.n, "decided": r.decided,
            "pretrain_s": r.pretrain_s.mean, "pretrain_tflops": r.pretrain_tflops.mean,
            "images_per_s": r.images_per_s.mean,
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
               "linear_ci_high", "linear_within_noise", "linear_ci_kind", "linear_welch_low", "linear_welch_high",
               "linear_verdict", "finetune_mean", "finetune_std", "finetune_n", "finetune_delta", "finetune_ci_low",
               "finetune_ci_high", "finetune_within_noise", "finetune_ci_kind", "finetune_welch_low",
               "finetune_welch_high", "finetune_verdict", "linear_test_mean", "finetune_test_mean", "decided",
               "paper_setting", "paper_lin", "paper_ft", "pretrain_s", "pretrain_tflops", "images_per_s",
               "speed_vs_default", "encoder_gflops", "peak_mem_mib", "done", "trials")


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
            s, d, w_ = getattr(r, attr), getattr(r, f"{attr}_diff"), getattr(r, f"{attr}_welch")
            cells += [v(s.mean), v(s.std), s.n]
            cells += [v(None if d is None else d.delta), v(None if d is None else d.low),
                      v(None if d is None else d.high), v(None if d is None else d.within_noise),
                      v(None if d is None else d.kind), v(None if w_ is None else w_.low),
                      v(None if w_ is None else w_.high), v(r.verdict.get(attr))]
        cells += [v(r.linear_test.mean), v(r.finetune_test.mean), v(r.decided)]
        p = r.paper
        cells += [v(p and p.setting), v(p and p.lin), v(p and p.ft), v(r.pretrain_s.mean), v(r.pretrain_tflops.mean),
                  v(r.images_per_s.mean),
                  v(report.relative_speed(r)), v(r.gflops), v(r.peak_mem_mib.mean), r.status.get("done", 0),
                  len(r.trials)]
        w.writerow(cells)
    return buf.getvalue()
