"""``pretrain.init`` resolved against the database: a done trial's hash becomes the path and sha256 of its
pretraining checkpoint (train.weights reads it, and never opens the database), and every init of a study is checked
before anything is written."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.engine import Engine

from mae_lab.store.engine import DbError, connect
from mae_lab.store.reads import find_trial, trial_details
from mae_lab.store.tables import TrialRow
from mae_lab.study.expand import Trial, mae_config
from mae_lab.study.init_check import is_trial_ref
from mae_lab.study.spec import Study, StudyError, TrialSpec
from mae_lab.train.checkpoint import CheckpointError, load_checkpoint
from mae_lab.train.weights import InitError, InitSource, file_source, fit_state, init_state


def trial_source(engine: Engine, ref: str) -> tuple[TrialRow, InitSource]:
    """The done trial ``ref`` (id or hash prefix) and where its pretraining checkpoint is (InitError)."""
    row = find_trial(engine, ref)
    if row is None:
        raise InitError(f"trial {ref!r}: no single trial matches (give the id or a longer hash prefix)")
    if row.status != "done":
        raise InitError(f"trial {row.hash}: status is {row.status!r}, not 'done'; run its study first")
    _, _, arts = trial_details(engine, row.id)
    ckpt = next((a for a in arts if a.kind == "checkpoint"), None)
    if ckpt is None:
        raise InitError(f"trial {row.hash}: has no pretraining checkpoint (pretrain.epochs = 0?)")
    return row, InitSource(f"trial {row.hash}", ckpt.path, ckpt.sha256, trial=True)


def trial_checkpoint(engine: Engine, ref: str) -> tuple[TrialRow, dict]:
    """The done trial ``ref`` and its pretraining checkpoint, sha256-checked (InitError)."""
    row, source = trial_source(engine, ref)
    try:
        return row, load_checkpoint(source.path, sha256=source.sha256)
    except CheckpointError as exc:
        raise InitError(str(exc)) from None


def init_source(spec: TrialSpec, engine: Engine | None) -> InitSource:
    """Where ``spec.pretrain.init``'s weights are: a trial's checkpoint (needs ``engine``) or the file itself."""
    init = spec.pretrain.init
    if init is None:
        raise ValueError("the spec has no pretrain.init")  # callers ask only when it is set
    if not is_trial_ref(init):
        return file_source(spec)
    if engine is None:
        raise InitError(f"trial {init}: a trial init needs the database")
    return trial_source(engine, init)[1]


def check_inits(study: Study, trials: Sequence[Trial], db_url: str | None) -> None:
    """Every distinct init of the trials can be read and fits its model; StudyError (``pretrain.init``) otherwise.

    Run before anything is written: a bad init leaves the database as it was (and file inits never open it; a
    trial-hash init opens the existing database ``db_url`` read-only)."""
    engine: Engine | None = None
    seen: set[tuple[str, str]] = set()
    for t in trials:
        spec = t.spec
        if spec.pretrain.init is None:
            continue
        config = mae_config(spec)
        key = (spec.pretrain.init, repr(config))
        if key in seen:
            continue
        seen.add(key)
        try:
            if engine is None and is_trial_ref(spec.pretrain.init):
                engine = connect(db_url, create=False)
            source = init_source(spec, engine)
            fit_state(init_state(source), config, source.label)
        except InitError as exc:
            raise StudyError(study.path, "pretrain.init", str(exc)) from None
        except DbError as exc:
            raise StudyError(study.path, "pretrain.init", f"trial {spec.pretrain.init}: {exc}") from None
