"""A study killed with SIGKILL in the middle of a trial, run again, ends with every trial done exactly once, no
duplicated rows, the killed trial resumed from its checkpoint, and the same numbers as an uninterrupted run."""
from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import assert_same_as_uninterrupted, mae_lab, query

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
linear = { epochs = 3, warmup_epochs = 1 }
finetune = { epochs = 1, batch_size = 128, warmup_epochs = 0 }
"""


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

    trials = query(db, "SELECT id, status, attempts, resumed_from_epoch FROM mae_trials ORDER BY id")
    assert trials[0][2] == 2 and trials[0][3] >= 3  # the killed trial: a second attempt, resumed from its checkpoint
    assert trials[1][2] == 1
    assert_same_as_uninterrupted(db, clean / "db" / "mae_lab.db", trials=2, epochs=8)
