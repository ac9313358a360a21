"""The trials table as a work queue: claims, heartbeats and fenced writes.

A running trial carries its claim (worker host:node:pid, see ``store.workers``, and attempt number), a heartbeat
and a progress note that a background thread refreshes while the trial runs (``Heartbeat``), so a worker that died,
or hangs while alive, is noticed and its trial claimed again. A claim is (trial, worker, attempt): every write a
worker makes for its trial after claiming it checks, in the same transaction, that the row still carries its claim
(``fenced``); a worker whose trial was taken over gets LostClaim and stops, so it cannot overwrite its successor's
metrics, checkpoint record or result. On PostgreSQL a claim is ``SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED``;
SQLite is serialized by ``BEGIN IMMEDIATE`` (``store.engine``).
"""
from __future__ import annotations

import threading
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from mae_lab.store import workers
from mae_lab.store.engine import transaction
from mae_lab.store.outage import through_outages
from mae_lab.store.reads import get_trials
from mae_lab.store.states import HEARTBEAT_S, STALE_AFTER_S
from mae_lab.store.tables import TrialRow, now


def worker_id() -> str:
    return workers.worker_id()


@dataclass(frozen=True)
class Claim:
    trial_id: int
    worker: str
    attempt: int


class LostClaim(RuntimeError):
    """This worker's claim on a trial is gone: another worker took the trial over (or it was reset)."""

    def __init__(self, claim: Claim, holder: str | None):
        self.claim = claim
        super().__init__(f"trial {claim.trial_id}: this worker ({claim.worker}, attempt {claim.attempt}) lost its "
                         f"claim{f' to {holder}' if holder else ''}; it stops without writing more")


def claim_of(row: TrialRow) -> Claim:
    """The claim a claimed (running) row holds: its worker and attempt."""
    if row.worker is None:
        raise ValueError(f"trial {row.id} is not claimed: no worker holds it")
    return Claim(row.id, row.worker, row.attempts)


def fenced(s: Session, claim: Claim | None, trial_id: int) -> TrialRow:
    """The trial row, locked on PostgreSQL; raises LostClaim when ``claim`` is given and no longer holds it."""
    stmt = select(TrialRow).where(TrialRow.id == trial_id)
    if s.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = s.exec(stmt).one()
    if claim is not None and (row.status != "running" or row.worker != claim.worker or row.attempts != claim.attempt):
        raise LostClaim(claim, f"{row.worker} (attempt {row.attempts})" if row.status == "running" else row.status)
    return row


def _runnable(stale_after_s: float):
    """SQL: pending or interrupted, or running with no heartbeat or no progress for ``stale_after_s`` (a dead
    worker on another host, or a hung one that still beats)."""
    cutoff = now() - timedelta(seconds=stale_after_s)
    stale = or_(col(TrialRow.heartbeat_at).is_(None), col(TrialRow.heartbeat_at) < cutoff,
                col(TrialRow.progress_at) < cutoff)
    return or_(col(TrialRow.status).in_(["pending", "interrupted"]), and_(col(TrialRow.status) == "running", stale))


def _take(row: TrialRow) -> None:
    row.status, row.worker, row.progress = "running", worker_id(), None
    row.heartbeat_at = row.progress_at = now()
    row.attempts += 1
    row.started_at = row.started_at or now()
    row.ended_at = None


def _take_first(s: Session, stmt) -> TrialRow | None:
    """Claim the first row `stmt` selects, inside the caller's transaction; None when it selects none."""
    if s.get_bind().dialect.name == "postgresql":  # SQLite is serialized by BEGIN IMMEDIATE instead
        stmt = stmt.with_for_update(skip_locked=True)
    row = s.exec(stmt).first()
    if row is None:
        return None
    _take(row)
    s.add(row)
    return row


@through_outages
def release_dead_local(engine: Engine, study_id: int) -> int:
    """Mark interrupted the running trials whose worker is a dead process of this machine (``workers.dead_here``:
    same host, boot and PID namespace; no need to wait for the heartbeat to go stale); returns how many. Each update
    is fenced by the dead worker's claim."""
    with Session(engine) as s:
        rows = s.exec(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.status == "running",
                                             col(TrialRow.worker).startswith(workers.local_prefix()))).all()
    dead = [claim_of(r) for r in rows if workers.dead_here(r.worker)]
    for claim in dead:
        with transaction(engine) as s:
            try:
                row = fenced(s, claim, claim.trial_id)
            except LostClaim:
                continue
            row.status, row.worker, row.error = "interrupted", None, f"worker {claim.worker} died"
    return len(dead)


@through_outages
def claim_next(engine: Engine, study_id: int, *, stale_after_s: float = STALE_AFTER_S,
               skip: AbstractSet[int] = frozenset()) -> TrialRow | None:
    """Claim the next runnable trial of the study (in study order): one row per transaction, chosen in SQL with
    LIMIT 1 (FOR UPDATE SKIP LOCKED on PostgreSQL, so workers claiming at the same instant take different rows)."""
    release_dead_local(engine, study_id)
    with transaction(engine) as s:
        stmt = (select(TrialRow)
                .where(TrialRow.study_id == study_id, TrialRow.active == True,  # noqa: E712
                       _runnable(stale_after_s), col(TrialRow.id).notin_(sorted(skip)))
                .order_by(col(TrialRow.position), col(TrialRow.id)).limit(1))
        return _take_first(s, stmt)


@through_outages
def has_runnable(engine: Engine, study_id: int, *, stale_after_s: float = STALE_AFTER_S,
                 skip: AbstractSet[int] = frozenset()) -> bool:
    """Whether a trial of the study is runnable now (a claim that found none may have lost a race for it)."""
    with Session(engine) as s:
        return s.exec(select(TrialRow.id).where(TrialRow.study_id == study_id, TrialRow.active == True,  # noqa
                                                _runnable(stale_after_s), col(TrialRow.id).notin_(sorted(skip)))
                      .limit(1)).first() is not None


@through_outages
def claim_trial(engine: Engine, trial_id: int, *, stale_after_s: float = STALE_AFTER_S) -> TrialRow | None:
    """Claim one given trial if it is runnable (pending, interrupted, failed, diverged, or running with a stale
    heartbeat or progress); None when another live worker runs it or it is done or pruned."""
    row = get_trials(engine, [trial_id])
    if row:
        release_dead_local(engine, row[0].study_id)
    with transaction(engine) as s:
        stmt = select(TrialRow).where(TrialRow.id == trial_id,
                                      or_(_runnable(stale_after_s), col(TrialRow.status).in_(["failed", "diverged"])))
        return _take_first(s, stmt)


def is_stale(row: TrialRow, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a running trial's worker is gone or hung: a dead pid on this host, or no heartbeat or no progress
    for ``stale_after_s`` (what ``claim_next`` takes over)."""
    if row.status != "running":
        return False
    if workers.dead_here(row.worker):
        return True
    cutoff = now() - timedelta(seconds=stale_after_s)
    return any(t is None or _aware(t) < cutoff for t in (row.heartbeat_at, row.progress_at or row.heartbeat_at))


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@through_outages
def heartbeat(engine: Engine, claim: Claim, progress: str | None = None) -> None:
    """Write the claim's heartbeat, and its progress (e.g. "pretrain step 120") with the time it last changed."""
    with transaction(engine) as s:
        row = fenced(s, claim, claim.trial_id)
        row.heartbeat_at = now()
        if progress is not None and progress != row.progress:
            row.progress, row.progress_at = progress, now()


class Heartbeat:
    """While a trial runs, a daemon thread writes its heartbeat and progress every ``interval_s`` in its own short
    transactions. ``progress`` is set by the training loop (a string that changes as it advances): a process that
    still beats but whose progress stands still for ``--stale-after`` is taken over. A failed write is retried at
    the next beat; a lost claim is kept in ``lost`` for the loop to stop on (``check``)."""

    def __init__(self, engine: Engine, claim: Claim, interval_s: float = HEARTBEAT_S):
        self.engine, self.claim, self.interval_s = engine, claim, interval_s
        self.progress: str | None = None
        self.lost: LostClaim | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.trial_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                heartbeat(self.engine, self.claim, self.progress)
            except LostClaim as exc:
                self.lost = exc
                return
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    def check(self) -> None:
        """Raise LostClaim when a beat found the claim gone."""
        if self.lost is not None:
            raise self.lost

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
