"""Fencing through the runner and the search: a worker whose trial is taken over while it runs (another worker
claims it again through the database) stops with "lost" and writes nothing more; the successor's rows survive.

Three ways to lose a claim: mid-pretraining, noticed by the heartbeat thread and acted on at the next batch
(``beat.check``); before any beat notices, refused at the next fenced write (the runner's ``claim=claim``); and
between a search's claim and its copy of a done result (``adopt_result`` under the claim)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import study_toml
from test_search import invoke

from mae_lab.run import search
from mae_lab.run.progress import PlainDisplay
from mae_lab.run.runner import run_study
from mae_lab.store.engine import connect
from mae_lab.store.queue import Claim, LostClaim, claim_next, claim_of, claim_trial
from mae_lab.store.reads import (
    find_done,
    get_checkpoint,
    get_result,
    get_study,
    get_trials,
    study_trials,
    trial_details,
)
from mae_lab.store.writes import adopt_result, finish_trial, record_checkpoint, record_metrics, sync_study

URL = "sqlite:///db/mae_lab.db"
# one trial: two epochs of many small batches (a pretraining epoch of seconds, a batch of milliseconds)
STUDY = study_toml("fence", pretrain={"epochs": 2, "batch_size": 8, "warmup_epochs": 0},
                   linear={"epochs": 1, "warmup_epochs": 0})
QUICK = {"pretrain": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0}, "linear": {"epochs": 1, "warmup_epochs": 0}}


class Recorder(PlainDisplay):
    """Keeps every line; ``on_pretrain`` runs when the pretraining stage starts."""

    def __init__(self, on_pretrain=None):
        super().__init__()
        self.lines: list[str] = []
        self.on_pretrain = on_pretrain

    def _print(self, line):  # kept, not printed: the victim's thread may outlive pytest's capture of stdout
        self.lines.append(line)

    def stage(self, name, total):
        if name == "pretrain" and self.on_pretrain is not None:
            self.on_pretrain()


def take_over(engine, trial_id: int) -> Claim:
    """Another worker claims the running trial again (its heartbeat counts as stale at once) and writes its own
    pretraining metric, checkpoint record and result."""
    row = claim_trial(engine, trial_id, stale_after_s=0)
    assert row is not None and row.attempts == 2
    claim = claim_of(row)
    record_metrics(engine, trial_id, "pretrain", 1, {"loss": 42.0}, claim=claim)
    record_checkpoint(engine, row.pretrain_hash, "successor.pt", "successor-sha", 1, claim=claim)
    finish_trial(engine, trial_id, "done", result={"linear_top1": 0.123}, claim=claim)
    return claim


def assert_successor_kept(engine) -> None:
    (trial, result), = study_trials(engine, get_study(engine, "fence").id)
    assert (trial.status, trial.attempts, result.linear_top1) == ("done", 2, 0.123)
    metrics, _, _ = trial_details(engine, trial.id)
    assert [(m.stage, m.epoch, m.name, m.value) for m in metrics] == [("pretrain", 1, "loss", 42.0)]
    assert get_checkpoint(engine, trial.pretrain_hash).sha256 == "successor-sha"


def test_a_claim_lost_mid_pretraining_stops_the_worker_at_the_next_batch(workdir: Path):
    (workdir / "fence.toml").write_text(STUDY)
    display, out = Recorder(), {}
    victim = threading.Thread(target=lambda: out.update(s=run_study(
        "fence.toml", db_url=URL, device="cpu", display=display, heartbeat_s=0.02)))
    victim.start()
    engine, deadline = None, time.monotonic() + 120
    while True:  # wait for the victim's heartbeat to show it a few batches into its pretraining
        assert victim.is_alive() and time.monotonic() < deadline, display.lines
        if Path("db/mae_lab.db").exists():
            engine = engine or connect(URL, create=False)
            rows = study_trials(engine, 1) if get_study(engine, "fence") else []
            progress = rows[0][0].progress if rows else None
            if progress and progress.startswith("pretrain step") and int(progress.split()[-1]) >= 3:
                break
        time.sleep(0.005)
    take_over(engine, rows[0][0].id)
    victim.join(timeout=120)
    assert out["s"].ran == [(rows[0][0].hash, "lost")]
    assert any("lost its claim" in line for line in display.lines), display.lines
    assert_successor_kept(engine)
    # it stopped within its first epoch: the epoch's checkpoint file was never written
    assert not list((workdir / "db" / "artifacts" / "pretrain").glob("*.pt"))


def test_a_claim_lost_before_any_beat_is_refused_at_the_next_write(workdir: Path):
    (workdir / "fence.toml").write_text(STUDY)
    engine = connect(URL)
    display = Recorder(on_pretrain=lambda: take_over(engine, 1))  # taken over as the pretraining starts
    summary = run_study("fence.toml", db_url=URL, device="cpu", display=display, heartbeat_s=3600)
    assert summary.ran == [(get_trials(engine, [1])[0].hash, "lost")]
    assert any("lost its claim" in line for line in display.lines), display.lines
    assert_successor_kept(engine)


def test_a_search_that_loses_its_claim_does_not_copy_a_result_over_the_successor(workdir: Path, monkeypatch):
    (workdir / "grid.toml").write_text(study_toml("grid", **QUICK, tail='[grid]\n"model.mask_ratio" = [0.5]\n'))
    (workdir / "gs.toml").write_text(study_toml("gs", **QUICK, search={"n_trials": 1, "sampler": "grid"},
                                                space={"model.mask_ratio": {"type": "categorical", "choices": [0.5]}}))
    res = invoke("run", "grid.toml", "--device", "cpu")
    assert res.exit_code == 0, res.output
    engine = connect(URL)
    real_find_done = find_done

    def find_done_after_a_takeover(eng, trial_hash: str):  # between the search's claim and its copy
        gs = get_study(engine, "gs")
        (trial, _), = study_trials(engine, gs.id)
        row = claim_trial(engine, trial.id, stale_after_s=0)
        finish_trial(engine, row.id, "done", result={"linear_top1": 0.123}, claim=claim_of(row))
        return real_find_done(eng, trial_hash)

    monkeypatch.setattr(search, "find_done", find_done_after_a_takeover)  # the name search calls
    res = invoke("search", "gs.toml", "--device", "cpu")
    assert "lost its claim" in res.output, res.output
    (trial, result), = study_trials(engine, get_study(engine, "gs").id)
    assert (trial.status, trial.attempts, result.linear_top1, result.result_copied) == ("done", 2, 0.123, None)
    assert trial_details(engine, trial.id)[0] == []  # none of the grid trial's metrics were copied in


def test_adopt_result_is_fenced(workdir: Path):
    engine = connect(URL)
    study = sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text="", spec_hash="x",
                          trials=[{"hash": h, "pretrain_hash": h, "seed": 0, "label": "", "axes_json": "{}",
                                   "spec_json": "{}"} for h in ("a", "b")])
    source = claim_next(engine, study.id)
    finish_trial(engine, source.id, "done", result={"linear_top1": 0.9}, claim=claim_of(source))
    first = claim_next(engine, study.id)
    second = claim_trial(engine, first.id, stale_after_s=0)
    with pytest.raises(LostClaim):
        adopt_result(engine, first.id, get_result(engine, source.id), claim=claim_of(first))
    adopt_result(engine, second.id, get_result(engine, source.id), claim=claim_of(second))
    assert get_result(engine, second.id).linear_top1 == 0.9
