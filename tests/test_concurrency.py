"""Two `mae-lab run` processes on the same study and SQLite file: every trial done exactly once, both processes ran
trials, no lock errors."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from conftest import mae_lab, study_toml

STUDY = study_toml("two", comment="mae-lab run two.toml", study={"seeds": [0, 1, 2]},
                   pretrain={"epochs": 2, "batch_size": 128}, linear={"epochs": 2, "warmup_epochs": 1},
                   tail='[grid]\n"model.mask_ratio" = [0.5, 0.75]\n')


@pytest.mark.slow
def test_two_processes_share_a_study(workdir: Path):
    (workdir / "two.toml").write_text(STUDY)
    procs = [mae_lab("run", "two.toml", cwd=workdir) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "locked" not in out.lower(), out
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        trials = c.execute("SELECT status, attempts, worker FROM mae_trials").fetchall()
        assert len(trials) == 6
        assert all(status == "done" and attempts == 1 for status, attempts, _ in trials), trials
        assert c.execute("SELECT count(*) FROM mae_results").fetchone() == (6,)
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # between them the two processes ran each trial once (each prints one line per trial it ran), and both ran some
    ran = [out.count(": done") for out in outs]
    assert sum(ran) == 6 and min(ran) >= 1, ran
