"""Worker identity: ``host:node:pid``, where node names this boot of this machine and its PID namespace. A dead PID
means a dead worker only inside one PID space: a worker of another machine (or container) with the same hostname is
never taken for dead here, however its PID looks; its heartbeat decides."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mae_lab.store import workers
from mae_lab.store.engine import connect, transaction
from mae_lab.store.queue import claim_next, is_stale, release_dead_local
from mae_lab.store.reads import study_trials
from mae_lab.store.tables import TrialRow
from mae_lab.store.writes import sync_study


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def one_running_trial(engine, worker: str) -> int:
    study = sync_study(engine, name="s", description="", paper=None, path="s.toml", spec_text="", spec_hash="x",
                          trials=[{"hash": "h", "pretrain_hash": "p", "seed": 0, "label": "", "axes_json": "{}",
                                   "spec_json": "{}"}])
    row = claim_next(engine, study.id)
    with transaction(engine) as s:  # the claim now belongs to `worker`, with a fresh heartbeat
        s.get(TrialRow, row.id).worker = worker
    return study.id


def test_worker_id_names_host_node_and_pid():
    host, node, pid = workers.worker_id().split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid())) and len(node) == 12
    code = "from mae_lab.store import workers; print(workers.worker_id())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert child.rpartition(":")[0] == f"{host}:{node}"  # another process of this machine: the same node


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a PID namespace needs root")
def test_another_pid_namespace_is_another_node():
    code = "from mae_lab.store import workers; print(workers.node())"
    got = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    if got.returncode != 0:
        pytest.skip(f"unshare refused here: {got.stderr.strip()[:80]}")
    assert got.stdout.strip() != workers.node()


def test_a_same_hostname_worker_of_another_machine_is_not_taken_for_dead(tmp_path: Path):
    engine = connect(f"sqlite:///{tmp_path / 'w.db'}")
    other = f"{socket.gethostname()}:{'f' * 12 if workers.node() != 'f' * 12 else 'e' * 12}:{dead_pid()}"
    study_id = one_running_trial(engine, other)
    assert release_dead_local(engine, study_id) == 0
    assert claim_next(engine, study_id) is None  # its heartbeat is fresh: it runs elsewhere
    (row, _), = study_trials(engine, study_id)
    assert (row.status, row.worker) == ("running", other) and not is_stale(row)


def test_a_dead_worker_of_this_machine_is_released_at_once(tmp_path: Path):
    engine = connect(f"sqlite:///{tmp_path / 'w.db'}")
    mine = f"{workers.local_prefix()}{dead_pid()}"
    study_id = one_running_trial(engine, mine)
    (row, _), = study_trials(engine, study_id)
    assert is_stale(row)
    again = claim_next(engine, study_id)  # releases it first (heartbeat still fresh), then claims it
    assert again is not None and again.attempts == 2 and again.worker == workers.worker_id()


def test_an_older_host_pid_worker_waits_for_its_heartbeat(tmp_path: Path):
    engine = connect(f"sqlite:///{tmp_path / 'w.db'}")
    study_id = one_running_trial(engine, f"{socket.gethostname()}:{dead_pid()}")  # as an older mae-lab recorded it
    assert release_dead_local(engine, study_id) == 0 and claim_next(engine, study_id) is None
