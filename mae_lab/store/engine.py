"""Opening the experiment database: URLs, the engine (SQLite serialized with BEGIN IMMEDIATE), schema checks and
in-place migrations, and transactions.

On SQLite every transaction is ``BEGIN IMMEDIATE`` (WAL mode, busy timeout), so two processes that claim trials at
once are serialized instead of failing with "database is locked". Schema changes migrate in place (MIGRATIONS);
tests/fixtures holds a database of an older release.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlmodel import Session, SQLModel, col, create_engine, select, update

from mae_lab.errors import BadInput
from mae_lab.store.tables import SCHEMA_VERSION, Meta, TrialRow

DEFAULT_URL = "sqlite:///db/mae_lab.db"


def _provenance_added(version: int) -> list[str]:
    """The provenance columns (tables.RunProvenance) that the migration to ``version`` adds."""
    return [f"ALTER TABLE mae_trials ADD COLUMN {c.name} {c.type}" for c in inspect(TrialRow).columns
            if c.info.get("since") == version]


# version reached -> statements that bring a database of the version before up to it (run inside one transaction)
MIGRATIONS = {
    2: ["ALTER TABLE mae_results ADD COLUMN pretrain_peak_mem_mib FLOAT"],
    3: ["ALTER TABLE mae_trials ADD COLUMN progress VARCHAR", "ALTER TABLE mae_trials ADD COLUMN progress_at TIMESTAMP",
        *_provenance_added(3)]
       + [f"ALTER TABLE mae_results ADD COLUMN {c}" for c in (
        "linear_test_top1 FLOAT", "finetune_test_top1 FLOAT", "artifact_error TEXT")],
    4: _provenance_added(4),
    5: ["ALTER TABLE mae_results ADD COLUMN result_copied BOOLEAN"],
    6: _provenance_added(6),
    7: _provenance_added(7),
}


class DbError(BadInput, RuntimeError):
    """The database cannot be used (cannot be opened, newer schema, ...)."""


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
            conn.execute(update(Meta).where(col(Meta.key) == "schema_version").values(value=str(SCHEMA_VERSION)))
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
