"""A study killed with SIGKILL in the middle of a trial, run again, ends with every trial done exactly once, no
duplicated rows, the killed trial resumed from its checkpoint, and the same numbers as an uninterrupted run."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

STUDY = """# mae-lab run kill.toml
[study]
name = "kill"
seeds = [0, 1]

[model]
preset = "vit_digits"

[pretrain]
epochs = 8
batch_size = 64

[eval]
linear = { epochs = 3 }
finetune = { epochs = 1, batch_size = 128 }
"""


def mae_lab(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute(sql).fetchall()


def pretrain_epochs_recorded(db: Path) -> int:
    try:
        return query(db, "SELECT max(epoch) FROM mae_metrics WHERE stage='pretrain' AND trial_id=1")[0][0] or 0
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_sigkill_mid_trial_resumes_without_duplicates(workdir: Path):
    killed, clean = workdir / "killed", workdir / "clean"
    for d in (killed, clean):
        d.mkdir()
        (d / "kill.toml").write_text(STUDY)
    db = killed / "db" / "mae_lab.db"

    proc = mae_lab("run", "kill.toml", cwd=killed)
    deadline = time.time() + 240
    while pretrain_epochs_recorded(db) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "pretraining did not reach epoch 3"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert query(db, "SELECT status FROM mae_trials WHERE id=1") == [("running",)]  # a zombie, until the rerun

    rerun = mae_lab("run", "kill.toml", cwd=killed)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    reference = mae_lab("run", "kill.toml", cwd=clean)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out

    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    trials = query(db, "SELECT id, status, attempts, resumed_from_epoch FROM mae_trials ORDER BY id")
    assert [t[1] for t in trials] == ["done", "done"]
    assert trials[0][2] == 2 and trials[0][3] >= 3  # the killed trial: a second attempt, resumed from its checkpoint
    assert trials[1][2] == 1
    # exactly one row per (trial, stage, epoch, metric), one result per trial, every pretraining epoch present
    dup = query(db, "SELECT count(*) FROM (SELECT trial_id, stage, epoch, name FROM mae_metrics "
                    "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1)")
    assert dup == [(0,)]
    assert query(db, "SELECT trial_id, count(*) FROM mae_metrics WHERE stage='pretrain' AND name='loss' "
                     "GROUP BY trial_id") == [(1, 8), (2, 8)]
    assert query(db, "SELECT count(*) FROM mae_results") == [(2,)]

    # the resumed trial's numbers equal an uninterrupted run with the same seeds
    got = query(db, "SELECT linear_top1, finetune_top1, pretrain_loss FROM mae_results ORDER BY trial_id")
    want = query(clean / "db" / "mae_lab.db",
                 "SELECT linear_top1, finetune_top1, pretrain_loss FROM mae_results ORDER BY trial_id")
    for g, w in zip(got, want):
        assert g[0] == pytest.approx(w[0], abs=1e-9) and g[1] == pytest.approx(w[1], abs=1e-9)
        assert g[2] == pytest.approx(w[2], rel=1e-6)

    # every checkpoint loads (weights only) and matches the sha256 the database recorded
    from mae_lab.checkpoint import load_checkpoint

    for path, sha in query(db, "SELECT path, sha256 FROM mae_artifacts WHERE kind='checkpoint'"):
        ckpt = load_checkpoint(killed / path, sha256=sha)
        assert ckpt["epoch"] == 8
