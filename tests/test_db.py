"""The database layer on real SQLite files: schema version, bad URLs, masked passwords, atomic trial closing."""
from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import dump_db, query, study_toml
from typer.testing import CliRunner

from cli import app
from mae_lab.store import workers
from mae_lab.store.engine import artifacts_dir, connect, resolve_url, safe_url, transaction
from mae_lab.store.queue import LostClaim, claim_next, claim_of, heartbeat, is_stale
from mae_lab.store.reads import get_checkpoint, get_study, get_trials, study_trials, trial_details
from mae_lab.store.tables import SCHEMA_VERSION, TrialRow, now
from mae_lab.store.writes import finish_trial, record_checkpoint, record_metrics, sync_study

STUDY = '[study]\nname = "s"\n[pretrain]\nepochs = 1\nwarmup_epochs = 0\n'


def test_newer_schema_is_refused(workdir: Path):
    connect("sqlite:///db/mae_lab.db").dispose()
    with sqlite3.connect("db/mae_lab.db") as c:
        c.execute("UPDATE mae_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = dump_db(workdir / "db" / "mae_lab.db")
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml"])
    assert res.exit_code == 2
    assert "newer than this mae-lab" in res.output and f"schema version {SCHEMA_VERSION + 1}" in res.output
    assert dump_db(workdir / "db" / "mae_lab.db") == before


RELEASE_DB = Path(__file__).parent / "fixtures" / "release_620180e.db"  # written by release 620180e (schema 2)


def test_a_release_database_migrates_and_list_report_show_read_it(workdir: Path):
    path = workdir / "old.db"
    path.write_bytes(RELEASE_DB.read_bytes())
    before = {t: query(path, f"SELECT * FROM {t}") for t in ("mae_studies", "mae_trials", "mae_results")}
    runner = CliRunner()
    res = runner.invoke(app, ["list", "--db", str(path)])
    assert res.exit_code == 0 and "tiny" in res.output, res.output
    res = runner.invoke(app, ["report", "tiny", "--db", str(path)])
    assert res.exit_code == 0 and "mask_ratio" in res.output, res.output
    res = runner.invoke(app, ["show", "1", "--db", str(path)])
    assert res.exit_code == 0 and "febd791f9f13755a" in res.output and "host vm" in res.output, res.output
    assert "resolved precision" not in res.output, res.output  # added by a later schema: NULL here, so not shown
    assert query(path, "SELECT value FROM mae_meta") == [(str(SCHEMA_VERSION),)]
    cols = [r[1] for r in query(path, "PRAGMA table_info(mae_results)")]
    assert {"linear_test_top1", "finetune_test_top1", "artifact_error"} <= set(cols)
    for table, rows in before.items():  # every old row kept, its old columns unchanged, new ones NULL
        after = query(path, f"SELECT * FROM {table}")
        assert [r[:len(rows[0])] for r in after] == rows and all(v is None for r in after for v in r[len(rows[0]):])


def test_a_schema_1_database_migrates_through_every_version(workdir: Path):
    path = workdir / "old.db"
    path.write_bytes(RELEASE_DB.read_bytes())
    with sqlite3.connect(path) as c:  # the release's schema 2, taken back to schema 1
        c.execute("ALTER TABLE mae_results DROP COLUMN pretrain_peak_mem_mib")
        c.execute("UPDATE mae_meta SET value = '1' WHERE key = 'schema_version'")
    connect(f"sqlite:///{path}", create=False).dispose()
    cols = [r[1] for r in query(path, "PRAGMA table_info(mae_results)")]
    assert "pretrain_peak_mem_mib" in cols and "linear_test_top1" in cols
    assert query(path, "SELECT value FROM mae_meta") == [(str(SCHEMA_VERSION),)]
    assert len(query(path, "SELECT * FROM mae_results")) == 2


@pytest.mark.parametrize("url, reason", [
    ("sqlite:////proc/forbidden/x.db", "cannot be opened"),
    ("notadb://x", "cannot be opened"),
    ("://x", "cannot be parsed"),
])
def test_unusable_urls_fail_in_one_line(workdir: Path, url: str, reason: str):
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--db", url])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and reason in lines[0], res.output


def test_a_bare_path_means_a_sqlite_file(workdir: Path):
    assert resolve_url("runs/a.db") == "sqlite:///runs/a.db"
    assert resolve_url("/tmp/x/a.db") == "sqlite:////tmp/x/a.db"
    assert artifacts_dir("runs/a.db") == Path("runs/artifacts")
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--db", "runs/a.db", "--dry-run"])
    assert res.exit_code == 0, res.output


def test_passwords_never_printed(workdir: Path):
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--db", "postgresql://alice:s3cret@127.0.0.1:9/nodb"])
    assert res.exit_code == 2
    assert "s3cret" not in res.output and "alice:***@" in res.output
    assert safe_url("postgresql://u:pw@h/d") == "postgresql://u:***@h/d"


def test_claims_are_exclusive_and_stale_workers_are_detected(workdir: Path):
    engine = connect("sqlite:///db/mae_lab.db")
    trials = [{"hash": f"h{i}", "pretrain_hash": f"p{i}", "seed": 0, "label": str(i), "axes_json": "{}",
               "spec_json": "{}"} for i in range(3)]
    study = sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text=STUDY,
                          spec_hash="x", trials=trials)
    got = [claim_next(engine, study.id) for _ in range(4)]
    assert [g.hash for g in got[:3]] == ["h0", "h1", "h2"] and got[3] is None
    # a worker that died on this host: its running trial becomes claimable again
    with transaction(engine) as s:
        row = s.get(TrialRow, got[0].id)
        row.worker = f"{workers.local_prefix()}999999999"
    again = claim_next(engine, study.id)
    assert again.hash == "h0" and again.attempts == 2


def test_finish_trial_is_all_or_nothing(workdir: Path):
    engine = connect("sqlite:///db/mae_lab.db")
    study = sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text=STUDY,
                          spec_hash="x", trials=[{"hash": "h", "pretrain_hash": "p", "seed": 0, "label": "",
                                                  "axes_json": "{}", "spec_json": "{}"}])
    row = claim_next(engine, study.id)
    with pytest.raises(ValueError):  # fails after status and result were staged: none of it may land
        finish_trial(engine, row.id, "done", result={"linear_top1": 0.5}, artifacts={"checkpoint": ("path",)})
    trial, result = study_trials(engine, study.id)[0]
    assert trial.status == "running" and result is None


def _study(engine, n: int = 1):
    trials = [{"hash": f"h{i}", "pretrain_hash": f"p{i}", "seed": 0, "label": str(i), "axes_json": "{}",
               "spec_json": "{}"} for i in range(n)]
    return sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text=STUDY,
                         spec_hash="x", trials=trials)


def test_a_worker_taken_over_cannot_write_and_says_so(workdir: Path):
    engine = connect("sqlite:///db/mae_lab.db")
    study = _study(engine)
    first = claim_next(engine, study.id)
    old = claim_of(first)
    with transaction(engine) as s:  # its heartbeat went stale: another worker takes the trial over
        s.get(TrialRow, first.id).heartbeat_at = now() - timedelta(seconds=3600)
    second = claim_next(engine, study.id, stale_after_s=600)
    assert second is not None and second.attempts == 2
    new = claim_of(second)
    finish_trial(engine, second.id, "done", result={"linear_top1": 0.9}, claim=new)
    for write in (lambda: record_metrics(engine, first.id, "pretrain", 1, {"loss": 9.0}, claim=old),
                  lambda: record_checkpoint(engine, "p0", "x.pt", "sha", 1, claim=old),
                  lambda: finish_trial(engine, first.id, "done", result={"linear_top1": 0.1}, claim=old),
                  lambda: heartbeat(engine, old, "pretrain step 3")):
        with pytest.raises(LostClaim, match="lost its claim"):
            write()
    trial, result = study_trials(engine, study.id)[0]
    assert trial.status == "done" and result.linear_top1 == 0.9
    assert get_checkpoint(engine, "p0") is None and trial_details(engine, trial.id)[0] == []


def test_a_hung_worker_that_still_beats_is_taken_over(workdir: Path):
    engine = connect("sqlite:///db/mae_lab.db")
    study = _study(engine)
    row = claim_next(engine, study.id)
    claim = claim_of(row)
    heartbeat(engine, claim, "pretrain step 1")
    assert claim_next(engine, study.id, stale_after_s=1.0) is None  # alive and advancing
    with transaction(engine) as s:  # progress last moved an hour ago
        s.get(TrialRow, row.id).progress_at = now() - timedelta(seconds=3600)
    heartbeat(engine, claim, "pretrain step 1")  # beats on, same progress: still stale
    assert is_stale(get_trials(engine, [row.id])[0], 600)
    again = claim_next(engine, study.id, stale_after_s=600)
    assert again is not None and again.attempts == 2
    heartbeat(engine, claim_of(again), "pretrain step 5")
    shown = get_trials(engine, [row.id])[0]
    assert shown.progress == "pretrain step 5" and not is_stale(shown, 600)


TINY = study_toml("tiny", data={"dataset": "digits", "augmentation": "none"},
                  pretrain={"epochs": 2, "batch_size": 128}, linear={"epochs": 2, "warmup_epochs": 1})


def test_an_artifact_failure_keeps_the_trial_done_with_its_numbers(workdir: Path):
    (workdir / "tiny.toml").write_text(TINY)
    (workdir / "db" / "artifacts").mkdir(parents=True)
    (workdir / "db" / "artifacts" / "recon").write_text("a file where the recon folder goes")
    res = CliRunner().invoke(app, ["run", "tiny.toml", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    [(trial, result)] = study_trials(engine, get_study(engine, "tiny").id)
    assert trial.status == "done" and trial.error is None
    assert result.linear_top1 > 0 and result.pretrain_loss > 0 and result.encoder_gflops > 0  # recorded first
    assert "recon" in result.artifact_error  # the failed artifact, said as such
    _, _, arts = trial_details(engine, trial.id)
    assert [a.kind for a in arts] == ["checkpoint"]
    assert trial.resolved_precision in ("fp32", "bf16") and trial.world_size == 1 and trial.device_name
    assert trial.cpu_threads == torch.get_num_threads()  # the summary's core-minutes stand on it
    assert f"({torch.backends.cpu.get_cpu_capability()}, " in trial.device_name  # what sets a CPU's speed
    assert trial.data_fingerprint and trial.mae_lab_version and trial.git_commit
    shown = CliRunner().invoke(app, ["show", str(trial.id)])
    assert "world size 1" in shown.output and f"cpu threads {trial.cpu_threads}" in shown.output
    assert f"precision {trial.resolved_precision}" in shown.output, shown.output
