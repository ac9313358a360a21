"""Where reconstructions come from: a trial's recorded "recon" artifact, or its pretraining checkpoint and the
validation images of its dataset; the trials to lay side by side across an axis (``mae-lab show --recon``) and on a
study's page. Rendering is ``recon``'s."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy.engine import Engine
from torch import Tensor

from mae_lab.atomic import write_atomic
from mae_lab.data import DataError, DatasetInfo, resolve_spec_data
from mae_lab.report.study_report import StudyReport
from mae_lab.store.reads import get_checkpoint, get_study, study_trials, trial_details
from mae_lab.store.tables import ArtifactRow, TrialRow
from mae_lab.study.expand import mae_config
from mae_lab.study.spec import TrialSpec
from mae_lab.train.checkpoint import CheckpointError, load_checkpoint
from mae_lab.train.loaders import eval_loader
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.recon import NUM_IMAGES, recon_png, reconstruct, side_by_side, trial_title


class ReconError(ValueError):
    """No reconstruction can be made or found (no artifact, no checkpoint, bad axis)."""


def val_images(spec: TrialSpec, info: DatasetInfo, n: int = NUM_IMAGES) -> Tensor:
    """The first ``n`` validation images, resized and normalized as for evaluation: (n, C, S, S)."""
    imgs, _ = next(iter(eval_loader(spec, info, "val", batch_size=n, max_samples=n)))
    return imgs[:n]


def save_trial_recon(model: MaskedAutoencoder, spec: TrialSpec, info: DatasetInfo, path: str | Path) -> str:
    """Write the trial's reconstruction grid to ``path`` (atomically); return the file's sha256."""
    png = recon_png(reconstruct(model, val_images(spec, info), info.mean, info.std), trial_title(spec))
    write_atomic(path, png)
    return hashlib.sha256(png).hexdigest()


def _artifact(engine: Engine, trial_id: int, kind: str) -> ArtifactRow | None:
    _, _, arts = trial_details(engine, trial_id)
    return next((a for a in arts if a.kind == kind), None)


def trial_recon_png(engine: Engine, row: TrialRow, *, data_root: str | None = None) -> bytes:
    """The trial's reconstruction PNG: its recorded "recon" artifact (sha256 checked), else made from its pretraining
    checkpoint and the validation images of its dataset (``data_root`` as for ``mae-lab run``)."""
    art = _artifact(engine, row.id, "recon")
    if art is not None and Path(art.path).is_file():
        data = Path(art.path).read_bytes()
        if hashlib.sha256(data).hexdigest() == art.sha256:
            return data
    ckpt = get_checkpoint(engine, row.pretrain_hash)
    if ckpt is None or not Path(ckpt.path).is_file():
        raise ReconError(f"trial {row.hash[:12]} ({row.label}) has no reconstruction artifact and no pretraining "
                         f"checkpoint (status {row.status})")
    spec = TrialSpec.model_validate_json(row.spec_json)
    try:
        state = load_checkpoint(ckpt.path, sha256=ckpt.sha256)
        info = resolve_spec_data(spec.data, data_root=data_root)
    except (CheckpointError, DataError) as exc:
        raise ReconError(str(exc)) from None
    model = MaskedAutoencoder(mae_config(spec))
    model.load_state_dict(state["model"])
    return recon_png(reconstruct(model, val_images(spec, info), info.mean, info.std), trial_title(spec))


def _axis_key(row: TrialRow, axis: str) -> str:
    keys = list(json.loads(row.axes_json))
    if axis in keys:
        return axis
    near = [k for k in keys if k.split(".")[-1] == axis]
    if len(near) == 1:
        return near[0]
    raise ReconError(f"trial {row.hash[:12]} has no axis {axis!r} (its axes: {', '.join(keys) or 'none'})")


def siblings(engine: Engine, row: TrialRow, axis: str) -> list[TrialRow]:
    """The trials of ``row``'s study with its seed and its values of every other axis, sorted by ``axis``."""
    key = _axis_key(row, axis)
    mine = json.loads(row.axes_json)
    out = []
    for t, _ in study_trials(engine, row.study_id):
        axes = json.loads(t.axes_json)
        if t.seed == row.seed and all(axes.get(k) == v for k, v in mine.items() if k != key) and key in axes:
            out.append(t)
    return sorted(out, key=lambda t: (str(type(json.loads(t.axes_json)[key])), json.loads(t.axes_json)[key]))


def show_recon(engine: Engine, row: TrialRow, out: str | Path, *, across: str | None = None,
               data_root: str | None = None) -> list[str]:
    """What ``mae-lab show TRIAL --recon OUT [--across AXIS]`` does: write the trial's reconstruction grid, or the
    grids of the trials that differ from it only in ``across`` (same seed), side by side. Returns their labels."""
    if across is None:
        write_atomic(out, trial_recon_png(engine, row, data_root=data_root))
        return [row.label]
    key = _axis_key(row, across)
    trials = siblings(engine, row, key)
    pngs = [trial_recon_png(engine, t, data_root=data_root) for t in trials]
    titles = [f"{key.split('.')[-1]}={json.loads(t.axes_json)[key]}" for t in trials]
    write_atomic(out, side_by_side(pngs, titles, f"reconstructions across {key.split('.')[-1]} (seed {row.seed})"))
    return [t.label for t in trials]


def study_recon_png(engine: Engine, report: StudyReport) -> bytes | None:
    """For a study page: the recorded reconstructions across the study's first axis (first seed), side by side;
    None when its trials have no "recon" artifacts (pages never need the data or a checkpoint)."""
    if not report.axes or not report.rows or not report.rows[0].trials:
        return None
    first = next((t for t, _ in study_trials(engine, get_study(engine, report.name).id)
                  if t.hash == report.rows[0].trials[0]), None)
    if first is None:
        return None
    trials = siblings(engine, first, report.axes[0])
    arts = [_artifact(engine, t.id, "recon") for t in trials]
    pairs = [(t, a) for t, a in zip(trials, arts) if a is not None and Path(a.path).is_file()]
    if not pairs:
        return None
    key = report.axes[0]
    return side_by_side([Path(a.path).read_bytes() for _, a in pairs],
                        [f"{key.split('.')[-1]}={json.loads(t.axes_json)[key]}" for t, _ in pairs],
                        f"reconstructions across {key.split('.')[-1]} (seed {first.seed})")
