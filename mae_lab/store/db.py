"""The experiment database: SQLModel tables and the functions that read and write them.

Every state change of a trial, and every result, is written in one transaction. On SQLite every transaction is
``BEGIN IMMEDIATE`` (WAL mode, busy timeout), so two processes that claim trials at once are serialized instead of
failing with "database is locked"; on PostgreSQL a claim is ``SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED``. The
trials table is the work queue: a running trial carries its claim (worker host:node:pid, see workers.py, and attempt
number), a heartbeat and a progress note that a background thread refreshes while the trial runs (``Heartbeat``), so
a worker that died, or hangs while alive, is noticed and its trial claimed again; every later write of the old
worker is then refused (``LostClaim``). Schema changes migrate in place (MIGRATIONS); tests/fixtures holds a
database of an older release.

Over 400 lines on purpose: the tables, the queue and the writes stay together because every write checks the claim
inside its own transaction (``_fenced``), and every module reaches the database through this one.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Text, UniqueConstraint, and_, event, insert, inspect, or_, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlmodel import Field, Session, SQLModel, col, create_engine, delete, select

from mae_lab.store import workers

SCHEMA_VERSION = 5
# version reached -> statements that bring a database of the version before up to it (run inside one transaction)
MIGRATIONS = {
    2: ["ALTER TABLE mae_results ADD COLUMN pretrain_peak_mem_mib FLOAT"],
    3: [f"ALTER TABLE mae_trials ADD COLUMN {c}" for c in (
        "progress VARCHAR", "progress_at TIMESTAMP", "mae_lab_version VARCHAR", "device_name VARCHAR",
        "world_size INTEGER", "resolved_precision VARCHAR", "data_root VARCHAR", "data_fingerprint VARCHAR")]
       + [f"ALTER TABLE mae_results ADD COLUMN {c}" for c in (
        "linear_test_top1 FLOAT", "finetune_test_top1 FLOAT", "artifact_error TEXT")],
    4: ["ALTER TABLE mae_trials ADD COLUMN cpu_threads INTEGER"],
    5: ["ALTER TABLE mae_results ADD COLUMN result_copied BOOLEAN"],
}
DEFAULT_URL = "sqlite:///db/mae_lab.db"
STATUSES = ("pending", "running", "done", "failed", "diverged", "interrupted", "pruned")
FINAL = ("done", "failed", "diverged", "pruned")  # statuses a trial keeps until --rerun
HEARTBEAT_S = 30.0  # how often a running trial's heartbeat is written
STALE_AFTER_S = 600.0  # a running trial on another host with no heartbeat for this long is claimed again


class DbError(RuntimeError):
    """The database cannot be used (cannot be opened, newer schema, ...)."""


def now() -> datetime:
    return datetime.now(UTC)


class Meta(SQLModel, table=True):
    __tablename__ = "mae_meta"
    key: str = Field(primary_key=True)
    value: str


class StudyRow(SQLModel, table=True):
    __tablename__ = "mae_studies"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    description: str = ""
    paper: str | None = None
    path: str = ""
    spec_text: str = Field(sa_column=Column(Text))
    spec_hash: str
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)


class TrialRow(SQLModel, table=True):
    __tablename__ = "mae_trials"
    __table_args__ = (UniqueConstraint("study_id", "hash"),)
    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="mae_studies.id", index=True)
    position: int = 0  # order in the study's expansion
    active: bool = True  # False once the study file no longer expands to this trial
    hash: str = Field(index=True)
    pretrain_hash: str = Field(index=True)
    seed: int
    label: str = ""
    axes_json: str = "{}"
    spec_json: str = Field(sa_column=Column(Text))
    status: str = Field(default="pending", index=True)
    attempts: int = 0
    worker: str | None = None  # host:node:pid of the process running it (workers.py); (worker, attempts): its claim
    heartbeat_at: datetime | None = None
    progress: str | None = None  # e.g. "pretrain step 120" (schema 3)
    progress_at: datetime | None = None  # when progress last changed: a hung worker stops advancing it (schema 3)
    # provenance: how the trial ran (none of it changes the trial's identity)
    host: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    torch_version: str | None = None
    timm_version: str | None = None
    mae_lab_version: str | None = None  # schema 3
    device: str | None = None
    device_name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3" or the CPU model (schema 3)
    world_size: int | None = None  # processes that pretrained it (schema 3)
    cpu_threads: int | None = None  # torch's intra-op CPU threads per process: core-minutes = wall x this (schema 4)
    resolved_precision: str | None = None  # resolved pretraining precision: bf16 or fp32 (schema 3)
    data_root: str | None = None  # where the data was read from (schema 3)
    data_fingerprint: str | None = None  # the data's identity, part of the hash (schema 3)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    optuna_trial: int | None = None
    resumed_from_epoch: int | None = None  # the pretraining checkpoint epoch this attempt started from

    @property
    def axes(self) -> dict[str, Any]:
        return json.loads(self.axes_json)


class MetricRow(SQLModel, table=True):
    __tablename__ = "mae_metrics"
    __table_args__ = (UniqueConstraint("trial_id", "stage", "epoch", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    trial_id: int = Field(foreign_key="mae_trials.id", index=True)
    stage: str  # pretrain | linear | finetune
    epoch: int
    name: str
    value: float


class ResultRow(SQLModel, table=True):
    __tablename__ = "mae_results"
    id: int | None = Field(default=None, primary_key=True)
    trial_id: int = Field(foreign_key="mae_trials.id", unique=True)
    linear_top1: float | None = None  # the validation split (what search, pruning and probe_every read)
    finetune_top1: float | None = None  # the validation split
    linear_test_top1: float | None = None  # the test split; None without one (schema 3)
    finetune_test_top1: float | None = None  # the test split; None without one (schema 3)
    knn_top1: float | None = None
    pretrain_loss: float | None = None
    pretrain_wall_s: float | None = None
    pretrain_images_per_s: float | None = None
    pretrain_peak_mem_mib: float | None = None  # CUDA: peak allocated; CPU: the process's peak RSS (schema 2)
    linear_wall_s: float | None = None
    finetune_wall_s: float | None = None
    encoder_gflops: float | None = None  # per image, at the trial's mask ratio
    encoder_params: int | None = None
    total_params: int | None = None
    pretrain_reused: bool = False  # the pretraining was shared with another trial
    result_copied: bool | None = None  # a copy of a done trial's result (same spec hash): nothing ran (schema 5)
    artifact_error: str | None = Field(default=None, sa_column=Column(Text))  # FLOPs / recon failed after the result


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "mae_artifacts"
    __table_args__ = (UniqueConstraint("trial_id", "kind"),)
    id: int | None = Field(default=None, primary_key=True)
    trial_id: int = Field(foreign_key="mae_trials.id", index=True)
    kind: str  # checkpoint | recon
    path: str
    sha256: str


class CheckpointRow(SQLModel, table=True):
    """The pretraining checkpoint shared by every trial with the same pretrain hash."""

    __tablename__ = "mae_checkpoints"
    pretrain_hash: str = Field(primary_key=True)
    path: str
    sha256: str
    epoch: int
    updated_at: datetime = Field(default_factory=now)


# --- engine ---------------------------------------------------------------------------------------------------

def safe_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def serialize_sqlite(engine: Engine) -> None:
    """Make every transaction of a SQLite ``engine`` ``BEGIN IMMEDIATE`` (WAL, 60 s busy timeout): writers queue
    for the lock instead of failing with "database is locked". Call before the engine opens its connections."""
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def artifacts_dir(url: str | None = None) -> Path:
    """Where checkpoints and images go: ``MAE_LAB_ARTIFACTS``, else ``artifacts/`` beside a SQLite file, else
    ``db/artifacts``."""
    if os.environ.get("MAE_LAB_ARTIFACTS"):
        return Path(os.environ["MAE_LAB_ARTIFACTS"])
    try:
        parsed = make_url(resolve_url(url))
    except ArgumentError:
        return Path("db/artifacts")
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database).parent / "artifacts"
    return Path("db/artifacts")


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``MAE_LAB_DB``, else ``sqlite:///db/mae_lab.db``; a bare file path means a SQLite file."""
    url = url or os.environ.get("MAE_LAB_DB") or DEFAULT_URL
    return url if "://" in url else f"sqlite:///{url}"


def connect(url: str | None = None, *, create: bool = True) -> Engine:
    """Open (and create or check) the database at ``url`` (default: ``MAE_LAB_DB`` or ``sqlite:///db/mae_lab.db``)."""
    url = resolve_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DbError(f"database URL {safe_url(url)!r} cannot be parsed (expected e.g. sqlite:///db/mae_lab.db)") \
            from None
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database)
        if not path.exists() and not create:
            raise DbError(f"database {safe_url(url)} does not exist")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DbError(f"database {safe_url(url)} cannot be opened: {exc}") from None
    try:
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if is_sqlite else {"pool_pre_ping": True}
        engine = create_engine(url, **kwargs)
        if is_sqlite:
            serialize_sqlite(engine)
        _check_schema(engine, create)
    except DbError:
        raise
    except ModuleNotFoundError as exc:  # the URL's driver: postgresql:// needs psycopg, the extra mae-lab[postgres]
        extra = " (pip install 'mae-lab[postgres]')" if parsed.get_backend_name() == "postgresql" else ""
        raise DbError(f"database {safe_url(url)} needs the Python package {exc.name!r}{extra}") from None
    except (SQLAlchemyError, ImportError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise DbError(f"database {safe_url(url)} cannot be opened: {reason}") from None
    return engine


def _check_schema(engine: Engine, create: bool) -> None:
    """Refuse a newer schema, migrate an older one (MIGRATIONS), create the tables when asked. Processes that open
    a database at once queue on a lock (SQLite: the immediate transaction; PostgreSQL: an advisory lock) instead of
    racing on CREATE TABLE or a migration."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7271101)"))
        version = None
        if inspect(conn).has_table(Meta.__tablename__):
            version = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
        if version is not None and int(version) > SCHEMA_VERSION:
            raise DbError(f"database {safe_url(str(engine.url))} has schema version {version}, newer than this "
                          f"mae-lab's ({SCHEMA_VERSION}): upgrade mae-lab to use it")
        if version is not None and int(version) < SCHEMA_VERSION:
            for v in range(int(version) + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v]:
                    conn.execute(text(statement))
            conn.execute(Meta.__table__.update().where(Meta.key == "schema_version")
                         .values(value=str(SCHEMA_VERSION)))
        if create:
            SQLModel.metadata.create_all(conn)
            if version is None:
                conn.execute(insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """A session whose work commits together or not at all."""
    with Session(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


# --- studies and trials ---------------------------------------------------------------------------------------

def worker_id() -> str:
    return workers.worker_id()


def sync_study(engine: Engine, *, name: str, description: str, paper: str | None, path: str, spec_text: str,
               spec_hash: str, trials: list[dict[str, Any]], deactivate_missing: bool = True) -> StudyRow:
    """Create or update the study row and insert its trials that are not there yet, in one transaction.

    ``trials``: dicts with hash, pretrain_hash, seed, label, axes_json, spec_json, in expansion order. Trials of
    the study missing from ``trials`` become inactive unless ``deactivate_missing`` is False (a search adds its
    trials as it samples them). Workers that sync the same study at once are fine: the loser of a race on the
    unique keys retries and finds the winner's rows.
    """
    for attempt in range(5):
        try:
            return _sync_study(engine, name=name, description=description, paper=paper, path=path,
                               spec_text=spec_text, spec_hash=spec_hash, trials=trials,
                               deactivate_missing=deactivate_missing)
        except IntegrityError:
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


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


def add_trial(engine: Engine, study_id: int, trial: dict[str, Any], *, optuna_trial: int | None = None
              ) -> TrialRow:
    """The study's trial with ``trial["hash"]``, inserted (pending) if it is not there yet; links the Optuna trial
    number when given and the row has none. Safe against a concurrent insert of the same trial."""
    for attempt in range(5):
        try:
            with transaction(engine) as s:
                row = s.exec(select(TrialRow).where(TrialRow.study_id == study_id,
                                                    TrialRow.hash == trial["hash"])).first()
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
        except IntegrityError:
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def reset_trials(engine: Engine, study_id: int, hashes: list[str]) -> list[CheckpointRow]:
    """Set the given trials back to pending and drop their metrics, results, artifacts and pretraining checkpoint
    records (``--rerun``); return the dropped checkpoint records so the caller can delete their files."""
    with transaction(engine) as s:
        rows = s.exec(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.hash.in_(hashes))).all()
        ids = [r.id for r in rows]
        for model in (MetricRow, ResultRow, ArtifactRow):
            s.exec(delete(model).where(model.trial_id.in_(ids)))
        for r in rows:
            r.status, r.error, r.worker, r.started_at, r.ended_at, r.attempts = "pending", None, None, None, None, 0
            r.resumed_from_epoch = None
        ckpts = s.exec(select(CheckpointRow).where(CheckpointRow.pretrain_hash.in_([r.pretrain_hash for r in rows])))
        dropped = list(ckpts)
        for c in dropped:
            s.delete(c)
        return dropped


# --- the queue: claims, heartbeats and fenced writes ----------------------------------------------------------
# A claim is (trial, worker, attempt). Every write a worker makes for its trial after claiming it checks, in the
# same transaction, that the row still carries its claim; a worker whose trial was taken over (it looked dead or
# hung) gets LostClaim and stops, so it cannot overwrite its successor's metrics, checkpoint record or result.

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
    return Claim(row.id, row.worker, row.attempts)


def _fenced(s: Session, claim: Claim | None, trial_id: int) -> TrialRow:
    """The trial row, locked on PostgreSQL; raises LostClaim when ``claim`` is given and no longer holds it."""
    stmt = select(TrialRow).where(TrialRow.id == trial_id)
    if s.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = s.exec(stmt).one()
    if claim is not None and (row.status != "running" or row.worker != claim.worker or row.attempts != claim.attempt):
        raise LostClaim(claim, f"{row.worker} (attempt {row.attempts})" if row.status == "running" else row.status)
    return row


def _runnable(stale_after_s: float):
    """SQL: pending or interrupted, or running with no heartbeat or no progress for ``stale_after_s`` (a dead
    worker on another host, or a hung one that still beats)."""
    cutoff = now() - timedelta(seconds=stale_after_s)
    stale = or_(TrialRow.heartbeat_at == None, TrialRow.heartbeat_at < cutoff,  # noqa: E711
                TrialRow.progress_at < cutoff)
    return or_(TrialRow.status.in_(["pending", "interrupted"]), and_(TrialRow.status == "running", stale))


def _take(row: TrialRow) -> None:
    row.status, row.worker, row.progress = "running", worker_id(), None
    row.heartbeat_at = row.progress_at = now()
    row.attempts += 1
    row.started_at = row.started_at or now()
    row.ended_at = None


def release_dead_local(engine: Engine, study_id: int) -> int:
    """Mark interrupted the running trials whose worker is a dead process of this machine (``workers.dead_here``:
    same host, boot and PID namespace; no need to wait for the heartbeat to go stale); returns how many. Each update
    is fenced by the dead worker's claim."""
    with Session(engine) as s:
        rows = s.exec(select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.status == "running",
                                             TrialRow.worker.startswith(workers.local_prefix()))).all()
    dead = [claim_of(r) for r in rows if workers.dead_here(r.worker)]
    for claim in dead:
        with transaction(engine) as s:
            try:
                row = _fenced(s, claim, claim.trial_id)
            except LostClaim:
                continue
            row.status, row.worker, row.error = "interrupted", None, f"worker {claim.worker} died"
    return len(dead)


def _take_first(s: Session, stmt) -> TrialRow | None:
    """Claim the first row `stmt` selects, inside the caller's transaction; None when it selects none."""
    if s.bind.dialect.name == "postgresql":  # SQLite is serialized by BEGIN IMMEDIATE instead
        stmt = stmt.with_for_update(skip_locked=True)
    row = s.exec(stmt).first()
    if row is None:
        return None
    _take(row)
    s.add(row)
    return row


def claim_next(engine: Engine, study_id: int, *, stale_after_s: float = STALE_AFTER_S,
               skip: set[int] = frozenset()) -> TrialRow | None:
    """Claim the next runnable trial of the study (in study order): one row per transaction, chosen in SQL with
    LIMIT 1 (FOR UPDATE SKIP LOCKED on PostgreSQL, so workers claiming at the same instant take different rows)."""
    release_dead_local(engine, study_id)
    with transaction(engine) as s:
        stmt = (select(TrialRow)
                .where(TrialRow.study_id == study_id, TrialRow.active == True,  # noqa: E712
                       _runnable(stale_after_s), TrialRow.id.notin_(sorted(skip)))
                .order_by(TrialRow.position, TrialRow.id).limit(1))
        return _take_first(s, stmt)


def has_runnable(engine: Engine, study_id: int, *, stale_after_s: float = STALE_AFTER_S,
                 skip: set[int] = frozenset()) -> bool:
    """Whether a trial of the study is runnable now (a claim that found none may have lost a race for it)."""
    with Session(engine) as s:
        return s.exec(select(TrialRow.id).where(TrialRow.study_id == study_id, TrialRow.active == True,  # noqa
                                                _runnable(stale_after_s), TrialRow.id.notin_(sorted(skip)))
                      .limit(1)).first() is not None


def claim_trial(engine: Engine, trial_id: int, *, stale_after_s: float = STALE_AFTER_S) -> TrialRow | None:
    """Claim one given trial if it is runnable (pending, interrupted, failed, diverged, or running with a stale
    heartbeat or progress); None when another live worker runs it or it is done or pruned."""
    row = get_trials(engine, [trial_id])
    if row:
        release_dead_local(engine, row[0].study_id)
    with transaction(engine) as s:
        stmt = select(TrialRow).where(TrialRow.id == trial_id,
                                      or_(_runnable(stale_after_s), TrialRow.status.in_(["failed", "diverged"])))
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


def heartbeat(engine: Engine, claim: Claim, progress: str | None = None) -> None:
    """Write the claim's heartbeat, and its progress (e.g. "pretrain step 120") with the time it last changed."""
    with transaction(engine) as s:
        row = _fenced(s, claim, claim.trial_id)
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


def set_provenance(engine: Engine, trial_id: int, *, claim: Claim | None = None, **fields: Any) -> None:
    with transaction(engine) as s:
        row = _fenced(s, claim, trial_id)
        for k, v in fields.items():
            setattr(row, k, v)


def record_metrics(engine: Engine, trial_id: int, stage: str, epoch: int, values: dict[str, float], *,
                   claim: Claim | None = None) -> None:
    """Write one epoch's metrics, replacing any earlier row for the same (trial, stage, epoch, name); fenced by
    ``claim`` when given."""
    with transaction(engine) as s:
        _fenced(s, claim, trial_id)
        names = list(values)
        s.exec(delete(MetricRow).where(MetricRow.trial_id == trial_id, MetricRow.stage == stage,
                                       MetricRow.epoch == epoch, MetricRow.name.in_(names)))
        for name, value in values.items():
            s.add(MetricRow(trial_id=trial_id, stage=stage, epoch=epoch, name=name, value=float(value)))


def clear_metrics(engine: Engine, trial_id: int, stage: str, *, claim: Claim | None = None) -> None:
    with transaction(engine) as s:
        _fenced(s, claim, trial_id)
        s.exec(delete(MetricRow).where(MetricRow.trial_id == trial_id, MetricRow.stage == stage))


def record_checkpoint(engine: Engine, pretrain_hash: str, path: str, sha256: str, epoch: int, *,
                      claim: Claim | None = None) -> None:
    with transaction(engine) as s:
        if claim is not None:
            _fenced(s, claim, claim.trial_id)
        row = s.get(CheckpointRow, pretrain_hash)
        if row is None:
            s.add(CheckpointRow(pretrain_hash=pretrain_hash, path=path, sha256=sha256, epoch=epoch))
        else:
            row.path, row.sha256, row.epoch, row.updated_at = path, sha256, epoch, now()


def find_done(engine: Engine, trial_hash: str) -> tuple[TrialRow, ResultRow] | None:
    """A done trial with this spec hash and its result, in any study (the earliest), or None."""
    with Session(engine) as s:
        row = s.exec(select(TrialRow, ResultRow).join(ResultRow, ResultRow.trial_id == TrialRow.id)
                     .where(TrialRow.hash == trial_hash, TrialRow.status == "done").order_by(TrialRow.id)).first()
        return (row[0], row[1]) if row is not None else None


def done_with_results(engine: Engine) -> list[tuple[TrialRow, ResultRow]]:
    """Every done trial with its result, in any study."""
    with Session(engine) as s:
        return [(t, r) for t, r in s.exec(select(TrialRow, ResultRow).join(ResultRow, ResultRow.trial_id == TrialRow.id)
                                          .where(TrialRow.status == "done").order_by(TrialRow.id))]


# provenance of the run that made a result: a copy of the result carries it too
RUN_PROVENANCE = ("host", "git_commit", "git_dirty", "torch_version", "timm_version", "mae_lab_version", "device",
                  "device_name", "world_size", "cpu_threads", "resolved_precision", "data_root", "data_fingerprint")


def adopt_result(engine: Engine, trial_id: int, source: ResultRow, claim: Claim | None = None) -> None:
    """Close a trial as done with a copy of a done trial's result (the same spec hash, in another study or a search):
    its metrics, artifacts and the provenance of the run that made it come along, nothing is trained or evaluated,
    and ``result_copied`` keeps its times from being counted twice."""
    with transaction(engine) as s:
        row = _fenced(s, claim, trial_id)
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


def get_trials(engine: Engine, ids: list[int]) -> list[TrialRow]:
    with Session(engine) as s:
        rows = {r.id: r for r in s.exec(select(TrialRow).where(TrialRow.id.in_(ids)))}
        return [rows[i] for i in ids if i in rows]


def get_result(engine: Engine, trial_id: int) -> ResultRow | None:
    with Session(engine) as s:
        return s.exec(select(ResultRow).where(ResultRow.trial_id == trial_id)).first()


def get_checkpoint(engine: Engine, pretrain_hash: str) -> CheckpointRow | None:
    with Session(engine) as s:
        return s.get(CheckpointRow, pretrain_hash)


def finish_trial(engine: Engine, trial_id: int, status: str, *, result: dict[str, Any] | None = None,
                 artifacts: dict[str, tuple[str, str]] | None = None, error: str | None = None,
                 claim: Claim | None = None) -> None:
    """Close a trial: its status, result row and artifacts land together or not at all; fenced by ``claim``."""
    with transaction(engine) as s:
        row = _fenced(s, claim, trial_id)
        row.status, row.error, row.ended_at, row.worker = status, error, now(), None
        if result is not None:
            s.exec(delete(ResultRow).where(ResultRow.trial_id == trial_id))
            s.add(ResultRow(trial_id=trial_id, **result))
        _put_artifacts(s, trial_id, artifacts)


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
        s.exec(delete(ArtifactRow).where(ArtifactRow.trial_id == trial_id, ArtifactRow.kind == kind))
        s.add(ArtifactRow(trial_id=trial_id, kind=kind, path=path, sha256=sha))


# --- reading --------------------------------------------------------------------------------------------------

def get_study(engine: Engine, name: str) -> StudyRow | None:
    with Session(engine) as s:
        return s.exec(select(StudyRow).where(StudyRow.name == name)).first()


def study_name(engine: Engine, study_id: int) -> str:
    with Session(engine) as s:
        return s.exec(select(StudyRow.name).where(StudyRow.id == study_id)).one()


def list_studies(engine: Engine) -> list[tuple[StudyRow, dict[str, int]]]:
    """Every study with its active trials counted by status."""
    out = []
    with Session(engine) as s:
        for study in s.exec(select(StudyRow).order_by(StudyRow.name)):
            counts = {st: 0 for st in STATUSES}
            for t in s.exec(select(TrialRow).where(TrialRow.study_id == study.id, TrialRow.active == True)):  # noqa
                counts[t.status] = counts.get(t.status, 0) + 1
            out.append((study, counts))
    return out


def study_trials(engine: Engine, study_id: int, *, active_only: bool = True
                 ) -> list[tuple[TrialRow, ResultRow | None]]:
    with Session(engine) as s:
        stmt = select(TrialRow).where(TrialRow.study_id == study_id)
        if active_only:
            stmt = stmt.where(TrialRow.active == True)  # noqa: E712
        trials = s.exec(stmt.order_by(TrialRow.position)).all()
        results = {r.trial_id: r for r in s.exec(select(ResultRow).where(
            ResultRow.trial_id.in_([t.id for t in trials])))}
        return [(t, results.get(t.id)) for t in trials]


def pretraining_results(engine: Engine, pretrain_hashes: set[str]) -> dict[str, ResultRow]:
    """Per pretraining hash, the result of a done trial (of any study) that ran that pretraining rather than
    reusing it: where a shared pretraining's time, speed and memory were measured."""
    with Session(engine) as s:
        rows = s.exec(select(TrialRow.pretrain_hash, ResultRow)
                      .join(ResultRow, ResultRow.trial_id == TrialRow.id)
                      .where(TrialRow.pretrain_hash.in_(sorted(pretrain_hashes)), TrialRow.status == "done",
                             ResultRow.pretrain_reused == False)  # noqa: E712
                      .order_by(TrialRow.id)).all()
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
        rows = s.exec(select(TrialRow).where(TrialRow.hash.startswith(ref))).all()
        return rows[0] if len(rows) == 1 else None


def trial_details(engine: Engine, trial_id: int) -> tuple[list[MetricRow], ResultRow | None, list[ArtifactRow]]:
    with Session(engine) as s:
        metrics = s.exec(select(MetricRow).where(MetricRow.trial_id == trial_id)
                         .order_by(MetricRow.stage, MetricRow.epoch, MetricRow.name)).all()
        result = s.exec(select(ResultRow).where(ResultRow.trial_id == trial_id)).first()
        arts = s.exec(select(ArtifactRow).where(ArtifactRow.trial_id == trial_id)).all()
        return list(metrics), result, list(arts)


def integrity_ok(engine: Engine) -> bool:
    """SQLite's integrity check (True on other backends)."""
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as c:
        return c.execute(text("PRAGMA integrity_check")).scalar() == "ok"
