"""Probe surfaces in the report: a block x epoch heatmap of linear top-1 per point, and where the best block is.

Reads the ``probe_surface`` metrics (``probe_surface.py``) of a study's active trials from the database and
averages them over seeds per point. Torch-free: ``mae-lab report`` stays light.
"""
from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine

from mae_lab.atomic import write_atomic
from mae_lab.store.reads import get_study, study_trials, trial_details

STAGE = "probe_surface"  # as probe_surface.STAGE (that module imports torch)


@dataclass(frozen=True)
class Surface:
    """One point's surface: top1[i][j] is the mean val top-1 over seeds after blocks[i] at epochs[j] (None: none)."""

    point: str  # the point's label
    depth: int
    blocks: list[int]
    epochs: list[int]
    top1: list[list[float | None]]
    seeds: int

    def best(self) -> tuple[int, int, float]:
        """(block, epoch, top-1) of the best cell; ties go to the earlier block, then the earlier epoch."""
        cells = [(v, -b, -e) for b, row in zip(self.blocks, self.top1) for e, v in zip(self.epochs, row)
                 if v is not None]
        v, b, e = max(cells)
        return -b, -e, v

    def note(self) -> str:
        """One line: where the best block is, against the last block at the last epoch."""
        b, e, v = self.best()
        last = self.top1[-1][-1]
        tail = "" if last is None else f"; the last block at the last epoch: {100 * last:.1f}%"
        return (f"probe surface, {self.point}: best block {b} of {self.depth} at epoch {e} ({100 * v:.1f}% linear "
                f"top-1, {self.seeds} seed{'s' * (self.seeds != 1)}){tail}")


def study_surfaces(engine: Engine, name: str) -> list[Surface]:
    """The surface of every point of study ``name`` that has probe_surface metrics, in study order."""
    study = get_study(engine, name)
    if study is None:
        return []
    cells: dict[str, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[str, set[int]] = defaultdict(set)
    depth: dict[str, int] = {}
    for t, _ in study_trials(engine, study.id):
        metrics, _, _ = trial_details(engine, t.id)
        for m in metrics:
            block = re.fullmatch(r"block(\d+)", m.name)
            if m.stage == STAGE and block:
                cells[t.label][int(block.group(1)), m.epoch].append(m.value)
                seeds[t.label].add(t.seed)
                depth[t.label] = json.loads(t.spec_json)["model"]["depth"]
    out = []
    for point, grid in cells.items():
        blocks = sorted({b for b, _ in grid})
        epochs = sorted({e for _, e in grid})
        top1 = [[sum(v) / len(v) if (v := grid.get((b, e))) else None for e in epochs] for b in blocks]
        out.append(Surface(point, depth[point], blocks, epochs, top1, len(seeds[point])))
    return out


def heatmap_png(s: Surface) -> bytes:
    """PNG bytes of the block (rows, first block at the bottom) x epoch (columns) heatmap, cells labelled in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[float("nan") if v is None else 100 * v for v in row] for row in s.top1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(s.epochs), 1.2 + 0.45 * len(s.blocks)), layout="constrained")
    im = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis")
    bright = np.asarray(im.norm(np.asarray(values))) > 0.6  # (blocks, epochs): dark text on the bright cells
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize="x-small",
                        color="k" if bright[i, j] else "w")
    b, e, _ = s.best()
    ax.add_patch(plt.Rectangle((s.epochs.index(e) - 0.5, s.blocks.index(b) - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(s.epochs)), [str(e) for e in s.epochs])
    ax.set_yticks(range(len(s.blocks)), [str(b) for b in s.blocks])
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel(f"block (of {s.depth})")
    ax.set_title(f"{s.point}: linear top-1 % (best boxed)", fontsize="small")
    fig.colorbar(im, ax=ax, label="top-1 %")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def surface_file(point: str) -> str:
    return "surface-" + (re.sub(r"[^A-Za-z0-9_.=-]+", "_", point) or "default") + ".png"


def surface_plots(engine: Engine, name: str, folder: str | Path) -> list[Path]:
    """A heatmap per point of study ``name`` into ``folder`` (``surface-<point>.png``); [] when none has one."""
    return [write_atomic(Path(folder) / surface_file(s.point), heatmap_png(s)) for s in study_surfaces(engine, name)]


def surface_notes(engine: Engine, name: str) -> list[str]:
    """Each point's note: where its best block is."""
    return [s.note() for s in study_surfaces(engine, name)]


def surface_markdown(engine: Engine, name: str, images: str | None = None) -> str:
    """A "## Probe surface" section (each point's note, and its heatmap under ``images``/), or "" when none."""
    surfaces = study_surfaces(engine, name)
    if not surfaces:
        return ""
    lines = ["## Probe surface", ""]
    for s in surfaces:
        lines += [f"- {s.note()}"]
        if images is not None:
            lines += ["", f"  ![{s.point}]({images}/{surface_file(s.point)})"]
    return "\n".join(lines) + "\n"
