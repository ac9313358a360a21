"""A full disk while checkpointing fails the trial cleanly: recorded as failed with the reason, no partial file
taken for a checkpoint, the database intact, and the study goes on; once space is freed, a rerun completes. A full
disk under the SQLite database itself ends the run with one line and exit 74, the database intact, and a rerun after
freeing space completes every trial once. Uses a real 16 MiB tmpfs filled to its last 256 KiB (needs root to mount:
CI runs as root; skipped otherwise)."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import mae_lab, study_toml
from typer.testing import CliRunner

from cli import app
from mae_lab.store.outage import EXIT_DISK_FULL
from mae_lab.train.checkpoint import sha256_file

STUDY = study_toml("full", study={"seeds": [0, 1]}, pretrain={"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
                   linear={"epochs": 1, "warmup_epochs": 0})


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=False)  # lazy: this process may still hold the database


def test_full_disk_while_checkpointing(workdir: Path, tiny_disk: Path, monkeypatch):
    monkeypatch.setenv("MAE_LAB_ARTIFACTS", str(tiny_disk))
    filler = tiny_disk / "filler"
    with filler.open("wb") as fh:  # leave 256 KiB: less than one checkpoint
        fh.write(b"\0" * (shutil.disk_usage(tiny_disk).free - 256 * 1024))
    (workdir / "full.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "full.toml"], env={"COLUMNS": "200"})
    assert res.exit_code == 1, res.output  # trials failed, the command did not crash
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = c.execute("SELECT status, error FROM mae_trials").fetchall()
        assert len(rows) == 2 and all(s == "failed" for s, _ in rows)  # both tried: the study went on
        assert all("No space left on device" in e for _, e in rows)
        assert c.execute("SELECT count(*) FROM mae_checkpoints").fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM mae_results").fetchone() == (0,)
    assert not list((tiny_disk / "pretrain").glob("*.pt"))  # no half-written file under a checkpoint's name

    filler.unlink()  # space freed: a rerun completes
    res = CliRunner().invoke(app, ["run", "full.toml", "--rerun"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("SELECT status, error FROM mae_trials").fetchall() == [("done", None)] * 2
        for path, sha in c.execute("SELECT path, sha256 FROM mae_checkpoints").fetchall():
            assert sha256_file(path) == sha


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as fh:
        fh.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


def _run(url: str, cwd: Path) -> tuple[int, str]:
    """``mae-lab run full.toml`` as its own process, as a user runs it (a rerun sees the first one's worker gone)."""
    proc = mae_lab("run", "full.toml", "--db", url, cwd=cwd)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_full_disk_under_the_database(workdir: Path, tiny_disk: Path, monkeypatch):
    monkeypatch.setenv("MAE_LAB_ARTIFACTS", str(workdir / "artifacts"))  # checkpoints have room: only the database
    db, url = tiny_disk / "mae_lab.db", f"sqlite:///{tiny_disk}/mae_lab.db"
    (workdir / "full.toml").write_text(STUDY.replace("seeds = [0, 1]", "seeds = [0]"))
    assert _run(url, workdir)[0] == 0
    (workdir / "full.toml").write_text(STUDY.replace("seeds = [0, 1]", "seeds = [0, 1, 2, 3]"))
    filler = _fill(tiny_disk, 256 * 1024)  # room for a trial or two of records, not four
    code, out = _run(url, workdir)
    assert code == EXIT_DISK_FULL, out
    [line] = [x for x in out.splitlines() if "error" in x]
    assert line.startswith(f"error: {url}: its disk is full") and "Traceback" not in out, out
    filler.unlink()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        statuses = [s for s, in c.execute("SELECT status FROM mae_trials")]
        assert set(statuses) <= {"done", "running", "pending"}, statuses  # none taken for failed: it resumes
    code, out = _run(url, workdir)
    assert code == 0, out  # the trial cut off is taken over (its worker is gone), the rest run
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert c.execute("SELECT status, error FROM mae_trials").fetchall() == [("done", None)] * 4
        assert c.execute("SELECT count(*), count(DISTINCT trial_id) FROM mae_results").fetchone() == (4, 4)
