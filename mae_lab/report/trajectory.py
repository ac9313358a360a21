"""Effects over pretraining: each point's Δ to the study's default at every probed pretraining epoch.

``pretrain.probe_every`` with ``eval.linear.blocks`` probes the encoder while it pretrains; the trial records keep
the last block's val top-1 at each probed epoch (``records.linear_epochs``). Per point and epoch, Δ (points, row minus
default) is paired over the seeds both share and its interval is the one the page's verdicts use: ``paired_interval``
at ``StudyReport.level`` (``adaptive.decision_level``: the study's alpha, Bonferroni over its looks). Each epoch gets
its own interval at that level, with no further allowance for reading several epochs; the page says so.

Everything here reads the trial records and the report model only, so ``mae-lab report --from trials.csv`` draws the
same section and plot as the database does. Torch-free.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mae_lab.atomic import write_atomic
from mae_lab.report.study_report import StudyReport
from mae_lab.store.records import StudyRecords
from mae_lab.study.adaptive import rule_text, to_points
from mae_lab.study.stats import Interval, by_seed, paired_interval

FILE = "trajectory.png"
DPI = 100
SIZE = (640, 400)  # px, fixed so that equal data give equal bytes (as plots.SIZES)


@dataclass(frozen=True)
class Trajectory:
    """One point's Δ to the default at each probed epoch both have (intervals[i] belongs to epochs[i])."""

    point: str
    epochs: list[int]
    intervals: list[Interval]

    def from_epoch(self) -> int | None:
        """The first epoch from which every probed epoch's interval excludes 0 (the last included); None if none."""
        first = None
        for e, ci in zip(reversed(self.epochs), reversed(self.intervals)):
            if ci.within_noise is not False:
                break
            first = e
        return first

    def sentence(self) -> str:
        """"Δ excludes 0 from epoch E on", or at which epochs it does without holding to the last, or "at no probed
        epoch"; with the first and last such Δ and interval."""
        def at(e: int) -> str:
            ci = self.intervals[self.epochs.index(e)]
            body = f"{ci.delta:+.1f} ({ci.note})" if ci.low is None else f"{ci.delta:+.1f} [{ci.low:+.1f}, " \
                                                                         f"{ci.high:+.1f}]"
            return f"epoch {e}: Δ {body}"
        start = self.from_epoch()
        last = self.epochs[-1]
        if start is not None:
            head = f"Δ excludes 0 from epoch {start} on"
            tail = at(start) + ("" if start == last else f"; {at(last)}")
        else:
            some = [e for e, ci in zip(self.epochs, self.intervals) if ci.within_noise is False]
            head = ("Δ excludes 0 at no probed epoch" if not some else
                    f"Δ excludes 0 at epoch{'s' * (len(some) > 1)} {', '.join(map(str, some))}, not at the last")
            tail = at(last)
        return f"{self.point}: {head} ({tail})"


def epoch_values(records: StudyRecords) -> dict[str, dict[int, float]]:
    """{trial hash: {epoch: top-1 in points}} of the done trials with per-epoch probes."""
    out: dict[str, dict[int, float]] = {}
    for t in records.trials:
        if t["status"] == "done" and t.get("linear_epochs"):
            out[t["hash"]] = {int(e): to_points(v) for e, v in t["linear_epochs"]}
    return out


def has_trajectories(records: StudyRecords) -> bool:
    """Whether some done trial was probed at two or more pretraining epochs (``pretrain.probe_every``)."""
    return any(len(v) > 1 for v in epoch_values(records).values())


def study_trajectories(report: StudyReport, records: StudyRecords) -> list[Trajectory]:
    """Each non-default point's trajectory against the default, in study order; [] without a default."""
    base = report.default_row()
    if base is None:
        return []
    values = epoch_values(records)
    seed_of = {t["hash"]: t["seed"] for t in records.trials}

    def per_epoch(row: Any) -> dict[int, dict[int, float]]:  # {epoch: {seed: top-1}}
        out: dict[int, dict[int, float]] = {}
        for h in row.trials:
            for e, v in values.get(h, {}).items():
                out.setdefault(e, {})[seed_of[h]] = v
        return out

    ref = per_epoch(base)
    out = []
    for row in report.rows:
        mine = per_epoch(row)
        epochs = sorted(set(mine) & set(ref))
        if row is base or not epochs:
            continue
        intervals = [paired_interval(*by_seed(mine[e], ref[e])[1:], report.level) for e in epochs]
        out.append(Trajectory(row.label, epochs, intervals))
    return out


def trajectory_png(trajectories: list[Trajectory], title: str) -> bytes:
    """PNG bytes: Δ against pretraining epoch per point, bars = its interval (a marker alone where there is none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI, layout="constrained")
    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    width = 0.25 / max(1, len(trajectories))  # points side by side around each epoch
    for i, tr in enumerate(trajectories):
        xs = [e + (i - (len(trajectories) - 1) / 2) * width for e in tr.epochs]
        ys = [math.nan if ci.delta is None else ci.delta for ci in tr.intervals]
        lo = [0.0 if ci.low is None or ci.delta is None else ci.delta - ci.low for ci in tr.intervals]
        hi = [0.0 if ci.high is None or ci.delta is None else ci.high - ci.delta for ci in tr.intervals]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=3, label=tr.point)
    epochs = sorted({e for tr in trajectories for e in tr.epochs})
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("Δ linear top-1 vs default (points)")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="x-small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def trajectory_section(report: StudyReport, records: StudyRecords, folder: Path) -> tuple[str, list[Path]]:
    """("## Effects over pretraining" section, [its plot]) for a study page, the plot written to
    ``folder/<study>/trajectory.png``; ("", []) when the study has no per-epoch probes or no default."""
    if not has_trajectories(records):
        return "", []
    trajectories = study_trajectories(report, records)
    if not trajectories:
        return "", []
    level = rule_text(report.plan, report.alpha)
    png = write_atomic(folder / report.name / FILE,
                       trajectory_png(trajectories, f"{report.name}: Δ to the default over pretraining ({level})"))
    lines = ["## Effects over pretraining", "",
             f"Linear probe of the last block (val top-1) at each probed pretraining epoch: Δ to the default in "
             f"points, paired over the seeds both share, at {level} (the level of this page's verdicts), one interval "
             f"per epoch with no allowance for reading several epochs.", ""]
    lines += [f"- {tr.sentence()}" for tr in trajectories]
    lines += ["", f"![trajectory]({report.name}/{FILE})", ""]
    return "\n".join(lines), [png]


def probe_count(studies: list[StudyRecords]) -> int:
    """How many linear probes ran at pretraining epochs (one per done trial and probed epoch; each probes every
    block ``eval.linear.blocks`` lists)."""
    return sum(len(t.get("linear_epochs") or []) for s in studies for t in s.trials if t["status"] == "done")
