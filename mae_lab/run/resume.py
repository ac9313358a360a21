"""What a run resumes from: every pretraining checkpoint a study's trials would resume is checked against their
identity before anything is written (``check_checkpoints``), and a checkpoint is kept only if the database recorded
its sha256 (``verified_checkpoint``, under the checkpoint's ``file_lock``)."""
from __future__ import annotations

import dataclasses
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import Engine

from mae_lab.data import DatasetInfo
from mae_lab.run.progress import Display
from mae_lab.store.reads import get_checkpoint
from mae_lab.study import planning
from mae_lab.study.expand import mae_config
from mae_lab.study.identity import BoundTrial, pretrain_identity
from mae_lab.study.spec import Study, StudyError
from mae_lab.train.checkpoint import CheckpointError, load_checkpoint, settle_checkpoint, sha256_file
from mae_lab.train.pretrain import checkpoint_mismatch


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_checkpoints(study: Study, trials: list[BoundTrial], infos: dict[str, DatasetInfo], device: str,
                      world_size: int, artifacts: Path) -> None:
    """Every pretraining checkpoint a trial would resume must have been written for its pretraining identity;
    StudyError names the first key that differs (before anything is written to the database)."""
    seen: set[str] = set()
    for t in trials:
        path = artifacts / "pretrain" / f"{t.pretrain_hash}.pt"
        if t.pretrain_hash in seen or not path.exists():
            continue
        seen.add(t.pretrain_hash)
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
        except CheckpointError:
            continue  # unreadable: set aside and pretrained again when the trial runs (_verified_checkpoint)
        ctx = planning.run_context(t.spec, infos[t.spec.data.model_dump_json()], device, world_size)
        mismatch = checkpoint_mismatch(ckpt, dataclasses.asdict(mae_config(t.spec)), pretrain_identity(t.spec, ctx))
        if mismatch:
            raise StudyError(study.path, mismatch[0], f"cannot resume {path}: {mismatch[1]} (delete the checkpoint "
                             "to pretrain again)")


def verified_checkpoint(engine: Engine, pretrain_hash: str, path: Path, display: Display) -> None:
    """Keep ``path`` only if its sha256 is the one the database recorded (after finishing a commit a stop cut short,
    ``checkpoint.settle_checkpoint``); otherwise set it aside. Under the checkpoint's file lock: a temp file of an
    earlier write of it (or of its staged next one) is a write cut short by a killed worker, deleted."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    row = get_checkpoint(engine, pretrain_hash)
    settle_checkpoint(path, row.sha256 if row is not None else None)
    if not path.exists():
        return
    if row is not None and row.sha256 == sha256_file(path):
        return
    aside = path.with_suffix(".unverified")
    path.replace(aside)
    display.message(f"  checkpoint {path.name} does not match the database's sha256: set aside as {aside.name}, "
                    "pretraining from scratch")
