"""The checkpoint and its recorded sha256 never disagree, whatever stops a process and however often.

The worst moment for a stop is after a new checkpoint file is written and before the database records its sha256:
with the file renamed into place first, a resume would find a file the database does not know, set it aside and
pretrain from scratch (seen under srun with 2 processes per trial, where each rank gets SIGTERM twice). The test
holds SQLite's write lock from the outside once epoch 1 is recorded, so the trial's next database write after the
epoch-2 checkpoint blocks; it then sends SIGTERM twice to the whole process group (launcher, torchrun and both ranks,
as srun does), lets the write through, and runs the study again: it must resume from a recorded epoch.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, query
from test_resume import checkpoint_epoch, pretrained_epochs

from mae_lab.train.checkpoint import (
    commit_checkpoint,
    save_checkpoint,
    settle_checkpoint,
    sha256_file,
    stage_checkpoint,
    staged_path,
)

EPOCHS = 3
# probe_every with linear blocks: the probe surface is the first write after each checkpoint, so the stop lands
# between the checkpoint file and its sha256 record (the window a rename-first checkpoint leaves open)
STUDY = f"""# mae-lab worker race.toml --nproc 2
[study]
name = "race"

[data]
augmentation = "none"
train_samples = 512

[model]
preset = "vit_digits"

[pretrain]
epochs = {EPOCHS}
batch_size = 32
warmup_epochs = 0
probe_every = 1

[eval]
linear = {{ epochs = 1, warmup_epochs = 0, blocks = [1] }}
finetune = {{ enabled = false }}
"""


def test_settle_finishes_a_recorded_commit_and_drops_an_unrecorded_one(tmp_path: Path):
    import torch

    path = tmp_path / "c.pt"
    old = save_checkpoint(path, {"epoch": torch.tensor(1)})
    new = stage_checkpoint(path, {"epoch": torch.tensor(2)})
    assert sha256_file(path) == old and new != old  # staged: the file in place is unchanged
    settle_checkpoint(path, old)  # the record still names epoch 1: the staged file goes
    assert sha256_file(path) == old and not staged_path(path).exists()
    new = stage_checkpoint(path, {"epoch": torch.tensor(2)})
    settle_checkpoint(path, new)  # recorded, then stopped before the rename: the rename is finished
    assert sha256_file(path) == new and not staged_path(path).exists()
    commit_checkpoint(path)  # nothing staged: nothing happens
    assert sha256_file(path) == new


def loss_epochs(db: Path) -> int:
    try:
        return query(db, "SELECT count(*) FROM mae_metrics WHERE stage = 'pretrain' AND name = 'loss'")[0][0]
    except sqlite3.OperationalError:
        return 0


def _start(cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cli", "worker", "race.toml", "--device", "cpu", "--nproc", "2",
                             "--poll", "0.5"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group, as a job step's


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited before {what}: {proc.stdout.read()}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_sigterms_at_the_worst_moment_resume_not_restart(workdir: Path):
    (workdir / "race.toml").write_text(STUDY)
    db = workdir / "db" / "mae_lab.db"
    proc = _start(workdir)
    _wait(lambda: loss_epochs(db) >= 1, proc, "epoch 1 recorded")  # its checkpoint, then its metrics: all written
    folder = workdir / "db" / "artifacts" / "pretrain"
    [ckpt] = [p for p in folder.glob("*.pt")]
    before = ckpt.stat().st_mtime_ns
    lock = sqlite3.connect(db, timeout=30, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # every write of the trial now waits (busy timeout 60 s)
    try:
        _wait(lambda: staged_path(ckpt).exists() or ckpt.stat().st_mtime_ns != before, proc,
              "the epoch-2 checkpoint file")
        time.sleep(1.0)  # rank 0 reaches its next write and blocks on the lock
        for _ in range(2):  # srun signals every process of the step; torchrun passes it on again
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.2)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert query(db, "SELECT status FROM mae_trials") == [("interrupted",)], out
    k = checkpoint_epoch(db)
    assert k >= 1, out

    again = _start(workdir)
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out2
    assert "does not match" not in out2 and not list(folder.glob("*.unverified")), out2
    assert pretrained_epochs(out2) == list(range(k + 1, EPOCHS + 1)), out2  # resumed after epoch k, not from 1
    assert query(db, "SELECT status, resumed_from_epoch FROM mae_trials") == [("done", k)]
    [(path, sha)] = query(db, "SELECT path, sha256 FROM mae_checkpoints")
    assert sha256_file(path) == sha and not staged_path(path).exists()
