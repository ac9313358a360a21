"""Optuna's storage opened by several processes at once on a new SQLite file: they take turns creating Optuna's
tables (without the lock, 12 of 24 processes failed here with "table studies already exists" or a duplicate
alembic_version; two `mae-lab search` Ray tasks started together hit it)."""
from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna  # noqa: F401 - loaded before the fork, so the processes reach storage() together


def open_storage(url: str, barrier) -> None:
    from mae_lab.store.optuna_storage import storage

    barrier.wait()
    storage(url)


def test_processes_opening_a_new_sqlite_storage_at_once_all_succeed(tmp_path: Path):
    ctx = mp.get_context("fork")
    failed = 0
    for round_ in range(4):
        url = f"sqlite:///{tmp_path}/race{round_}.db"
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=open_storage, args=(url, barrier)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        failed += sum(p.exitcode != 0 for p in procs)
    assert failed == 0
