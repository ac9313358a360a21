"""Kill soak: SIGKILL `mae-lab run` at five moments (during pretraining, during a checkpoint write, during
evaluation, between trials, right after a database write), rerunning after each. Every moment must come and the kill
must land in it (checked afterwards where the database or the folder can tell), or the soak fails. Afterwards every
trial is done exactly once, no metric or result row is duplicated, the database passes its integrity check, every
checkpoint loads, and the results equal an uninterrupted run with the same seeds (linear/fine-tune top-1 within
1e-9, final pretraining loss within 1e-6 relative: CPU runs are deterministic)."""
from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import assert_same_as_uninterrupted, mae_lab, query, study_toml

STUDY = study_toml("soak", comment="mae-lab run soak.toml", study={"seeds": [0, 1, 2]},
                   pretrain={"epochs": 6, "batch_size": 64}, linear={"epochs": 20},
                   finetune={"epochs": 1, "batch_size": 128, "warmup_epochs": 0})


def safe(db: Path, sql: str) -> list[tuple]:
    try:
        return query(db, sql)
    except sqlite3.OperationalError:
        return []


def moments(db: Path, ckpt_dir: Path):
    """Five predicates over the live database / artifacts, each a moment to kill at."""
    def n(sql):
        rows = safe(db, sql)
        return rows[0][0] if rows and rows[0][0] is not None else 0

    done = "SELECT count(*) FROM mae_trials WHERE status='done'"
    yield "during pretraining", lambda: n("SELECT max(epoch) FROM mae_metrics WHERE stage='pretrain'") >= 2
    yield "during a checkpoint write", lambda: any(ckpt_dir.glob(".*.tmp"))
    yield "during evaluation", lambda: n("SELECT count(*) FROM mae_metrics WHERE stage='linear'") >= 3
    base = {}

    def between():
        d = n(done)
        base.setdefault("done", d)
        return d > base["done"]
    yield "between trials", between
    start = {}

    def after_write():
        c = n("SELECT count(*) FROM mae_metrics")
        start.setdefault("c", c)
        return c > start["c"]
    yield "right after a database write", after_write


def landed(name: str, db: Path, ckpts: Path) -> bool:
    """After the kill: does the database (or the folder) show the run was stopped at that moment, not later?"""
    if name == "during pretraining":  # a trial still running, in the middle of its pretraining
        return bool(safe(db, "SELECT t.id FROM mae_trials t JOIN mae_metrics m ON m.trial_id = t.id WHERE "
                             "t.status = 'running' AND m.stage = 'pretrain' GROUP BY t.id HAVING max(m.epoch) < 6 "
                             "AND (SELECT count(*) FROM mae_metrics l WHERE l.trial_id = t.id AND l.stage = "
                             "'linear') = 0"))
    if name == "during a checkpoint write":  # the temp file of the write is still there
        return bool(list(ckpts.glob(".*.tmp")))
    if name == "during evaluation":  # a running trial with probe metrics and no result yet
        return bool(safe(db, "SELECT t.id FROM mae_trials t WHERE t.status = 'running' AND EXISTS (SELECT 1 FROM "
                             "mae_metrics m WHERE m.trial_id = t.id AND m.stage = 'linear') AND NOT EXISTS (SELECT 1 "
                             "FROM mae_results r WHERE r.trial_id = t.id)"))
    return True  # 'between trials' and 'right after a database write' are the first moment their change shows


@pytest.mark.slow
def test_kill_soak(workdir: Path):
    killed, clean = workdir / "killed", workdir / "clean"
    for d in (killed, clean):
        d.mkdir()
        (d / "soak.toml").write_text(STUDY)
    db, ckpts = killed / "db" / "mae_lab.db", killed / "db" / "artifacts" / "pretrain"
    for name, ready in moments(db, ckpts):
        proc = mae_lab("run", "soak.toml", cwd=killed)
        deadline = time.time() + 300
        while not ready():
            # a run that ends, or a moment that does not come in time, fails the soak: a kill sent after its moment
            # has passed would test nothing
            assert proc.poll() is None, f"the run ended before the moment '{name}': {proc.stdout.read()}"
            assert time.time() < deadline, f"the moment '{name}' did not come within 300 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"'{name}': the run ended by itself before the kill landed"
        assert landed(name, db, ckpts), f"the kill meant for '{name}' landed after that moment had passed"

    final = mae_lab("run", "soak.toml", cwd=killed)
    out, _ = final.communicate(timeout=900)
    assert final.returncode == 0, out
    reference = mae_lab("run", "soak.toml", cwd=clean)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out

    assert_same_as_uninterrupted(db, clean / "db" / "mae_lab.db", trials=3, epochs=6)
