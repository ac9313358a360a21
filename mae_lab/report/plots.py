"""Study plots as PNG files (matplotlib's Agg backend, chosen inside each function; files written atomically).

- ``axis_plot``: linear and fine-tune top-1 against a numeric axis, error bars = std over seeds (like the paper's
  Figure 5 mask-ratio curve), one line per setting of the other axes; the default is a dotted vertical line.
- ``points_plot``: every point's top-1 as a marker with its std, for studies with a non-numeric axis.
- ``loss_plot``: the pretraining loss per epoch of every trial (colour = point, line style = seed).
- ``compute_plot``: top-1 against pretraining compute (encoder TFLOPs) and against pretraining wall time, so that
  "better" and "cheaper" read together.

The paper's numbers, where the study matches a paper table, are a second series on a twin y axis (their scale is
ImageNet's). Y ranges follow the data (never forced to 0), legends list only what was drawn. Plots depend on the
report model only, so ``mae-lab report --from trials.csv`` draws the same files; every figure has a fixed size in
pixels (``SIZES``) and the PNGs carry no software or time stamp, so equal data give equal bytes.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from mae_lab.atomic import write_atomic
from mae_lab.report.study_report import METRICS, Row, StudyReport

DPI = 100
SIZES = {"axis": (640, 400), "points": (640, 400), "loss": (640, 400), "compute": (1000, 400)}  # (width, height) px
PAPER_ATTR = {"linear": "lin", "finetune": "ft"}
MARKERS = {"linear": "o", "finetune": "s"}


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
    # no bbox_inches="tight": the size stays SIZES[kind]; no Software entry: the bytes depend on the data only
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
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


def _paper_points(report: StudyReport, attr: str, x_of) -> list[tuple[Any, float]]:
    """(x, paper top-1) of every row matched to a paper row that has a number for ``attr``."""
    pts = []
    for r in report.rows:
        p = r.paper
        value = None if p is None else getattr(p, PAPER_ATTR[attr])
        if value is not None and x_of(r) is not None:
            pts.append((x_of(r), value))
    return pts


def _paper_series(ax, report: StudyReport, x_of, *, line: bool) -> list:
    """The paper's numbers on a twin y axis (hollow markers, dashed); returns the twin's handles for the legend."""
    drawn = [(attr, name, _paper_points(report, attr, x_of)) for attr, name in METRICS]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return []
    twin = ax.twinx()
    handles = []
    for attr, name, pts in drawn:
        pts = sorted(pts) if line else pts
        (h,) = twin.plot([x for x, _ in pts], [y for _, y in pts], marker=MARKERS[attr], markerfacecolor="none",
                         linestyle="--" if line else "none", color="0.45", label=f"paper {name}")
        handles.append(h)
    comp = report.comparison
    scale = "ImageNet ViT-L" + (", matched by position" if comp is not None and comp.rule == "position" else "")
    twin.set_ylabel(f"paper top-1 % ({scale})", color="0.35")
    twin.tick_params(axis="y", colors="0.35")
    return handles


def _legend(ax, extra: list) -> None:
    handles, labels = ax.get_legend_handles_labels()
    handles += extra
    labels += [h.get_label() for h in extra]
    if handles:
        ax.legend(handles, labels, fontsize="small")


def axis_plot(report: StudyReport, axis: str, path: str | Path) -> Path:
    """Linear and fine-tune top-1 (mean, error bar = std over seeds) against ``axis``; one line per other setting;
    the paper's values on a twin axis."""
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
        for attr, name in METRICS:
            pts = [(r.axes[axis], getattr(r, attr)) for r in rows if getattr(r, attr).mean is not None]
            if not pts:
                continue
            label = name + (f" ({key})" if key else "")
            ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[s.std for _, s in pts],
                        marker=MARKERS[attr], capsize=3, label=label)
    base = report.default_row()
    if base is not None and axis in base.axes:
        ax.axvline(base.axes[axis], color="0.6", linestyle=":", label="default")
    extra = _paper_series(ax, report, lambda r: r.axes.get(axis), line=True) if not others else []
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set_xlabel(_short(axis))
    ax.set_ylabel("top-1 % (val; mean ± std over seeds)")
    ax.set_title(f"{report.name}: accuracy vs {_short(axis)}")
    ax.grid(alpha=0.3)
    _legend(ax, extra)
    return _save(fig, Path(path))


def points_plot(report: StudyReport, path: str | Path) -> Path:
    """Every point's linear and fine-tune top-1 (marker, error bar = std over seeds; the y range follows the data,
    not 0); the paper's values on a twin axis; the default point's label is starred."""
    fig, ax = _figure("points")
    xs = list(range(len(report.rows)))
    for k, (attr, name) in enumerate(METRICS):
        pts = [(x + (k - 0.5) * 0.2, getattr(r, attr)) for x, r in zip(xs, report.rows) if getattr(r, attr).n]
        if pts:
            ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[s.std for _, s in pts],
                        marker=MARKERS[attr], linestyle="none", capsize=3, label=name)
    index = {id(r): x for x, r in zip(xs, report.rows)}
    extra = _paper_series(ax, report, lambda r: index[id(r)], line=False)
    ax.set_xticks(xs, [_point_name(r) + (" *" if r.is_default else "") for r in report.rows], rotation=15,
                  ha="right", fontsize="small")
    ax.set_xlim(-0.6, len(xs) - 0.4)
    ax.set_xlabel(", ".join(_short(a) for a in report.axes))
    ax.set_ylabel("top-1 % (val; mean ± std over seeds)")
    ax.set_title(f"{report.name}: every point (* = default)")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, extra)
    return _save(fig, Path(path))


def loss_plot(report: StudyReport, path: str | Path) -> Path:
    """The recorded pretraining loss per epoch of every trial: colour = point, line style = seed."""
    fig, ax = _figure("loss")
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(report.rows):
        for k, (seed, losses) in enumerate(r.losses):
            ax.plot(range(1, len(losses) + 1), losses, color=f"C{i % 10}", linestyle=styles[k % len(styles)],
                    marker="." if len(losses) < 20 else None, label=f"{_point_name(r)} (seed {seed})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("pretraining loss (removed patches)")
    ax.set_title(f"{report.name}: pretraining loss per trial ({', '.join(map(_short, report.axes))})")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="x-small", ncol=2)
    return _save(fig, Path(path))


def compute_plot(report: StudyReport, path: str | Path) -> Path:
    """Top-1 against pretraining compute (encoder TFLOPs, left) and pretraining wall time (right), per point."""
    fig, (left, right) = _figure("compute", ncols=2)
    for ax, stat, xlabel in ((left, "pretrain_tflops", "pretraining TFLOPs (encoder, 3 × forward × images seen)"),
                             (right, "pretrain_s", "pretraining wall time, s")):
        for attr, name in METRICS:
            pts = [(getattr(r, stat), getattr(r, attr), r) for r in report.rows
                   if getattr(r, attr).mean is not None and getattr(r, stat).mean is not None]
            if not pts:
                continue
            ax.errorbar([x.mean for x, _, _ in pts], [s.mean for _, s, _ in pts], xerr=[x.std for x, _, _ in pts],
                        yerr=[s.std for _, s, _ in pts], marker=MARKERS[attr], linestyle="none", capsize=3,
                        label=name)
            for x, s, r in pts:
                ax.annotate(_point_name(r) + (" *" if r.is_default else ""), (x.mean, s.mean), fontsize="x-small",
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 % (val)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{report.name}: accuracy vs pretraining compute, points labelled by "
                 f"{', '.join(map(_short, report.axes)) or 'point'} (* = default)")
    return _save(fig, Path(path))


def study_plots(report: StudyReport, folder: str | Path) -> list[Path]:
    """Every plot of a study into ``folder`` (``axis-<key>.png``, ``points.png``, ``loss.png``, ``compute.png``);
    nothing when no trial is done."""
    folder = Path(folder)
    if not any(r.linear.n or r.finetune.n for r in report.rows):
        return []
    out = [axis_plot(report, a, folder / f"axis-{_short(a)}.png") for a in numeric_axes(report)]
    if len(numeric_axes(report)) < len(report.axes) or not report.axes:
        out.append(points_plot(report, folder / "points.png"))
    out.append(loss_plot(report, folder / "loss.png"))
    out.append(compute_plot(report, folder / "compute.png"))
    return out
