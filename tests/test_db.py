"""The database layer on real SQLite files: schema version, bad URLs, masked passwords, atomic trial closing."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from conftest import dump_db
from mae_lab import db

STUDY = '[study]\nname = "s"\n[pretrain]\nepochs = 1\n'


def test_newer_schema_is_refused(workdir: Path):
    db.connect("sqlite:///db/mae_lab.db").dispose()
    with sqlite3.connect("db/mae_lab.db") as c:
        c.execute("UPDATE mae_meta SET value = ? WHERE key = 'schema_version'", (str(db.SCHEMA_VERSION + 1),))
    before = dump_db(workdir / "db" / "mae_lab.db")
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml"])
    assert res.exit_code == 2
    assert "newer than this mae-lab" in res.output and f"schema version {db.SCHEMA_VERSION + 1}" in res.output
    assert dump_db(workdir / "db" / "mae_lab.db") == before


def test_an_older_schema_is_migrated_in_place_keeping_its_rows(tmp_path: Path):
    path = tmp_path / "old.db"
    engine = db.connect(f"sqlite:///{path}")
    engine.dispose()
    with sqlite3.connect(path) as c:  # make it a schema-1 database holding a result
        c.execute("ALTER TABLE mae_results DROP COLUMN pretrain_peak_mem_mib")
        c.execute("UPDATE mae_meta SET value = '1' WHERE key = 'schema_version'")
        c.execute("INSERT INTO mae_studies (id, name, description, path, spec_text, spec_hash, created_at, "
                  "updated_at) VALUES (1, 's', '', 's.toml', '', 'h', '2026-01-01', '2026-01-01')")
    engine = db.connect(f"sqlite:///{path}", create=False)
    engine.dispose()
    with sqlite3.connect(path) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(mae_results)")]
        assert "pretrain_peak_mem_mib" in cols
        version = c.execute("SELECT value FROM mae_meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(db.SCHEMA_VERSION),)
        assert c.execute("SELECT name FROM mae_studies").fetchall() == [("s",)]


@pytest.mark.parametrize("url, reason", [
    ("sqlite:////proc/forbidden/x.db", "cannot be opened"),
    ("notadb://x", "cannot be opened"),
    ("://x", "cannot be parsed"),
])
def test_unusable_urls_fail_in_one_line(workdir: Path, url: str, reason: str):
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--db", url])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and reason in lines[0], res.output


def test_a_bare_path_means_a_sqlite_file(workdir: Path):
    assert db.resolve_url("runs/a.db") == "sqlite:///runs/a.db"
    assert db.resolve_url("/tmp/x/a.db") == "sqlite:////tmp/x/a.db"
    assert db.artifacts_dir("runs/a.db") == Path("runs/artifacts")
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--db", "runs/a.db", "--dry-run"])
    assert res.exit_code == 0, res.output


def test_passwords_never_printed(workdir: Path):
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--db", "postgresql://alice:s3cret@127.0.0.1:9/nodb"])
    assert res.exit_code == 2
    assert "s3cret" not in res.output and "alice:***@" in res.output
    assert db.safe_url("postgresql://u:pw@h/d") == "postgresql://u:***@h/d"


def test_claims_are_exclusive_and_stale_workers_are_detected(workdir: Path):
    engine = db.connect("sqlite:///db/mae_lab.db")
    trials = [{"hash": f"h{i}", "pretrain_hash": f"p{i}", "seed": 0, "label": str(i), "axes_json": "{}",
               "spec_json": "{}"} for i in range(3)]
    study = db.sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text=STUDY,
                          spec_hash="x", trials=trials)
    got = [db.claim_next(engine, study.id) for _ in range(4)]
    assert [g.hash for g in got[:3]] == ["h0", "h1", "h2"] and got[3] is None
    # a worker that died on this host: its running trial becomes claimable again
    with db.transaction(engine) as s:
        row = s.get(db.TrialRow, got[0].id)
        row.worker = f"{db.socket.gethostname()}:999999999"
    again = db.claim_next(engine, study.id)
    assert again.hash == "h0" and again.attempts == 2


def test_finish_trial_is_all_or_nothing(workdir: Path):
    engine = db.connect("sqlite:///db/mae_lab.db")
    study = db.sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text=STUDY,
                          spec_hash="x", trials=[{"hash": "h", "pretrain_hash": "p", "seed": 0, "label": "",
                                                  "axes_json": "{}", "spec_json": "{}"}])
    row = db.claim_next(engine, study.id)
    with pytest.raises(ValueError):  # fails after status and result were staged: none of it may land
        db.finish_trial(engine, row.id, "done", result={"linear_top1": 0.5}, artifacts={"checkpoint": ("path",)})
    trial, result = db.study_trials(engine, study.id)[0]
    assert trial.status == "running" and result is None
