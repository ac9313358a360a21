"""Riding out a database server that goes away: a call that loses its connection is retried, with backoff, until
the server answers again or ``outage_limit_s()`` has passed, and then ends with ``DbUnavailable`` (the command line:
one line and exit 75).

Every function of ``store`` that a running study calls is one or a few transactions that commit together or roll
back, so running it again after a lost connection is safe: the transaction that was cut never committed. (A commit
whose acknowledgement alone was lost is repeated: for a claim, the first claimed row stays running under this live
worker until its heartbeat goes stale and another worker takes it over.) Only a lost or refused PostgreSQL connection
is retried; SQLite's "database is locked" keeps its busy timeout and its error. A full disk under a SQLite database
is not retried: the call's transaction rolled back, and the command ends with ``DbFull`` (one line, exit 74).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from mae_lab.store.engine import DbError

P = ParamSpec("P")
T = TypeVar("T")
OUTAGE_LIMIT_S = 300.0  # default: how long a worker waits for the database server to come back
EXIT_UNAVAILABLE = 75  # sysexits' EX_TEMPFAIL: try again later (the trials stay resumable)
EXIT_DISK_FULL = 74  # sysexits' EX_IOERR


class DbUnavailable(DbError):
    """The database server did not answer for the whole outage limit."""

    exit_code = EXIT_UNAVAILABLE


class DbFull(DbError):
    """The disk under a SQLite database is full: what was being written rolled back."""

    exit_code = EXIT_DISK_FULL


def outage_limit_s() -> float:
    """``MAE_LAB_DB_OUTAGE_S`` seconds, else ``OUTAGE_LIMIT_S``; DbError (one line, exit 2) when it is not a
    number of seconds >= 0."""
    raw = os.environ.get("MAE_LAB_DB_OUTAGE_S") or str(OUTAGE_LIMIT_S)
    try:
        limit = float(raw)
    except ValueError:
        limit = -1.0
    if not limit >= 0:  # also NaN
        raise DbError(f"MAE_LAB_DB_OUTAGE_S={raw!r}: expected a number of seconds >= 0")
    return limit


def lost_connection(exc: BaseException) -> bool:
    """A PostgreSQL connection that was cut, refused or closed (not an error in the statement itself)."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, InterfaceError)) and type(exc.orig).__module__.startswith("psycopg")


def disk_full(exc: DBAPIError) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full"), or the I/O error it gives when its journal cannot grow."""
    code = getattr(exc.orig, "sqlite_errorname", "")
    return code in ("SQLITE_FULL", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_FSYNC") or \
        "database or disk is full" in str(exc.orig)


def through_outages(fn: Callable[P, T]) -> Callable[P, T]:
    """``fn``, called again after a lost connection (waits of 0.25 s doubling to 8 s) until it succeeds or the
    outage limit has passed since the first failure (then ``DbUnavailable``)."""
    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        first, wait, limit = None, 0.25, outage_limit_s()  # a bad limit is refused before any call
        while True:
            try:
                return fn(*args, **kwargs)
            except DBAPIError as exc:
                if disk_full(exc):
                    where = args[0].url.render_as_string() if args and isinstance(args[0], Engine) else "the database"
                    raise DbFull(f"{where}: its disk is full ({exc.orig}): nothing was half-written (the write "
                                 "rolled back); free space on it and run again, the running trial resumes") from None
                if not lost_connection(exc):
                    raise
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
                if first is None:
                    first = time.monotonic()
                    print(f"database connection lost ({reason}); retrying for up to {limit:g} s",
                          file=sys.stderr, flush=True)
                if time.monotonic() - first > limit:
                    raise DbUnavailable(f"the database server did not answer for {limit:g} s "
                                        f"(MAE_LAB_DB_OUTAGE_S): {reason}; the running trials stay resumable: "
                                        "start the workers again once it is back") from None
                time.sleep(wait)
                wait = min(2 * wait, 8.0)
    return call
