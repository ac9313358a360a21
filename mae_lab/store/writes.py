"""Writing studies, trials and results: every state change of a trial, and every result, in one transaction,
fenced by the writer's claim when it has one (``store.queue``)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from mae_lab.store.engine import transaction
from mae_lab.store.outage import through_outages
from mae_lab.store.queue import Claim, fenced
from mae_lab.store.tables import (
    RUN_PROVENANCE,
    ArtifactRow,
    CheckpointRow,
    MetricRow,
    ResultRow,
    StudyRow,
    TrialRow,
    now,
)

T = TypeVar("T")


def _retrying(write: Callable[[], T], attempts: int = 5) -> T:
    """``write()``, again after a short wait when a concurrent insert of the same unique key beat it: the retry
    finds the winner's rows."""
    for attempt in range(attempts):
        try:
            return write()
        except IntegrityError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


@through_outages
def sync_study(engine: Engine, *, name: str, description: str, paper: str | None, path: str, spec_text: str,
               spec_hash: str, trials: list[dict[str, Any]], deactivate_missing: bool = True) -> StudyRow:
    """Create or update the study row and insert its trials that are not there yet, in one transaction.

    ``trials``: dicts with hash, pretrain_hash, seed, label, axes_json, spec_json, in expansion order. Trials of
    the study missing from ``trials`` become inactive unless ``deactivate_missing`` is False (a search adds its
    trials as it samples them). Workers that sync the same study at once are fine: the loser of a race on the
    unique keys retries and finds the winner's rows.
    """
    return _retrying(lambda: _sync_study(engine, name=name, description=description, paper=paper, path=path,
                                         spec_text=spec_text, spec_hash=spec_hash, trials=trials,
                                         deactivate_missing=deactivate_missing))


def _sync_study(engine: Engine, *, name: str, description: str, paper: str | None, path: str, spec_text: str,
                spec_hash: str, trials: list[dict[str, Any]], deactivate_missing: bool) -> StudyRow:
    with transaction(engine) as s:
        study = s.exec(select(StudyRow).where(StudyRow.name == name)).first()
        if study is None:
            study = StudyRow(name=name, description=description, paper=paper, path=path, spec_text=spec_text,
                             spec_hash=spec_hash)
            s.add(study)
            s.flush()
        else:
            study.description, study.paper, study.path = description, paper, path
            study.spec_text, study.spec_hash, study.updated_at = spec_text, spec_hash, now()
        existing = {t.hash: t for t in s.exec(select(TrialRow).where(TrialRow.study_id == study.id))}
        current = set()
        for pos, t in enumerate(trials):
            current.add(t["hash"])
            row = existing.get(t["hash"])
            if row is None:
                s.add(TrialRow(study_id=study.id, position=pos, **t))
            else:
                row.position, row.active, row.label, row.axes_json = pos, True, t["label"], t["axes_json"]
        if deactivate_missing:
            for h, row in existing.items():
                if h not in current:
                    row.active = False
        return study


@through_outages
def add_trial(engine: Engine, study_id: int, trial: dict[str, Any], *, optuna_trial: int | None = None
              ) -> TrialRow:
    """The study's trial with ``trial["hash"]``, inserted (pending) if it is not there yet; links the Optuna trial
    number when given and the row has none. Safe against a concurrent insert of the same trial."""
    return _retrying(lambda: _add_trial(engine, study_id, trial, optuna_trial))


def _add_trial(engine: Engine, study_id: int, trial: dict[str, Any], optuna_trial: int | None) -> TrialRow:
    with transaction(engine) as s:
        row = s.exec(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.hash == trial["hash"])).first()
        if row is None:
            position = optuna_trial if optuna_trial is not None else 0
            row = TrialRow(study_id=study_id, position=position, optuna_trial=optuna_trial, **trial)
            s.add(row)
        else:
            row.active = True
            if row.optuna_trial is None:
                row.optuna_trial = optuna_trial
        s.flush()
        return row


@through_outages
def reset_trials(engine: Engine, study_id: int, hashes: list[str]) -> list[CheckpointRow]:
    """Set the given trials back to pending and drop their metrics, results, artifacts and pretraining checkpoint
    records (``--rerun``); return the dropped checkpoint records so the caller can delete their files."""
    with transaction(engine) as s:
        rows = s.exec(select(TrialRow).where(TrialRow.study_id == study_id, col(TrialRow.hash).in_(hashes))).all()
        ids = [r.id for r in rows]
        for model in (MetricRow, ResultRow, ArtifactRow):
            s.exec(delete(model).where(col(model.trial_id).in_(ids)))
        for r in rows:
            r.status, r.error, r.worker, r.started_at, r.ended_at, r.attempts = "pending", None, None, None, None, 0
            r.resumed_from_epoch = None
        hashes_dropped = [r.pretrain_hash for r in rows]
        ckpts = s.exec(select(CheckpointRow).where(col(CheckpointRow.pretrain_hash).in_(hashes_dropped)))
        dropped = list(ckpts)
        for c in dropped:
            s.delete(c)
        return dropped


@through_outages
def set_provenance(engine: Engine, trial_id: int, *, claim: Claim | None = None, **fields: Any) -> None:
    with transaction(engine) as s:
        row = fenced(s, claim, trial_id)
        for k, v in fields.items():
            setattr(row, k, v)


@through_outages
def record_metrics(engine: Engine, trial_id: int, stage: str, epoch: int, values: dict[str, float], *,
                   claim: Claim | None = None) -> None:
    """Write one epoch's metrics, replacing any earlier row for the same (trial, stage, epoch, name); fenced by
    ``claim`` when given."""
    with transaction(engine) as s:
        fenced(s, claim, trial_id)
        names = list(values)
        s.exec(delete(MetricRow).where(col(MetricRow.trial_id) == trial_id, col(MetricRow.stage) == stage,
                                       col(MetricRow.epoch) == epoch, col(MetricRow.name).in_(names)))
        for name, value in values.items():
            s.add(MetricRow(trial_id=trial_id, stage=stage, epoch=epoch, name=name, value=float(value)))


@through_outages
def clear_metrics(engine: Engine, trial_id: int, stage: str, *, claim: Claim | None = None) -> None:
    with transaction(engine) as s:
        fenced(s, claim, trial_id)
        s.exec(delete(MetricRow).where(col(MetricRow.trial_id) == trial_id, col(MetricRow.stage) == stage))


@through_outages
def record_checkpoint(engine: Engine, pretrain_hash: str, path: str, sha256: str, epoch: int, *,
                      claim: Claim | None = None) -> None:
    with transaction(engine) as s:
        if claim is not None:
            fenced(s, claim, claim.trial_id)
        row = s.get(CheckpointRow, pretrain_hash)
        if row is None:
            s.add(CheckpointRow(pretrain_hash=pretrain_hash, path=path, sha256=sha256, epoch=epoch))
        else:
            row.path, row.sha256, row.epoch, row.updated_at = path, sha256, epoch, now()


@through_outages
def adopt_result(engine: Engine, trial_id: int, source: ResultRow, claim: Claim | None = None) -> None:
    """Close a trial as done with a copy of a done trial's result (the same spec hash, in another study or a search):
    its metrics, artifacts and the provenance of the run that made it come along, nothing is trained or evaluated,
    and ``result_copied`` keeps its times from being counted twice."""
    with transaction(engine) as s:
        row = fenced(s, claim, trial_id)
        origin = s.exec(select(TrialRow).where(TrialRow.id == source.trial_id)).one()
        for k in RUN_PROVENANCE:
            setattr(row, k, getattr(origin, k))
        row.status, row.error, row.ended_at, row.worker = "done", None, now(), None
        for table in (ResultRow, MetricRow, ArtifactRow):
            s.exec(delete(table).where(col(table.trial_id) == trial_id))
        fields = source.model_dump(exclude={"id", "trial_id"})
        s.add(ResultRow(trial_id=trial_id, **{**fields, "pretrain_reused": True, "result_copied": True}))
        for m in s.exec(select(MetricRow).where(MetricRow.trial_id == source.trial_id)).all():
            s.add(MetricRow(trial_id=trial_id, stage=m.stage, epoch=m.epoch, name=m.name, value=m.value))
        for a in s.exec(select(ArtifactRow).where(ArtifactRow.trial_id == source.trial_id)).all():
            s.add(ArtifactRow(trial_id=trial_id, kind=a.kind, path=a.path, sha256=a.sha256))


@through_outages
def finish_trial(engine: Engine, trial_id: int, status: str, *, result: dict[str, Any] | None = None,
                 artifacts: dict[str, tuple[str, str]] | None = None, error: str | None = None,
                 claim: Claim | None = None) -> None:
    """Close a trial: its status, result row and artifacts land together or not at all; fenced by ``claim``."""
    with transaction(engine) as s:
        row = fenced(s, claim, trial_id)
        row.status, row.error, row.ended_at, row.worker = status, error, now(), None
        if result is not None:
            s.exec(delete(ResultRow).where(col(ResultRow.trial_id) == trial_id))
            s.add(ResultRow(trial_id=trial_id, **result))
        _put_artifacts(s, trial_id, artifacts)


@through_outages
def record_artifacts(engine: Engine, trial_id: int, artifacts: dict[str, tuple[str, str]],
                     update: dict[str, Any]) -> None:
    """After a done trial's result: its artifacts, and ``update`` to its result row (FLOPs, artifact_error)."""
    with transaction(engine) as s:
        _put_artifacts(s, trial_id, artifacts)
        result = s.exec(select(ResultRow).where(ResultRow.trial_id == trial_id)).one()
        for k, v in update.items():
            setattr(result, k, v)


def _put_artifacts(s: Session, trial_id: int, artifacts: dict[str, tuple[str, str]] | None) -> None:
    for kind, (path, sha) in (artifacts or {}).items():
        s.exec(delete(ArtifactRow).where(col(ArtifactRow.trial_id) == trial_id, col(ArtifactRow.kind) == kind))
        s.add(ArtifactRow(trial_id=trial_id, kind=kind, path=path, sha256=sha))
