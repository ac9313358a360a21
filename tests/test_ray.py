"""`mae-lab ray`: workers as Ray tasks on a local Ray cluster (``ray.init(num_cpus=2)``), on the embedded digits.

The tests that need Ray are skipped, with the reason, where the extra mae-lab[ray] is not installed; the bad-input
tests that need no cluster run everywhere.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, mae_lab, query
from test_resume import pretrained_epochs
from test_slurm import assert_each_epoch_once, ckpt_epoch, tiny, wait_for
from typer.testing import CliRunner

from cli import app
from mae_lab.run import ray_launch
from mae_lab.run.ray_launch import RayError, RayJob, check_cluster

ray = ray_launch.ray  # None without the extra
NO_RAY = "Ray is not installed (pip install 'mae-lab[ray]')"


@pytest.fixture(scope="module")
def cluster() -> str:
    """A one-node Ray cluster started by this process (2 CPUs); its address."""
    if ray is None:
        pytest.skip(NO_RAY)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# --- bad input: exit 2, one line naming the option, nothing started -------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["--workers", "0"], "--workers 0"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker -1"),
    (["--gpus-per-worker", "1", "--nproc", "2"], "--nproc 2"),
    (["--max-retries", "-1"], "--max-retries -1"),
])
def test_bad_options_are_one_line_and_start_nothing(workdir: Path, args: list[str], option: str):
    (workdir / "s.toml").write_text(tiny("s"))
    res = CliRunner().invoke(app, ["ray", "s.toml", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {option}") and len(res.output.strip().splitlines()) == 1, res.output
    assert not (workdir / "db").exists()


def test_an_unknown_study_file_is_one_line(workdir: Path):
    res = CliRunner().invoke(app, ["ray", "nope.toml"])
    assert res.exit_code == 2 and "nope.toml" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (workdir / "db").exists()


def test_sqlite_on_several_nodes_points_to_postgresql():
    job = RayJob(study=Path("s.toml"), workers=2, address="head:6379")
    with pytest.raises(RayError, match=r"^--db sqlite:///db.*2 nodes: use PostgreSQL"):
        check_cluster(job, "sqlite:///db/mae_lab.db", nodes=2)
    check_cluster(job, "sqlite:///db/mae_lab.db", nodes=1)  # one node: SQLite serves it
    check_cluster(job, "postgresql://mae@head/mae", nodes=2)
    check_cluster(RayJob(study=Path("s.toml"), workers=1), "sqlite:///db/mae_lab.db", nodes=2)


def test_without_ray_the_command_is_one_line(workdir: Path):
    (workdir / "s.toml").write_text(tiny("s"))
    program = ("import sys\nsys.modules['ray'] = None  # as if mae-lab[ray] were not installed\n"
               "sys.argv = ['mae-lab', 'ray', 's.toml', '--address', 'local']\nfrom cli import app\napp()\n")
    res = subprocess.run([sys.executable, "-c", program], cwd=workdir, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == ['error: mae-lab ray needs Ray: pip install "mae-lab[ray]"']
    assert not (workdir / "db").exists()


def test_no_cluster_at_the_address_is_one_line(workdir: Path):
    if ray is None:
        pytest.skip(NO_RAY)
    (workdir / "s.toml").write_text(tiny("s"))
    proc = mae_lab("ray", "s.toml", "--address", "127.0.0.1:9", cwd=workdir)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and out.startswith("error: --address 127.0.0.1:9: no Ray cluster"), out
    assert not (workdir / "db").exists()


# --- on the cluster --------------------------------------------------------------------------------------------

def attempts(log: str) -> list[str]:
    """A task's log split at each start of its worker (Ray's retries append to the same file)."""
    return re.split(r"^mae-lab: ray task \d+ on ", log, flags=re.M)[1:]


@pytest.mark.slow
def test_two_tasks_drain_a_sqlite_study_once(workdir: Path, cluster: str):
    (workdir / "grid.toml").write_text(tiny("grid", seeds=[0, 1], tail='[grid]\n"model.mask_ratio" = [0.5, 0.75]\n'))
    proc = mae_lab("ray", "grid.toml", "--workers", "2", "--address", cluster, "--device", "cpu", "--poll", "0.5",
                   cwd=workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert re.search(r"^worker 0 on \S+: exit 0$", out, re.M) and re.search(r"^worker 1 on \S+: exit 0$", out, re.M)
    db = workdir / "db" / "mae_lab.db"
    rows = query(db, "SELECT status, attempts FROM mae_trials")
    assert rows == [("done", 1)] * 4, (rows, out)
    assert query(db, "SELECT count(*), count(DISTINCT trial_id) FROM mae_results") == [(4, 4)]
    logs = sorted((workdir / "db" / "ray").glob("grid-*.out"))
    assert [p.name for p in logs] == ["grid-0.out", "grid-1.out"]


@pytest.mark.slow
def test_search_study_drained_by_ray_tasks(workdir: Path, cluster: str):
    (workdir / "srch.toml").write_text(tiny("srch", search={"n_trials": 3, "sampler": "random"},
                                            space={"model.mask_ratio": {"type": "float", "low": 0.4, "high": 0.9}}))
    said: list[str] = []
    job = RayJob(study=workdir / "srch.toml", workers=2, address=cluster, device="cpu")
    assert ray_launch.launch(job, said.append) == 0, said
    assert said[0].startswith("started 2 x mae-lab search")
    db = workdir / "db" / "mae_lab.db"
    assert sorted(query(db, "SELECT state FROM trials")) == [("COMPLETE",)] * 3  # Optuna's own table
    assert [s for (s,) in query(db, "SELECT status FROM mae_trials")] == ["done"] * 3


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_and_resumes_from_the_checkpoint(workdir: Path, cluster: str):
    """SIGKILL the worker (no handler runs, its trial stays 'running' under a dead PID); Ray retries the task, and
    the retry takes the trial over at once (the heartbeat would wait an hour) and resumes it after epoch k."""
    epochs = 5
    (workdir / "k.toml").write_text(tiny("k", epochs=epochs, samples=512))
    db = workdir / "db" / "mae_lab.db"
    job = RayJob(study=workdir / "k.toml", workers=1, address=cluster, device="cpu", poll=0.5, stale_after=3600,
                 max_retries=1)
    launched = ray_launch.start(job)
    wait_for(lambda: ckpt_epoch(db) >= 1, "the first checkpoint", 300)
    (worker,), = query(db, "SELECT worker FROM mae_trials WHERE status = 'running'")
    os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
    ready, _ = ray.wait(launched.refs, timeout=180)
    if not ready:
        for ref in launched.refs:
            ray.cancel(ref, force=True)
        pytest.fail("the retried task did not take the killed worker's trial over")
    said: list[str] = []
    assert ray_launch.wait(launched, said.append) == 0, said
    log = (workdir / "db" / "ray" / "k-0.out").read_text()
    first, second = attempts(log)
    assert "exited with code -9" in first, log
    (status, attempts_, resumed), = query(db, "SELECT status, attempts, resumed_from_epoch FROM mae_trials")
    assert status == "done" and attempts_ == 2 and resumed >= 1, log
    assert pretrained_epochs(second) == list(range(resumed + 1, epochs + 1)), log  # resumed after epoch k
    assert_each_epoch_once(log, epochs)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cancel", "kill"])
def test_a_task_killed_takes_its_worker_along_and_the_trial_resumes(workdir: Path, cluster: str, how: str):
    """ray.cancel(force=True), or SIGKILL, ends the task's process; its worker dies with it (no orphan keeps the
    trial: PR_SET_PDEATHSIG), and the other task, or Ray's retry of a killed one, takes the trial over and resumes
    it from the checkpoint."""
    epochs = 6
    (workdir / "fc.toml").write_text(tiny("fc", epochs=epochs, samples=512))
    db = workdir / "db" / "mae_lab.db"
    job = RayJob(study=workdir / "fc.toml", workers=2, address=cluster, device="cpu", poll=0.5, stale_after=3600)
    launched = ray_launch.start(job)
    wait_for(lambda: ckpt_epoch(db) >= 1, "the first checkpoint", 300)
    (worker,), = query(db, "SELECT worker FROM mae_trials WHERE status = 'running'")
    child = int(worker.rsplit(":", 1)[1])
    task_pid = parent_of(child)
    logs = {i: (workdir / "db" / "ray" / f"fc-{i}.out").read_text() for i in range(2)}
    [i] = [i for i, log in logs.items() if f"(pid {task_pid})" in log]
    if how == "cancel":
        ray.cancel(launched.refs[i], force=True)
    else:
        os.kill(task_pid, signal.SIGKILL)  # a crash: Ray retries the task
    wait_for(lambda: gone(child), "the cancelled task's worker to end", 60)
    ready, _ = ray.wait(launched.refs, num_returns=2, timeout=180)
    assert len(ready) == 2, "the other worker did not take the trial over"
    said: list[str] = []
    code = ray_launch.wait(launched, said.append)
    if how == "cancel":
        assert code == 1 and any(line.startswith(f"worker {i}:") and "cancel" in line.lower() for line in said)
    else:
        assert code == 0, said
    (status, attempts_, resumed), = query(db, "SELECT status, attempts, resumed_from_epoch FROM mae_trials")
    assert status == "done" and attempts_ == 2 and resumed >= 1, said
    both = "".join((workdir / "db" / "ray" / f"fc-{k}.out").read_text() for k in (i, 1 - i))
    assert_each_epoch_once(both, epochs)


@pytest.mark.slow
def test_ctrl_c_stops_the_tasks_and_marks_the_trial_interrupted(workdir: Path, cluster: str):
    # long enough that the cancel lands mid-trial: 30 epochs (8 s at CI's ~2,000 img/s) ended first there
    (workdir / "cc.toml").write_text(tiny("cc", epochs=300, samples=512))
    db = workdir / "db" / "mae_lab.db"
    proc = mae_lab("ray", "cc.toml", "--workers", "1", "--address", cluster, "--device", "cpu", cwd=workdir)
    wait_for(lambda: ckpt_epoch(db) >= 1, "the first checkpoint", 300)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert query(db, "SELECT status FROM mae_trials") == [("interrupted",)], out
    assert "cancelled: the worker exited with code 143" in (workdir / "db" / "ray" / "cc-0.out").read_text()
