"""Chaos soak on PostgreSQL: 4 `mae-lab worker` processes drain a 16-trial digits study while a driver SIGKILLs a
random one of those running a trial every 2-4 s and starts a replacement, for at most KILL_PHASE_S from the first
claim; then the survivors finish. Afterwards
every trial is done exactly once (one result, attempts recorded, no duplicated metric), each result equals a clean
single-process run of the same trial (same hash, top-1 within 1e-6), and every checkpoint and artifact on disk is
recorded with its sha256 and every record points at a file with that sha256 (no orphan, no temp file left)."""
from __future__ import annotations

import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import mae_lab, study_toml
from test_workers import pg_rows, pg_url  # noqa: F401 - pg_url is a fixture

from mae_lab.train.checkpoint import sha256_file

STUDY = study_toml("chaos", study={"seeds": [0, 1, 2, 3]},
                   pretrain={"epochs": 2, "batch_size": 128, "warmup_epochs": 0},
                   linear={"epochs": 1, "warmup_epochs": 0},
                   tail='[grid]\n"model.mask_ratio" = [0.5, 0.6, 0.75, 0.9]\n')
KILL_PHASE_S = 60.0
RESULTS = "SELECT t.hash, r.linear_top1, r.pretrain_loss FROM mae_trials t JOIN mae_results r ON r.trial_id = t.id"


def done(url: str) -> int:
    try:
        return pg_rows(url, "SELECT count(*) FROM mae_trials WHERE status = 'done'")[0][0]
    except Exception:  # noqa: BLE001 - the tables may not exist yet
        return 0


def running_pids(url: str) -> set[int]:
    try:
        got = pg_rows(url, "SELECT worker FROM mae_trials WHERE status = 'running'")
    except Exception:  # noqa: BLE001 - the tables may not exist yet
        return set()
    return {int(w.rpartition(":")[2]) for (w,) in got if w}


@pytest.mark.slow
def test_chaos_soak(workdir: Path, pg_url: str):  # noqa: F811
    clean, chaos = workdir / "clean", workdir / "chaos"
    for d in (clean, chaos):
        d.mkdir()
        (d / "chaos.toml").write_text(STUDY)
    out = mae_lab("run", "chaos.toml", "--device", "cpu", cwd=clean).communicate(timeout=600)[0]
    with sqlite3.connect(clean / "db" / "mae_lab.db") as c:
        want = {h: (top1, loss) for h, top1, loss in c.execute(RESULTS)}
    assert len(want) == 16, out

    def start():
        return mae_lab("worker", "chaos.toml", "--db", pg_url, "--device", "cpu", "--poll", "0.5", cwd=chaos)

    rng, workers, kills = random.Random(0), [start() for _ in range(4)], 0
    deadline = time.monotonic() + 300
    while not running_pids(pg_url):  # the kill phase starts with the first trial running
        assert time.monotonic() < deadline and all(p.poll() is None for p in workers), "no worker started a trial"
        time.sleep(0.2)
    t0 = time.monotonic()
    while time.monotonic() - t0 < KILL_PHASE_S and done(pg_url) < 16:
        time.sleep(rng.uniform(2.0, 4.0))
        live = [p for p in workers if p.poll() is None]
        if not live:
            break
        busy = [p for p in live if p.pid in running_pids(pg_url)]  # a kill of a worker still starting tests little
        if not busy:
            continue
        victim = rng.choice(busy)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        workers.append(start())
    assert kills >= 3, kills  # the soak did kill, workers in the middle of a trial
    outs = [p.communicate(timeout=300)[0] for p in workers]
    assert all(p.returncode in (0, -signal.SIGKILL) for p in workers), outs
    assert any(p.returncode == 0 for p in workers)

    trials = pg_rows(pg_url, "SELECT hash, status, attempts FROM mae_trials")
    assert len(trials) == 16 and all(st == "done" and n >= 1 for _, st, n in trials), trials
    assert sum(n for *_, n in trials) > 16, trials  # some trial was killed mid-run and taken over
    assert pg_rows(pg_url, "SELECT count(*), count(DISTINCT trial_id) FROM mae_results") == [(16, 16)]
    assert pg_rows(pg_url, "SELECT count(*) FROM (SELECT trial_id, stage, epoch, name FROM mae_metrics "
                           "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d") == [(0,)]
    got = {h: (top1, loss) for h, top1, loss in pg_rows(pg_url, RESULTS)}
    assert sorted(got) == sorted(want)
    for h, (top1, loss) in got.items():
        assert top1 == pytest.approx(want[h][0], abs=1e-6) and loss == pytest.approx(want[h][1], rel=1e-6), h

    recorded = pg_rows(pg_url, "SELECT path, sha256 FROM mae_artifacts UNION SELECT path, sha256 FROM "
                               "mae_checkpoints")
    for path, sha in recorded:
        assert Path(path).is_file() and sha256_file(path) == sha, path
    on_disk = {str(p) for p in (chaos / "db" / "artifacts").rglob("*") if p.is_file() and p.suffix != ".lock"}
    assert on_disk - {p for p, _ in recorded} == set()  # nothing orphaned: no unrecorded file, no temp file
