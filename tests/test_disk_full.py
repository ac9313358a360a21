"""A full disk while checkpointing fails the trial cleanly: recorded as failed with the reason, no partial file
taken for a checkpoint, the database intact, and the study goes on; once space is freed, a rerun completes. Uses a
real 16 MiB tmpfs filled to its last 256 KiB (needs root to mount: CI runs as root; skipped otherwise)."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import study_toml
from typer.testing import CliRunner

from cli import app
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
    subprocess.run(["umount", str(mnt)], check=False)


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
