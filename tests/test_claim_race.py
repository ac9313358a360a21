"""Claim races with no training: N processes started at one barrier drain one study of M trivial trials through
``claim_next`` (claim, then close the trial under its claim), on SQLite and on PostgreSQL. Every trial must be
claimed exactly once, with no lock error and no lost claim. Guards ``BEGIN IMMEDIATE`` (SQLite) and ``FOR UPDATE
SKIP LOCKED`` (PostgreSQL): without either, the same race double-claims or fails with "database is locked"."""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import func
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select
from test_workers import pg_rows, pg_url  # noqa: F401 - pg_url is a fixture

from mae_lab.store.engine import connect
from mae_lab.store.queue import LostClaim, claim_next, claim_of, claim_trial, has_runnable
from mae_lab.store.reads import integrity_ok, study_trials
from mae_lab.store.tables import MetricRow
from mae_lab.store.writes import finish_trial, record_metrics, sync_study


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


# --- the row lock of a fenced write ------------------------------------------------------------------------------

def steady_writer(url: str, trial_id: int, seconds: float, out) -> None:
    """Claims the trial (taking it from whoever holds it) and writes one metric after another under that claim
    until the claim is lost, then claims again; reports every write that committed as (attempt, value)."""
    engine = connect(url, create=False)
    wrote, k, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        row = claim_trial(engine, trial_id, stale_after_s=0)
        if row is None:
            continue
        claim = claim_of(row)
        try:
            while time.monotonic() < end:
                k += 1
                record_metrics(engine, trial_id, "pretrain", k, {"loss": float(k)}, claim=claim)
                wrote.append((claim.attempt, k))
        except LostClaim:
            pass
    engine.dispose()
    out.put(wrote)


def test_a_fenced_write_cannot_land_after_a_postgres_takeover(pg_url: str):  # noqa: F811
    """One process writes under its claim while this one takes the trial over again and again and, right after
    each takeover commits, reads the newest write. A write of the superseded claim that this read did not see was
    committed after the takeover: the fence's row lock (FOR UPDATE in ``queue.fenced``) forbids that."""
    make_study(pg_url, 1)
    trial_id = 1
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    writer = ctx.Process(target=steady_writer, args=(pg_url, trial_id, 6.0, out))
    writer.start()
    engine, seen, end = connect(pg_url, create=False), {}, time.monotonic() + 6.0
    while time.monotonic() < end:
        row = claim_trial(engine, trial_id, stale_after_s=0)
        if row is not None:
            with Session(engine) as s:
                seen[row.attempts] = s.exec(select(func.max(MetricRow.epoch))
                                            .where(MetricRow.trial_id == trial_id)).one() or 0
        time.sleep(0.002)
    wrote = out.get(timeout=60)
    writer.join(timeout=60)
    engine.dispose()
    assert len(seen) >= 20 and len(wrote) >= 30, (len(seen), len(wrote))  # both sides were busy
    late = [(a, k) for a, k in wrote if a + 1 in seen and k > seen[a + 1]]
    assert late == [], f"{len(late)} writes committed under a claim already taken over, e.g. {late[:3]}"
