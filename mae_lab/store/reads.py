"""Reading studies, trials, results, metrics, artifacts and checkpoint records (each in its own short session)."""
from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from mae_lab.store.outage import through_outages
from mae_lab.store.states import STATUSES
from mae_lab.store.tables import ArtifactRow, CheckpointRow, MetricRow, ResultRow, StudyRow, TrialRow


@through_outages
def get_study(engine: Engine, name: str) -> StudyRow | None:
    with Session(engine) as s:
        return s.exec(select(StudyRow).where(StudyRow.name == name)).first()


@through_outages
def study_name(engine: Engine, study_id: int) -> str:
    with Session(engine) as s:
        return s.exec(select(StudyRow.name).where(StudyRow.id == study_id)).one()


def list_studies(engine: Engine) -> list[tuple[StudyRow, dict[str, int]]]:
    """Every study with its active trials counted by status."""
    out = []
    with Session(engine) as s:
        for study in s.exec(select(StudyRow).order_by(col(StudyRow.name))):
            counts = {st: 0 for st in STATUSES}
            for t in s.exec(select(TrialRow).where(TrialRow.study_id == study.id, TrialRow.active == True)):  # noqa
                counts[t.status] = counts.get(t.status, 0) + 1
            out.append((study, counts))
    return out


@through_outages
def study_trials(engine: Engine, study_id: int, *, active_only: bool = True
                 ) -> list[tuple[TrialRow, ResultRow | None]]:
    with Session(engine) as s:
        stmt = select(TrialRow).where(TrialRow.study_id == study_id)
        if active_only:
            stmt = stmt.where(TrialRow.active == True)  # noqa: E712
        trials = s.exec(stmt.order_by(col(TrialRow.position))).all()
        results = {r.trial_id: r for r in s.exec(select(ResultRow).where(
            col(ResultRow.trial_id).in_([t.id for t in trials])))}
        return [(t, results.get(t.id)) for t in trials]


@through_outages
def get_trials(engine: Engine, ids: list[int]) -> list[TrialRow]:
    with Session(engine) as s:
        rows = {r.id: r for r in s.exec(select(TrialRow).where(col(TrialRow.id).in_(ids)))}
        return [rows[i] for i in ids if i in rows]


@through_outages
def get_result(engine: Engine, trial_id: int) -> ResultRow | None:
    with Session(engine) as s:
        return s.exec(select(ResultRow).where(ResultRow.trial_id == trial_id)).first()


@through_outages
def get_checkpoint(engine: Engine, pretrain_hash: str) -> CheckpointRow | None:
    with Session(engine) as s:
        return s.get(CheckpointRow, pretrain_hash)


@through_outages
def find_done(engine: Engine, trial_hash: str) -> tuple[TrialRow, ResultRow] | None:
    """A done trial with this spec hash and its result, in any study (the earliest), or None."""
    with Session(engine) as s:
        row = s.exec(select(TrialRow, ResultRow).join(ResultRow, col(ResultRow.trial_id) == TrialRow.id)
                     .where(TrialRow.hash == trial_hash, TrialRow.status == "done").order_by(col(TrialRow.id))).first()
        return (row[0], row[1]) if row is not None else None


def done_with_results(engine: Engine) -> list[tuple[TrialRow, ResultRow]]:
    """Every done trial with its result, in any study."""
    with Session(engine) as s:
        return [(t, r) for t, r in s.exec(select(TrialRow, ResultRow)
                                          .join(ResultRow, col(ResultRow.trial_id) == TrialRow.id)
                                          .where(TrialRow.status == "done").order_by(col(TrialRow.id)))]


def pretraining_results(engine: Engine, pretrain_hashes: set[str]) -> dict[str, ResultRow]:
    """Per pretraining hash, the result of a done trial (of any study) that ran that pretraining rather than
    reusing it: where a shared pretraining's time, speed and memory were measured."""
    with Session(engine) as s:
        rows = s.exec(select(TrialRow.pretrain_hash, ResultRow)
                      .join(ResultRow, col(ResultRow.trial_id) == TrialRow.id)
                      .where(col(TrialRow.pretrain_hash).in_(sorted(pretrain_hashes)), TrialRow.status == "done",
                             ResultRow.pretrain_reused == False)  # noqa: E712
                      .order_by(col(TrialRow.id))).all()
    out: dict[str, ResultRow] = {}
    for h, r in rows:
        out.setdefault(h, r)
    return out


def find_trial(engine: Engine, ref: str) -> TrialRow | None:
    """A trial by numeric id or by (a prefix of) its hash."""
    with Session(engine) as s:
        if ref.isdigit():
            row = s.get(TrialRow, int(ref))
            if row is not None:
                return row
        rows = s.exec(select(TrialRow).where(col(TrialRow.hash).startswith(ref))).all()
        return rows[0] if len(rows) == 1 else None


@through_outages
def trial_details(engine: Engine, trial_id: int) -> tuple[list[MetricRow], ResultRow | None, list[ArtifactRow]]:
    with Session(engine) as s:
        metrics = s.exec(select(MetricRow).where(MetricRow.trial_id == trial_id)
                         .order_by(col(MetricRow.stage), col(MetricRow.epoch), col(MetricRow.name))).all()
        result = s.exec(select(ResultRow).where(ResultRow.trial_id == trial_id)).first()
        arts = s.exec(select(ArtifactRow).where(ArtifactRow.trial_id == trial_id)).all()
        return list(metrics), result, list(arts)


def integrity_ok(engine: Engine) -> bool:
    """SQLite's integrity check (True on other backends)."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as c:
        return c.execute(text("PRAGMA integrity_check")).scalar() == "ok"
