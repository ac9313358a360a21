"""Claim races with no training: N processes started at one barrier drain one study of M trivial trials through
``claim_next`` (claim, then close the trial under its claim), on SQLite and on PostgreSQL. Every trial must be
claimed exactly once, with no lock error and no lost claim. Guards ``BEGIN IMMEDIATE`` (SQLite) and ``FOR UPDATE
SKIP LOCKED`` (PostgreSQL): without either, the same race double-claims or fails with "database is locked"."""
from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from pathlib import Path

from sqlalchemy.exc import OperationalError
from test_workers import pg_rows, pg_url  # noqa: F401 - pg_url is a fixture

from mae_lab.store.engine import connect
from mae_lab.store.queue import LostClaim, claim_next, claim_of, has_runnable
from mae_lab.store.reads import integrity_ok, study_trials
from mae_lab.store.writes import finish_trial, sync_study


def make_study(url: str, m: int) -> int:
    engine = connect(url)
    study = sync_study(engine, name="race", description="", paper=None, path="race.toml", spec_text="",
                          spec_hash="x", trials=[{"hash": f"h{i}", "pretrain_hash": f"p{i}", "seed": i, "label": "",
                                                  "axes_json": "{}", "spec_json": "{}"} for i in range(m)])
    engine.dispose()
    return study.id


def drain(url: str, study_id: int, start, out) -> None:
    """One worker: claim until nothing is runnable; report the claims it got and the errors it met."""
    engine = connect(url, create=False)
    claims, errors = [], []
    start.wait()
    while True:
        try:
            row = claim_next(engine, study_id)
            if row is None:
                if has_runnable(engine, study_id):
                    continue  # another worker's claim held the row we reached for
                break
            claims.append((row.id, row.attempts))
            finish_trial(engine, row.id, "done", result={"linear_top1": 0.5}, claim=claim_of(row))
        except (OperationalError, LostClaim) as exc:
            errors.append(str(exc).splitlines()[0])
    engine.dispose()
    out.put((claims, errors))


def race(url: str, study_id: int, n: int) -> tuple[list[tuple[int, int]], list[str]]:
    ctx = mp.get_context("fork")  # the workers start at once: no re-import per process
    start, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=drain, args=(url, study_id, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return [c for claims, _ in reports for c in claims], [e for _, errors in reports for e in errors]


def check(claims: list[tuple[int, int]], errors: list[str], m: int) -> None:
    twice = {i: k for i, k in Counter(i for i, _ in claims).items() if k > 1}
    assert not errors and not twice, (f"{len(twice)} trials claimed more than once; {len(errors)} errors, e.g. "
                                      f"{errors[:1]}")
    assert len(claims) == m and all(attempt == 1 for _, attempt in claims)


def test_sqlite_claim_race(tmp_path: Path):
    url, m = f"sqlite:///{tmp_path / 'race.db'}", 200
    claims, errors = race(url, make_study(url, m), n=4)
    check(claims, errors, m)
    engine = connect(url, create=False)
    assert integrity_ok(engine)
    assert sorted((t.status, t.attempts) for t, _ in study_trials(engine, 1)) == [("done", 1)] * m


def test_postgres_claim_race(pg_url: str):  # noqa: F811
    m = 300
    claims, errors = race(pg_url, make_study(pg_url, m), n=6)
    check(claims, errors, m)
    assert pg_rows(pg_url, "SELECT status, attempts, count(*) FROM mae_trials GROUP BY 1, 2") == [("done", 1, m)]
