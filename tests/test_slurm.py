"""`mae-lab slurm`: job arrays of workers on a real SLURM (slurmctld + slurmd, one node), on the embedded digits.

``.ci/run`` starts the cluster (.ci/slurm.sh) and sets MAE_LAB_TEST_SLURM and SLURM_CONF; without them the tests
that submit are skipped (failed in CI). The bad-input tests that need no cluster run everywhere.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import mae_lab, query, study_toml
from test_resume import pretrained_epochs
from test_workers import pg_rows, pg_url  # noqa: F401 - the fixture
from typer.testing import CliRunner

from cli import app
from mae_lab.run.boundary import Terminated, interrupted_code, stop_handler
from mae_lab.run.slurm import time_limit_s

QUICK = {"epochs": 1, "warmup_epochs": 0}


def tiny(name: str, *, epochs: int = 1, seeds: list[int] = [0], samples: int = 256, tail: str = "",  # noqa: B006
         **kwargs) -> str:
    return study_toml(name, study={"seeds": seeds}, data={"augmentation": "none", "train_samples": samples},
                      pretrain={"epochs": epochs, "batch_size": 32, "warmup_epochs": 0}, linear=QUICK, tail=tail,
                      **kwargs)


def cluster_reason() -> str | None:
    if not os.environ.get("MAE_LAB_TEST_SLURM"):
        return "MAE_LAB_TEST_SLURM is not set (no SLURM cluster here; .ci/run starts one with .ci/slurm.sh)"
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "MAE_LAB_TEST_SLURM is set but sbatch/sinfo are not on PATH"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"SLURM does not answer: {probe.stderr.strip() or 'sinfo lists no node'}"
    return None


@pytest.fixture
def cluster(workdir: Path):
    """The running cluster (skipped without one); the jobs a test submitted are cancelled afterwards."""
    reason = cluster_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    jobs: list[str] = []
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True)


def submit(cluster: list[str], cwd: Path, *args: str) -> str:
    proc = mae_lab("slurm", *args, "--device", "cpu", "--poll", "0.5", cwd=cwd)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    job = re.search(r"submitted job array (\d+)", out).group(1)
    cluster.append(job)
    return job


def queued(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def wait_gone(job: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while queued(job):
        assert time.time() < deadline, f"job {job} still queued after {timeout:.0f}s: {queued(job)}"
        time.sleep(1)


def wait_for(cond, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def logs(cwd: Path, job: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((cwd / "db" / "slurm").glob(f"*-{job}_*.out"))}


def ckpt_epoch(db: Path) -> int:
    try:
        return query(db, "SELECT max(epoch) FROM mae_checkpoints")[0][0] or 0
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def assert_each_epoch_once(log: str, epochs: int) -> None:
    """Completed pretraining epochs over every attempt of one trial: each exactly once (resumed, never rerun)."""
    assert sorted(pretrained_epochs(log)) == list(range(1, epochs + 1)), log


# --- bad input: exit 2, one line naming the option, nothing submitted ------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["--workers", "0"], "--workers 0"),
    (["--gpus-per-worker", "1", "--nproc", "2"], "--nproc 2"),
    (["--time", "2", "--signal", "TERM@300"], "--time 2"),
    (["--signal", "KILL@60"], "--signal KILL@60"),
    (["--signal", "HUP"], "--signal HUP"),
    (["--workers", "2", "--nodelist", "a,b"], "--db sqlite:"),
])
def test_bad_options_are_one_line_and_submit_nothing(workdir: Path, args: list[str], option: str):
    (workdir / "s.toml").write_text(tiny("s"))
    res = CliRunner().invoke(app, ["slurm", "s.toml", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {option}") and len(res.output.strip().splitlines()) == 1, res.output
    assert not (workdir / "db").exists()  # no database, no script


def test_sqlite_multi_node_points_to_postgresql(workdir: Path):
    (workdir / "s.toml").write_text(tiny("s"))
    res = CliRunner().invoke(app, ["slurm", "s.toml", "--workers", "4", "--nodelist", "n[1-4]"])
    assert res.exit_code == 2 and "PostgreSQL" in res.output and "--nodelist" in res.output, res.output


def test_sbatch_missing_from_path_is_one_line(workdir: Path):
    (workdir / "s.toml").write_text(tiny("s"))
    env_path = os.environ["PATH"]
    os.environ["PATH"] = str(workdir)  # python is started by its full path; sbatch is not found
    try:
        proc = mae_lab("slurm", "s.toml", "--workers", "1", cwd=workdir)
        out, _ = proc.communicate(timeout=120)
    finally:
        os.environ["PATH"] = env_path
    assert proc.returncode == 2 and out.startswith("error: sbatch is not on PATH"), out
    assert not (workdir / "db").exists()


def test_only_the_first_stop_signal_raises():
    """srun and torchrun each pass a stop on: the second must not interrupt the first one's cleanup."""
    on_stop = stop_handler()
    with pytest.raises(Terminated) as first:
        on_stop(signal.SIGUSR1, None)
    assert interrupted_code(first.value) == 138 and "SIGUSR1" in str(first.value)
    try:
        on_stop(signal.SIGTERM, None)  # ignored: the run is already unwinding
    except Terminated:
        pytest.fail("a second stop signal raised again")


def test_time_limits_and_the_script(workdir: Path):
    assert [time_limit_s(t) for t in ("5", "5:30", "1:00:00", "2-0", "1-2:03", "1-0:0:7")] == \
        [300, 330, 3600, 172800, 93780, 86407]
    (workdir / "s.toml").write_text(tiny("s"))
    res = CliRunner().invoke(app, ["slurm", "s.toml", "--workers", "3", "--parallel", "2", "--gpus-per-worker", "2",
                                   "--nproc", "2", "--partition", "gpu", "--time", "4:00:00", "--signal", "B:USR1@300",
                                   "--sbatch", "--exclusive", "--nodelist", "n1", "--dry-run"])
    out = res.output
    assert res.exit_code == 0, out
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --gres=gpu:2", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4:00:00", "#SBATCH --exclusive", "--nproc 2"):
        assert line in out, out
    assert not (workdir / "db").exists()


# --- against the cluster ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_unknown_partition_is_sbatchs_refusal_in_one_line(workdir: Path, cluster):
    (workdir / "s.toml").write_text(tiny("s"))
    proc = mae_lab("slurm", "s.toml", "--workers", "1", "--partition", "nope", cwd=workdir)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out.startswith("error: --partition: sbatch refused"), out
    assert len(out.strip().splitlines()) == 1, out
    assert not (workdir / "db" / "slurm").exists()


@pytest.mark.slow
def test_two_task_array_drains_a_sqlite_study_once(workdir: Path, cluster):
    (workdir / "grid.toml").write_text(tiny("grid", seeds=[0, 1], tail='[grid]\n"model.mask_ratio" = [0.5, 0.75]\n'))
    job = submit(cluster, workdir, "grid.toml", "--workers", "2", "--cpus-per-worker", "1")
    wait_gone(job)
    db = workdir / "db" / "mae_lab.db"
    rows = query(db, "SELECT status, attempts, slurm_job FROM mae_trials")
    assert len(rows) == 4 and all(r[:2] == ("done", 1) for r in rows), (rows, logs(workdir, job))
    assert {r[2] for r in rows} <= {f"{job}_0", f"{job}_1"}, rows  # each trial records the array task that ran it
    assert query(db, "SELECT count(*), count(DISTINCT trial_id) FROM mae_results") == [(4, 4)]
    assert (workdir / "db" / "slurm" / "grid.sbatch").read_text().startswith("#!/bin/bash")
    out, _ = mae_lab("list", cwd=workdir).communicate(timeout=60)
    assert re.search(r"grid\s*│\s*0\s*│\s*0\s*│\s*4\b", out), out  # pending 0, running 0, done 4


@pytest.mark.slow
def test_search_study_drained_by_an_array(workdir: Path, cluster):
    (workdir / "srch.toml").write_text(tiny("srch", search={"n_trials": 3, "sampler": "random"},
                                            space={"model.mask_ratio": {"type": "float", "low": 0.4, "high": 0.9}}))
    job = submit(cluster, workdir, "srch.toml", "--workers", "2", "--cpus-per-worker", "1")
    wait_gone(job)
    db = workdir / "db" / "mae_lab.db"
    states = query(db, "SELECT state FROM trials")
    assert sorted(states) == [("COMPLETE",)] * 3, (states, logs(workdir, job))
    assert [s for (s,) in query(db, "SELECT status FROM mae_trials")] == ["done"] * 3


@pytest.mark.slow
def test_requeued_task_resumes_its_trial_from_the_checkpoint(workdir: Path, cluster):
    (workdir / "rq.toml").write_text(tiny("rq", epochs=5, samples=512))
    db = workdir / "db" / "mae_lab.db"
    job = submit(cluster, workdir, "rq.toml", "--workers", "1")
    wait_for(lambda: ckpt_epoch(db) >= 1, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True)
    wait_gone(job)
    [log] = logs(workdir, job).values()
    (status, attempts, resumed), = query(db, "SELECT status, attempts, resumed_from_epoch FROM mae_trials")
    assert status == "done" and attempts == 2 and resumed >= 1, log
    second = log[log.index("restart 1"):]
    assert pretrained_epochs(second) == list(range(resumed + 1, 6)), log  # resumed after epoch k, not from 1
    assert_each_epoch_once(log, 5)


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [("TERM@110", 143), ("B:USR1@110", 138)])  # B: the batch shell passes it on
def test_time_limit_signal_requeues_and_completes(workdir: Path, cluster, stop: str, code: int):
    """SLURM checks time limits every ~30 s and sends --signal up to 60 s early, so a short limit lands anywhere;
    the test moves the limit instead: once the trial has a checkpoint, the task's limit drops to 2 minutes (within
    the 110 s lead: TERM at the next check), and once it has requeued itself the limit is raised again."""
    # The trial must outlast the next of SLURM's time-limit checks (~30 s apart) by a margin: 150 epochs of the 1,497
    # digits are ~2 min at CI's ~2,000 img/s (30 epochs, 24 s there, ended before the signal came)
    (workdir / "tl.toml").write_text(tiny("tl", epochs=150, samples=1497))
    db = workdir / "db" / "mae_lab.db"
    job = submit(cluster, workdir, "tl.toml", "--workers", "1", "--time", "5", "--signal", stop)
    wait_for(lambda: ckpt_epoch(db) >= 1, "the first checkpoint")
    subprocess.run(["scontrol", "update", f"JobId={job}_0", "TimeLimit=2"], check=True)
    wait_for(lambda: "requeueing job" in "".join(logs(workdir, job).values()), "the task to requeue itself", 180)
    subprocess.run(["scontrol", "update", f"JobId={job}_0", "TimeLimit=5"], check=True)
    wait_gone(job)
    [log] = logs(workdir, job).values()
    assert f"exited with code {code}" in log and "restart 1" in log, log
    (status, attempts, resumed), = query(db, "SELECT status, attempts, resumed_from_epoch FROM mae_trials")
    assert status == "done" and attempts >= 2 and resumed >= 1, log
    assert query(db, "SELECT count(*) FROM mae_results") == [(1,)]
    assert_each_epoch_once(log, 150)


@pytest.mark.slow
def test_preemption_by_a_higher_partition_completes_nothing_twice(workdir: Path, cluster):
    (workdir / "pre.toml").write_text(tiny("pre", epochs=6, samples=512))
    db = workdir / "db" / "mae_lab.db"
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    job = submit(cluster, workdir, "pre.toml", "--workers", "1", "--partition", "low", "--cpus-per-worker", cpus)
    wait_for(lambda: ckpt_epoch(db) >= 1, "the first checkpoint")
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", cpus, "-o", "/dev/null", "--wrap", "sleep 2"],
                          capture_output=True, text=True, check=True).stdout.strip()
    cluster.append(high)
    wait_gone(job)
    [log] = logs(workdir, job).values()
    assert "restart 1" in log, log  # it was preempted and started again
    (status, attempts), = query(db, "SELECT status, attempts FROM mae_trials")
    assert status == "done" and attempts == 2, log
    assert query(db, "SELECT count(*) FROM mae_results") == [(1,)]
    assert_each_epoch_once(log, 6)


@pytest.mark.slow
def test_nproc_two_inside_a_task(workdir: Path, cluster):
    (workdir / "dp.toml").write_text(tiny("dp"))
    job = submit(cluster, workdir, "dp.toml", "--workers", "1", "--nproc", "2", "--cpus-per-worker", "2")
    wait_gone(job)
    rows = query(workdir / "db" / "mae_lab.db", "SELECT status, world_size, slurm_job FROM mae_trials")
    assert rows == [("done", 2, f"{job}_0")], logs(workdir, job)


@pytest.mark.slow
def test_two_task_array_on_postgresql(workdir: Path, cluster, pg_url: str):  # noqa: F811
    (workdir / "pg.toml").write_text(tiny("pg", seeds=[0, 1, 2]))
    job = submit(cluster, workdir, "pg.toml", "--workers", "2", "--cpus-per-worker", "1", "--db", pg_url)
    wait_gone(job)
    rows = pg_rows(pg_url, "SELECT status, attempts, slurm_job FROM mae_trials")
    assert len(rows) == 3 and all(r[:2] == ("done", 1) for r in rows), (rows, logs(workdir, job))
    assert all(r[2].startswith(f"{job}_") for r in rows)
