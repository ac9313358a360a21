"""Optuna's RDB storage on mae-lab's database URL, shared by the search loop and the search report."""
from __future__ import annotations

import fcntl
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from mae_lab.store.engine import resolve_url, serialize_sqlite

PRIOR = "prior"  # user attribute of a trial told from results already in the database


def storage(url: str | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the same URL as mae-lab's tables (default resolved as ``connect`` does). On
    SQLite its transactions are made ``BEGIN IMMEDIATE`` too, so local processes queue instead of failing. Processes
    that open it at once take turns creating Optuna's tables (two `mae-lab search` started together on a new SQLite
    file failed with "table studies already exists")."""
    url = resolve_url(url)
    sqlite = make_url(url).get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    database = make_url(url).database
    if sqlite and database and database != ":memory:":  # the same on one machine, on a lock file beside the file
        # (not on the database file itself: closing any descriptor of it drops SQLite's own POSIX locks)
        with open(f"{database}.optuna-lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            st = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    elif sqlite:
        st = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    else:  # processes that start at once queue on a lock instead of racing on Optuna's CREATE TABLE
        lock = create_engine(url, poolclass=NullPool)
        try:
            with lock.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(7271102)"))
                try:
                    st = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(7271102)"))
        finally:
            lock.dispose()
    if sqlite:
        st.engine.dispose()
        serialize_sqlite(st.engine)
    return st


def searched(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if PRIOR not in t.user_attrs]
