"""``mae-lab show --recon``: a trial's recorded "recon" artifact, or one made from its pretraining checkpoint and the
validation images of its dataset, alone or side by side across an axis. Rendering is ``train.recon``'s; a study
page's figure (recorded artifacts only) is ``report.recon_page``'s."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy.engine import Engine

from mae_lab.atomic import write_atomic
from mae_lab.data import DataError, resolve_spec_data
from mae_lab.report.recon_page import ReconError, artifact, axis_key, siblings, side_by_side
from mae_lab.store.reads import get_checkpoint
from mae_lab.store.tables import TrialRow
from mae_lab.study.expand import mae_config
from mae_lab.study.spec import TrialSpec
from mae_lab.train.checkpoint import CheckpointError, load_checkpoint
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.recon import recon_png, reconstruct, trial_title, val_images


def trial_recon_png(engine: Engine, row: TrialRow, *, data_root: str | None = None) -> bytes:
    """The trial's reconstruction PNG: its recorded "recon" artifact (sha256 checked), else made from its pretraining
    checkpoint and the validation images of its dataset (``data_root`` as for ``mae-lab run``)."""
    art = artifact(engine, row.id, "recon")
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


def show_recon(engine: Engine, row: TrialRow, out: str | Path, *, across: str | None = None,
               data_root: str | None = None) -> list[str]:
    """What ``mae-lab show TRIAL --recon OUT [--across AXIS]`` does: write the trial's reconstruction grid, or the
    grids of the trials that differ from it only in ``across`` (same seed), side by side. Returns their labels."""
    if across is None:
        write_atomic(out, trial_recon_png(engine, row, data_root=data_root))
        return [row.label]
    key = axis_key(row, across)
    trials = siblings(engine, row, key)
    pngs = [trial_recon_png(engine, t, data_root=data_root) for t in trials]
    titles = [f"{key.split('.')[-1]}={json.loads(t.axes_json)[key]}" for t in trials]
    write_atomic(out, side_by_side(pngs, titles, f"reconstructions across {key.split('.')[-1]} (seed {row.seed})"))
    return [t.label for t in trials]


