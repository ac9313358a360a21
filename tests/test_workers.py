"""Many workers, one study: `mae-lab worker` processes drain a grid through the trials table, each trial claimed by
exactly one of them; a worker killed mid-trial has its trial taken over and resumed by another.

SQLite serves the workers of one machine; PostgreSQL (``MAE_LAB_TEST_PG``, a server URL whose user may create
databases; ``.ci/run`` starts one) the workers of many. Without it the PostgreSQL tests are skipped, except in CI.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlmodel import Session, select
from test_resume import mae_lab

from mae_lab.store import workers
from mae_lab.store.engine import connect, transaction
from mae_lab.store.queue import Claim, Heartbeat, LostClaim, claim_next, claim_of, worker_id
from mae_lab.store.reads import get_trials
from mae_lab.store.tables import TrialRow, now
from mae_lab.store.writes import finish_trial, record_metrics, sync_study


def grid_study(name: str, ratios: list[float], seeds: list[int], epochs: int = 2) -> str:
    return f"""# mae-lab worker {name}.toml
[study]
name = "{name}"
seeds = {seeds}

[model]
preset = "vit_digits"

[pretrain]
epochs = {epochs}
batch_size = 128

[eval]
linear = {{ epochs = 2, warmup_epochs = 1 }}
finetune = {{ enabled = false }}

[grid]
"model.mask_ratio" = {ratios}
"""


def finish(procs, timeout: float = 600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "locked" not in out.lower(), out
    return outs


# --- SQLite: the workers of one machine ---------------------------------------------------------------------------

@pytest.mark.slow
def test_two_sqlite_workers_drain_a_grid_once(workdir: Path):
    (workdir / "six.toml").write_text(grid_study("six", [0.5, 0.75, 0.9], [0, 1]))
    outs = finish([mae_lab("worker", "six.toml", "--device", "cpu", "--poll", "0.5", cwd=workdir)
                   for _ in range(2)])
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        trials = c.execute("SELECT status, attempts FROM mae_trials").fetchall()
        assert len(trials) == 6 and all(t == ("done", 1) for t in trials), trials
        assert c.execute("SELECT count(*) FROM mae_results").fetchone() == (6,)
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert sum(out.count(": done") for out in outs) == 6  # one line per trial, from whichever worker ran it


def test_heartbeat_thread_and_stale_after(workdir: Path):
    """The background heartbeat keeps a trial of another host alive; without it, --stale-after decides."""
    engine = connect("sqlite:///db/mae_lab.db")
    study = sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text="", spec_hash="x",
                          trials=[{"hash": "h", "pretrain_hash": "p", "seed": 0, "label": "", "axes_json": "{}",
                                   "spec_json": "{}"}])
    row = claim_next(engine, study.id)
    with transaction(engine) as s:  # pretend a worker on another machine holds it, last seen 120 s ago
        r = s.get(TrialRow, row.id)
        r.worker, r.heartbeat_at = "elsewhere:1", now() - timedelta(seconds=120)
    assert claim_next(engine, study.id, stale_after_s=600) is None
    with Heartbeat(engine, Claim(row.id, "elsewhere:1", row.attempts), interval_s=0.05) as beat:
        beat.progress = "pretrain step 1"
        deadline = time.monotonic() + 30
        while get_trials(engine, [row.id])[0].progress != "pretrain step 1":  # the thread's first beat lands
            assert time.monotonic() < deadline and beat.lost is None
            time.sleep(0.01)
    assert beat.lost is None and get_trials(engine, [row.id])[0].progress == "pretrain step 1"
    assert claim_next(engine, study.id, stale_after_s=60) is None  # the thread's beats are fresh
    with transaction(engine) as s:
        s.get(TrialRow, row.id).heartbeat_at = now() - timedelta(seconds=120)
    again = claim_next(engine, study.id, stale_after_s=60)
    assert again is not None and again.attempts == 2 and again.worker == worker_id()


# --- PostgreSQL: the workers of many machines ---------------------------------------------------------------------

@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the server of MAE_LAB_TEST_PG, dropped afterwards."""
    server = os.environ.get("MAE_LAB_TEST_PG")
    if not server:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: .ci/run sets MAE_LAB_TEST_PG")
        pytest.skip("MAE_LAB_TEST_PG is not set (a PostgreSQL server URL; .ci/run starts one)")
    name = f"mae_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pg_rows(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(sql))]
    finally:
        engine.dispose()


@pytest.mark.slow
def test_two_postgres_workers_drain_a_grid_once(workdir: Path, pg_url: str):
    (workdir / "eight.toml").write_text(grid_study("eight", [0.25, 0.5, 0.75, 0.9], [0, 1]))
    outs = finish([mae_lab("worker", "eight.toml", "--db", pg_url, "--device", "cpu", "--poll", "0.5", cwd=workdir)
                   for _ in range(2)])
    trials = pg_rows(pg_url, "SELECT status, attempts, worker FROM mae_trials")
    assert len(trials) == 8 and all(t[:2] == ("done", 1) for t in trials), trials
    assert pg_rows(pg_url, "SELECT count(*) FROM mae_results") == [(8,)]
    assert sum(out.count(": done") for out in outs) == 8
    assert all(out.count(": done") >= 1 for out in outs), outs  # both took part


@pytest.mark.slow
def test_a_killed_postgres_worker_is_taken_over(workdir: Path, pg_url: str):
    (workdir / "kill.toml").write_text(grid_study("kill", [0.5, 0.75], [0, 1], epochs=8))
    victim = mae_lab("worker", "kill.toml", "--db", pg_url, "--device", "cpu", cwd=workdir)
    other = mae_lab("worker", "kill.toml", "--db", pg_url, "--device", "cpu", "--poll", "0.5", cwd=workdir)
    me = f"{workers.local_prefix()}{victim.pid}"
    deadline = time.time() + 240
    while True:  # wait until the victim is in the middle of a pretraining, past its first checkpoint
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "the worker never got past a pretraining epoch"
        try:
            got = pg_rows(pg_url, "SELECT t.id FROM mae_trials t JOIN mae_metrics m ON m.trial_id = t.id "
                                  f"WHERE t.status = 'running' AND t.worker = '{me}' AND m.stage = 'pretrain' "
                                  "AND m.epoch >= 2")
        except Exception:  # noqa: BLE001 - the tables may not exist yet
            got = []
        if got:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = got[0][0]
    assert pg_rows(pg_url, f"SELECT status, worker FROM mae_trials WHERE id = {killed}") == [("running", me)]

    out = finish([other])[0]
    killed_hash = pg_rows(pg_url, f"SELECT hash FROM mae_trials WHERE id = {killed}")[0][0]
    assert f"{killed_hash[:8]} " in out and ": done" in out  # the other worker finished the killed worker's trial
    trials = dict((r[0], r[1:]) for r in pg_rows(
        pg_url, "SELECT id, status, attempts, resumed_from_epoch FROM mae_trials"))
    assert len(trials) == 4 and all(t[0] == "done" for t in trials.values()), trials
    status, attempts, resumed = trials[killed]
    assert attempts == 2 and resumed >= 2  # retried once, from the checkpoint the killed worker left
    assert all(t[1] == 1 for i, t in trials.items() if i != killed)
    assert pg_rows(pg_url, "SELECT count(*) FROM mae_results") == [(4,)]
    dup = pg_rows(pg_url, "SELECT count(*) FROM (SELECT trial_id, stage, epoch, name FROM mae_metrics "
                          "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d")
    assert dup == [(0,)]


@pytest.mark.slow
def test_search_on_postgres(workdir: Path, pg_url: str):
    """The Optuna study lives in the same PostgreSQL database as mae-lab's tables."""
    import optuna
    from test_search import SEARCH

    from mae_lab.run.search import storage

    (workdir / "s.toml").write_text(SEARCH.replace("n_trials = 6", "n_trials = 2"))
    finish([mae_lab("search", "s.toml", "--db", pg_url, "--device", "cpu", cwd=workdir)])
    trials = optuna.load_study(study_name="tiny_search", storage=storage(pg_url)).get_trials()
    assert len(trials) == 2
    assert sorted(r[0] for r in pg_rows(pg_url, "SELECT optuna_trial FROM mae_trials")) == [0, 1]
    assert pg_rows(pg_url, "SELECT count(*) FROM mae_results") == [(2,)]


def _drain(url: str, study: str, cwd: str, start, out) -> None:
    """One worker process: wait for the others at the barrier, then run the study as `mae-lab worker` does, and
    report what it ran and how many trials were still pending when it left."""
    os.chdir(cwd)
    from mae_lab.run.runner import run_study

    start.wait()
    summary = run_study(study, db_url=url, device="cpu", wait=True, poll_s=0.2)
    engine = connect(url, create=False)
    with Session(engine) as s:
        pending = len(s.exec(select(TrialRow).where(TrialRow.status == "pending")).all())
    out.put((os.getpid(), [h for h, _ in summary.ran], [st for _, st in summary.ran], pending))


@pytest.mark.slow
def test_eight_postgres_workers_starting_at_once_run_each_trial_once(workdir: Path, pg_url: str):
    import multiprocessing as mp

    (workdir / "eight.toml").write_text(grid_study("eight", [0.25, 0.5, 0.75, 0.9], [0, 1], epochs=1)
                                        .replace("epochs = 1\nbatch_size", "epochs = 1\nwarmup_epochs = 0\n"
                                                 "batch_size"))
    connect(pg_url).dispose()  # the schema exists before the race, as on a server that has run before
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_drain, args=(pg_url, "eight.toml", str(workdir), start, out)) for _ in range(8)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ran = [h for _, hashes, _, _ in reports for h in hashes]
    assert len(ran) == 8 and len(set(ran)) == 8, reports  # every trial ran, and ran once
    assert all(st == "done" for _, _, statuses, _ in reports for st in statuses)
    assert all(pending == 0 for *_, pending in reports), reports  # no worker left while a trial was pending
    trials = pg_rows(pg_url, "SELECT status, attempts FROM mae_trials")
    assert sorted(trials) == [("done", 1)] * 8


def test_a_fenced_stale_postgres_worker_cannot_overwrite_a_result(workdir: Path, pg_url: str):
    engine = connect(pg_url)
    study = sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text="", spec_hash="x",
                          trials=[{"hash": "h", "pretrain_hash": "p", "seed": 0, "label": "", "axes_json": "{}",
                                   "spec_json": "{}"}])
    first = claim_next(engine, study.id)
    stale = claim_of(first)
    with transaction(engine) as s:  # its worker hangs: no heartbeat for two minutes
        s.get(TrialRow, first.id).heartbeat_at = now() - timedelta(seconds=120)
    second = claim_next(engine, study.id, stale_after_s=60)
    assert second is not None and second.attempts == 2
    finish_trial(engine, second.id, "done", result={"linear_top1": 0.8}, claim=claim_of(second))
    with pytest.raises(LostClaim, match="attempt 1"):
        finish_trial(engine, first.id, "done", result={"linear_top1": 0.1}, claim=stale)
    with pytest.raises(LostClaim):
        record_metrics(engine, first.id, "linear", 1, {"top1": 0.1}, claim=stale)
    assert pg_rows(pg_url, "SELECT t.status, t.attempts, r.linear_top1 FROM mae_trials t JOIN mae_results r "
                           "ON r.trial_id = t.id") == [("done", 2, 0.8)]
    assert pg_rows(pg_url, "SELECT count(*) FROM mae_metrics") == [(0,)]
    engine.dispose()
