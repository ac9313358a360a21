"""The database server restarts mid-study: every call that loses its connection is retried with backoff
(store.outage), so workers ride out a restart with no trial lost or run twice and the same results as an
uninterrupted run; a server away longer than MAE_LAB_DB_OUTAGE_S ends them with one line and exit 75, and their
trials stay resumable. Each test runs a PostgreSQL server of its own (tests/pg_server.py) to stop and start."""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import mae_lab, study_toml
from pg_server import pg_server  # noqa: F401 - a fixture
from test_workers import pg_rows as rows

from mae_lab.store.engine import connect
from mae_lab.store.outage import EXIT_UNAVAILABLE, DbUnavailable
from mae_lab.store.reads import get_study
from mae_lab.store.writes import sync_study


def wait_for(what: str, cond, procs=(), timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a worker ended before {what}: {p.stdout.read()}"
        assert time.monotonic() < deadline, f"{what} did not come within {timeout} s"
        time.sleep(0.05)


def pretrained_epochs(url: str) -> int:
    try:
        got = rows(url, "SELECT max(epoch) FROM mae_metrics WHERE stage = 'pretrain'")
    except Exception:  # noqa: BLE001 - the tables may not exist yet
        return 0
    return got[0][0] or 0


def test_a_call_rides_out_a_restart_and_gives_up_after_the_limit(pg_server, monkeypatch):  # noqa: F811
    """No training: one read while the server is away for ~1.5 s succeeds; with a 1 s limit it ends in
    DbUnavailable."""
    engine = connect(pg_server.url)
    sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text="", spec_hash="x", trials=[])
    pg_server.stop()
    back = threading.Timer(1.5, pg_server.start)
    back.start()
    assert get_study(engine, "s").name == "s"  # waited for the server to come back
    back.join()
    monkeypatch.setenv("MAE_LAB_DB_OUTAGE_S", "1")
    pg_server.stop()
    t0 = time.monotonic()
    with pytest.raises(DbUnavailable, match="did not answer for 1 s"):
        get_study(engine, "s")
    assert time.monotonic() - t0 < 15
    engine.dispose()


GRID = study_toml("restart", study={"seeds": [0, 1]}, pretrain={"epochs": 2, "batch_size": 128, "warmup_epochs": 0},
                  linear={"epochs": 1, "warmup_epochs": 0}, tail='[grid]\n"model.mask_ratio" = [0.5, 0.75]\n')
RESULTS = "SELECT t.hash, r.linear_top1, r.pretrain_loss FROM mae_trials t JOIN mae_results r ON r.trial_id = t.id"


@pytest.mark.slow
def test_four_workers_ride_out_a_server_restart(workdir: Path, pg_server):  # noqa: F811
    (workdir / "restart.toml").write_text(GRID)
    os.environ["MAE_LAB_DB_OUTAGE_S"] = "120"
    try:
        workers = [mae_lab("worker", "restart.toml", "--db", pg_server.url, "--device", "cpu", "--poll", "0.5",
                           cwd=workdir) for _ in range(4)]
    finally:
        del os.environ["MAE_LAB_DB_OUTAGE_S"]
    wait_for("a pretraining epoch", lambda: pretrained_epochs(pg_server.url) >= 1, workers)
    pg_server.stop()
    time.sleep(3)  # the workers train on, and every call to the database waits
    pg_server.start()
    outs = [p.communicate(timeout=600)[0] for p in workers]
    assert [p.returncode for p in workers] == [0] * 4, outs
    assert any("database connection lost" in out for out in outs), outs  # the restart was noticed and ridden out
    assert sorted(rows(pg_server.url, "SELECT status, attempts FROM mae_trials")) == [("done", 1)] * 4
    assert rows(pg_server.url, "SELECT count(*) FROM (SELECT trial_id, stage, epoch, name FROM mae_metrics "
                               "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d") == [(0,)]

    clean = workdir / "clean"  # the same study, uninterrupted, in one process on SQLite
    clean.mkdir()
    (clean / "restart.toml").write_text(GRID)
    out = mae_lab("run", "restart.toml", "--device", "cpu", cwd=clean).communicate(timeout=600)[0]
    with sqlite3.connect(clean / "db" / "mae_lab.db") as c:
        want = {h: (top1, loss) for h, top1, loss in c.execute(RESULTS)}
    got = {h: (top1, loss) for h, top1, loss in rows(pg_server.url, RESULTS)}
    assert sorted(got) == sorted(want) and len(want) == 4, out
    for h, (top1, loss) in got.items():
        assert top1 == pytest.approx(want[h][0], abs=1e-6) and loss == pytest.approx(want[h][1], rel=1e-6)


@pytest.mark.slow
def test_a_server_gone_past_the_limit_ends_the_worker_and_its_trial_resumes(workdir: Path, pg_server):  # noqa: F811
    (workdir / "gone.toml").write_text(study_toml("gone", pretrain={"epochs": 4, "batch_size": 64,
                                                                    "warmup_epochs": 0},
                                                  linear={"epochs": 1, "warmup_epochs": 0}))
    os.environ["MAE_LAB_DB_OUTAGE_S"] = "2"
    try:
        worker = mae_lab("worker", "gone.toml", "--db", pg_server.url, "--device", "cpu", cwd=workdir)
    finally:
        del os.environ["MAE_LAB_DB_OUTAGE_S"]
    wait_for("a pretraining epoch", lambda: pretrained_epochs(pg_server.url) >= 1, [worker])
    pg_server.stop()
    out = worker.communicate(timeout=300)[0]
    assert worker.returncode == EXIT_UNAVAILABLE, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer for 2 s" in errors[0] and "resumable" in errors[0], out
    assert "Traceback" not in out

    pg_server.start()
    again = mae_lab("worker", "gone.toml", "--db", pg_server.url, "--device", "cpu", cwd=workdir)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    # taken over and finished: from the first worker's checkpoint when the database recorded it, else (the file
    # was written again while the server was away, so its sha256 is not the recorded one) from scratch
    assert rows(pg_server.url, "SELECT status, attempts FROM mae_trials") == [("done", 2)]


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_outage_limit_is_one_line_and_writes_nothing(workdir: Path, value: str):
    from typer.testing import CliRunner

    from cli import app

    (workdir / "s.toml").write_text(study_toml("s", pretrain={"epochs": 1, "warmup_epochs": 0},
                                               linear={"epochs": 1, "warmup_epochs": 0}))
    res = CliRunner().invoke(app, ["run", "s.toml", "--device", "cpu"], env={"MAE_LAB_DB_OUTAGE_S": value})
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MAE_LAB_DB_OUTAGE_S="), res.output
    assert not (workdir / "db" / "mae_lab.db").exists()  # refused before the database was opened
