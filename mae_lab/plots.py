"""Study plots as PNG files (matplotlib's Agg backend, chosen inside each function; files written atomically).

- ``axis_plot``: linear and fine-tune top-1 against a numeric axis, error bars = std over seeds (like the paper's
  Figure 5 mask-ratio curve), one line per setting of the other axes; the default is a dotted vertical line.
- ``points_plot``: a bar chart of every point, for studies with a non-numeric axis (mask token, target, ...).
- ``loss_plot``: the pretraining loss per epoch of every trial (colour = point, line style = seed).
- ``speed_plot``: accuracy against pretraining images/s and against encoder GFLOPs per image (like Table 2).

Every figure has a fixed size in pixels (``SIZES``), so tests can check it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from mae_lab import db
from mae_lab.atomic import write_atomic
from mae_lab.report import Row, StudyReport

DPI = 100
SIZES = {"axis": (640, 400), "points": (640, 400), "loss": (640, 400), "speed": (1000, 400)}  # (width, height) px


def _figure(kind: str, ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = SIZES[kind]
    fig, axes = plt.subplots(1, ncols, figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    return fig, axes


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays SIZES[kind]
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def numeric_axes(report: StudyReport) -> list[str]:
    """Axes whose values are numbers (not booleans) in every row that sets them (and at least two distinct)."""
    out = []
    for a in report.axes:
        vals = [r.axes[a] for r in report.rows if a in r.axes]
        if vals and all(_is_number(v) for v in vals) and len(set(vals)) > 1:
            out.append(a)
    return out


def _short(key: str) -> str:
    return key.split(".")[-1]


def _point_name(row: Row) -> str:
    """A short name for a point: its axis values ("8", "block, 0.5")."""
    return ", ".join(str(v) for v in row.axes.values()) or "default"


def axis_plot(report: StudyReport, axis: str, path: str | Path) -> Path:
    """Linear and fine-tune top-1 (mean, error bar = std over seeds) against ``axis``; one line per other setting."""
    fig, ax = _figure("axis")
    others = [a for a in report.axes if a != axis]
    series: dict[str, list[Row]] = {}
    for r in report.rows:
        if axis in r.axes:
            key = ", ".join(f"{_short(a)}={r.axes[a]}" for a in others if a in r.axes)
            series.setdefault(key, []).append(r)
    xs_all = sorted({r.axes[axis] for rows in series.values() for r in rows})
    for key, rows in series.items():
        rows = sorted(rows, key=lambda r: r.axes[axis])
        for attr, name, marker in (("linear", "linear", "o"), ("finetune", "fine-tune", "s")):
            pts = [(r.axes[axis], getattr(r, attr)) for r in rows if getattr(r, attr).mean is not None]
            if not pts:
                continue
            label = name + (f" ({key})" if key else "")
            ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[s.std for _, s in pts], marker=marker,
                        capsize=3, label=label)
    base = report.default_row()
    if base is not None and axis in base.axes:
        ax.axvline(base.axes[axis], color="0.6", linestyle=":", label="default")
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_xlabel(_short(axis))
    ax.set_ylabel("top-1 % (mean ± std over seeds)")
    ax.set_title(f"{report.name}: accuracy vs {_short(axis)}")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    return _save(fig, Path(path))


def points_plot(report: StudyReport, path: str | Path) -> Path:
    """Grouped bars (linear, fine-tune) per point with std error bars; the default point's label is starred."""
    import numpy as np

    fig, ax = _figure("points")
    x = np.arange(len(report.rows))
    width = 0.38
    for k, (attr, name) in enumerate((("linear", "linear"), ("finetune", "fine-tune"))):
        stats = [getattr(r, attr) for r in report.rows]
        means = [s.mean if s.mean is not None else 0.0 for s in stats]
        errs = [s.std or 0.0 for s in stats]
        ax.bar(x + (k - 0.5) * width, means, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(x, [_point_name(r) + (" *" if r.is_default else "") for r in report.rows], rotation=15,
                  ha="right", fontsize="small")
    ax.set_xlabel(", ".join(_short(a) for a in report.axes))
    ax.set_ylabel("top-1 % (mean ± std over seeds)")
    ax.set_title(f"{report.name}: every point (* = default)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, Path(path))


def loss_plot(engine: Engine, report: StudyReport, path: str | Path) -> Path:
    """The recorded pretraining loss per epoch of every trial: colour = point, line style = seed."""
    fig, ax = _figure("loss")
    styles = ["-", "--", ":", "-."]
    colors = [f"C{i % 10}" for i in range(len(report.rows))]
    for color, r in zip(colors, report.rows):
        for k, (trial_id, seed) in enumerate(zip(r.trial_ids, r.seeds)):
            metrics, _, _ = db.trial_details(engine, trial_id)
            pts = sorted((m.epoch, m.value) for m in metrics if m.stage == "pretrain" and m.name == "loss")
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], color=color, linestyle=styles[k % len(styles)],
                        marker="." if len(pts) < 20 else None, label=f"{_point_name(r)} (seed {seed})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("pretraining loss (removed patches)")
    ax.set_title(f"{report.name}: pretraining loss per trial ({', '.join(map(_short, report.axes))})")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="x-small", ncol=2)
    return _save(fig, Path(path))


def speed_plot(report: StudyReport, path: str | Path) -> Path:
    """Accuracy against pretraining throughput (images/s, left) and encoder GFLOPs per image (right)."""
    fig, (left, right) = _figure("speed", ncols=2)
    for ax, xname in ((left, "images_per_s"), (right, "gflops")):
        for attr, name, marker in (("linear", "linear", "o"), ("finetune", "fine-tune", "s")):
            pts = []
            for r in report.rows:
                s = getattr(r, attr)
                x = r.images_per_s.mean if xname == "images_per_s" else r.gflops
                if s.mean is not None and x is not None:
                    xerr = r.images_per_s.std if xname == "images_per_s" else 0.0
                    pts.append((x, xerr, s, r))
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[2].mean for p in pts], xerr=[p[1] for p in pts],
                        yerr=[p[2].std for p in pts], marker=marker, linestyle="none", capsize=3, label=name)
            for x, _, s, r in pts:
                ax.annotate(_point_name(r) + (" *" if r.is_default else ""), (x, s.mean), fontsize="x-small",
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("pretraining images/s" if xname == "images_per_s" else "encoder GFLOPs / image")
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{report.name}: speed vs accuracy, points labelled by {', '.join(map(_short, report.axes))} "
                 "(* = default)")
    return _save(fig, Path(path))


def study_plots(engine: Engine, report: StudyReport, folder: str | Path) -> list[Path]:
    """Every plot of a study into ``folder`` (``axis-<key>.png``, ``points.png``, ``loss.png``, ``speed.png``);
    nothing when no trial is done."""
    folder = Path(folder)
    if not any(r.linear.n or r.finetune.n for r in report.rows):
        return []
    out = [axis_plot(report, a, folder / f"axis-{_short(a)}.png") for a in numeric_axes(report)]
    if len(numeric_axes(report)) < len(report.axes) or not report.axes:
        out.append(points_plot(report, folder / "points.png"))
    out.append(loss_plot(engine, report, folder / "loss.png"))
    out.append(speed_plot(report, folder / "speed.png"))
    return out
