"""A study page's reconstructions: the recorded "recon" artifacts of the trials across the study's first axis
(first seed), laid side by side. Reads the database and the artifact files only (no torch, no data, no checkpoint);
``run.recon_figures`` makes missing grids for ``show --recon``."""
from __future__ import annotations

import io
import json
from pathlib import Path

from sqlalchemy.engine import Engine

from mae_lab.errors import BadInput
from mae_lab.report.study_report import StudyReport
from mae_lab.store.reads import get_study, study_trials, trial_details
from mae_lab.store.tables import ArtifactRow, TrialRow


class ReconError(BadInput, ValueError):
    """No reconstruction can be made or found (no artifact, no checkpoint, bad axis)."""


def artifact(engine: Engine, trial_id: int, kind: str) -> ArtifactRow | None:
    _, _, arts = trial_details(engine, trial_id)
    return next((a for a in arts if a.kind == kind), None)


def axis_key(row: TrialRow, axis: str) -> str:
    keys = list(json.loads(row.axes_json))
    if axis in keys:
        return axis
    near = [k for k in keys if k.split(".")[-1] == axis]
    if len(near) == 1:
        return near[0]
    raise ReconError(f"trial {row.hash[:12]} has no axis {axis!r} (its axes: {', '.join(keys) or 'none'})")


def siblings(engine: Engine, row: TrialRow, axis: str) -> list[TrialRow]:
    """The trials of ``row``'s study with its seed and its values of every other axis, sorted by ``axis``."""
    key = axis_key(row, axis)
    mine = json.loads(row.axes_json)
    out = []
    for t, _ in study_trials(engine, row.study_id):
        axes = json.loads(t.axes_json)
        if t.seed == row.seed and all(axes.get(k) == v for k, v in mine.items() if k != key) and key in axes:
            out.append(t)
    return sorted(out, key=lambda t: (str(type(json.loads(t.axes_json)[key])), json.loads(t.axes_json)[key]))


def side_by_side(pngs: list[bytes], titles: list[str], suptitle: str = "") -> bytes:
    """Lay PNG images side by side at their own resolution, each under its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    images = [mpimg.imread(io.BytesIO(p), format="png") for p in pngs]
    dpi = 100
    head = 0.6  # inches above the images for the titles
    h = max(im.shape[0] for im in images) / dpi + head
    w = sum(im.shape[1] for im in images) / dpi * 1.02
    fig, axes = plt.subplots(1, len(images), figsize=(w, h), dpi=dpi, squeeze=False,
                             gridspec_kw={"width_ratios": [im.shape[1] for im in images]})
    for ax, im, t in zip(axes[0], images, titles):
        ax.imshow(im, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(t, fontsize=9, fontweight="bold")
    fig.suptitle(suptitle, fontsize=9, y=1 - 0.05 / h, va="top")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - head / h, wspace=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def study_recon_png(engine: Engine, report: StudyReport) -> bytes | None:
    """For a study page: the recorded reconstructions across the study's first axis (first seed), side by side;
    None when its trials have no "recon" artifacts (pages never need the data or a checkpoint)."""
    if not report.axes or not report.rows or not report.rows[0].trials:
        return None
    study = get_study(engine, report.name)
    if study is None:
        return None
    first = next((t for t, _ in study_trials(engine, study.id) if t.hash == report.rows[0].trials[0]), None)
    if first is None:
        return None
    trials = siblings(engine, first, report.axes[0])
    arts = [artifact(engine, t.id, "recon") for t in trials]
    pairs = [(t, a) for t, a in zip(trials, arts) if a is not None and Path(a.path).is_file()]
    if not pairs:
        return None
    key = report.axes[0]
    return side_by_side([Path(a.path).read_bytes() for _, a in pairs],
                        [f"{key.split('.')[-1]}={json.loads(t.axes_json)[key]}" for t, _ in pairs],
                        f"reconstructions across {key.split('.')[-1]} (seed {first.seed})")
