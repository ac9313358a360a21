"""Launch a study's workers on a SLURM cluster: one sbatch job array whose every task is one ``mae-lab worker`` (or,
for a study with a ``[search]`` table, one ``mae-lab search``, an Optuna worker on the shared storage).

The database stays the queue, as on one machine: tasks claim trials, a stop marks the running trial interrupted,
and any task resumes it from its checkpoint. What SLURM adds is handled in the batch script this module writes:

- the worker runs as a job step (``srun``), so ``--signal=SIG@secs`` reaches it before the time limit; with ``B:``
  the signal goes to the batch shell, which passes it on to the worker;
- a worker stopped by a signal (exit code over 128) has its array task requeue itself (``scontrol requeue``) up to
  ``max_requeues`` times (SLURM_RESTART_COUNT counts them, preemptions included), so a time limit or a preemption
  does not lose the task; a preemption that sends no signal (SIGKILL after GraceTime) leaves a dead worker whose
  trial the heartbeat takeover gives to another;
- ``sbatch`` returns at once with the job ID: ``mae-lab list`` and ``show`` read the progress from the database,
  where each trial records the array task that ran it (``slurm_job``), never from ``sacct``.

A SQLite file serves the tasks of one node only (SQLite over a network file system corrupts): a multi-node array
needs PostgreSQL. Nothing is submitted, and nothing written, unless every option checks out first.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from mae_lab.atomic import write_atomic
from mae_lab.errors import BadInput
from mae_lab.run.launch import absolute_url, check_workers, worker_args
from mae_lab.store.engine import artifacts_dir, connect, resolve_url, safe_url
from mae_lab.store.states import STALE_AFTER_S
from mae_lab.study.planning import plan, resolve_data

STOP_SIGNALS = ("TERM", "USR1", "USR2")
# sbatch's refusal -> the option it is about (the first key found in its message, lower-cased)
REFUSALS = (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"), ("time limit", "--time"),
            ("feature", "--constraint"), ("constraint", "--constraint"), ("gres", "--gpus-per-worker"),
            ("memory", "--mem"), ("node", "--nodelist"))


class SlurmError(BadInput, ValueError):
    """Bad input for a submission: one line that names the option."""


@dataclass(frozen=True)
class StopSignal:
    name: str  # TERM, USR1 or USR2
    lead_s: int  # seconds before the time limit
    batch: bool  # B: the batch shell gets it (and passes it on)

    def __str__(self) -> str:
        return f"{'B:' if self.batch else ''}{self.name}@{self.lead_s}"


@dataclass(frozen=True)
class ArrayJob:
    """Everything one submission asks for; ``None`` leaves the choice to the cluster's defaults."""

    study: Path
    workers: int
    db_url: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # SLURM's format: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    cpus_per_worker: int | None = None
    mem: str | None = None  # per worker, e.g. 16G
    gpus_per_worker: int = 0
    constraint: str | None = None
    parallel: int | None = None  # at most this many tasks at once (%k)
    nodelist: str | None = None
    signal: str = "TERM@120"
    max_requeues: int = 3
    nproc: int = 1
    device: str = "auto"
    data_root: str | None = None
    stale_after: float = STALE_AFTER_S
    poll: float = 10.0  # seconds between a waiting worker's looks at the queue
    sbatch_lines: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Submitted:
    job_id: str | None  # None for a dry run
    script: str
    path: Path | None  # where the script was kept (None for a dry run)
    command: str  # worker or search


def parse_signal(text: str) -> StopSignal:
    """``[B:]SIG[@SECONDS]`` with SIG one of TERM, USR1, USR2 (a leading SIG is allowed); SLURM's default lead is
    60 s."""
    m = re.fullmatch(r"(B:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?", text.strip().upper())
    if m is None or m.group(2) not in STOP_SIGNALS:
        raise SlurmError(f"--signal {text}: the stop signal must be TERM, USR1 or USR2, as [B:]SIG@SECONDS "
                         "(e.g. TERM@120 or B:USR1@300)")
    lead = int(m.group(3)) if m.group(3) is not None else 60
    if not 0 < lead <= 65535:
        raise SlurmError(f"--signal {text}: the lead must be 1 to 65535 seconds")
    return StopSignal(m.group(2), lead, m.group(1) is not None)


def time_limit_s(text: str) -> int:
    """Seconds in a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if m is None:
        raise SlurmError(f"--time {text}: not a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


def slurm_tool(name: str) -> str:
    """The path of a SLURM command, or SlurmError saying it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} is not on PATH: run mae-lab slurm where SLURM's commands are (a login node), or "
                         "put their folder on PATH")
    return path


def cluster_nodes(partition: str | None) -> set[str]:
    """The node names of ``partition`` (the default one if None) as sinfo lists them; empty if sinfo cannot tell."""
    cmd = [slurm_tool("sinfo"), "-h", "-N", "-o", "%N"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.strip() for line in out.splitlines() if line.strip()}


def check(job: ArrayJob, url: str, search: bool) -> StopSignal:
    """Every option, before anything is written or submitted: SlurmError (one line naming the option) if one is
    wrong. Returns the parsed stop signal."""
    check_workers(SlurmError, job.workers, job.nproc, job.gpus_per_worker, search)
    if job.parallel is not None and job.parallel < 1:
        raise SlurmError(f"--parallel {job.parallel}: at least one task must be allowed to run")
    if job.max_requeues < 0:
        raise SlurmError(f"--max-requeues {job.max_requeues}: cannot be negative")
    stop = parse_signal(job.signal)
    if job.time is not None and time_limit_s(job.time) <= stop.lead_s:
        raise SlurmError(f"--time {job.time}: the time limit ({time_limit_s(job.time)} s) must be longer than the "
                         f"stop signal's lead (--signal {stop}: {stop.lead_s} s)")
    for line in job.sbatch_lines:
        if "\n" in line or not line.strip():
            raise SlurmError(f"--sbatch {line!r}: one #SBATCH option per --sbatch, on one line")
    if make_url(url).get_backend_name() == "sqlite" and job.workers > 1:
        if job.nodelist:  # one name, not a list or a range (node[1-4])
            one_node = "," not in job.nodelist and "[" not in job.nodelist
        else:
            one_node = len(cluster_nodes(job.partition)) == 1
        if not one_node:
            raise SlurmError(f"--db {safe_url(url)}: a SQLite file serves the workers of one node only (SQLite over "
                             "a network file system corrupts): use PostgreSQL (--db postgresql://...) for an array "
                             "over several nodes, or keep it on one node with --nodelist NODE")
    return stop


def sbatch_script(job: ArrayJob, url: str, stop: StopSignal, name: str, command: str, log_dir: Path) -> str:
    """The batch script of the array (see the module docstring for what it does)."""
    array = f"0-{job.workers - 1}" + (f"%{job.parallel}" if job.parallel else "")
    options = [f"--job-name=mae-lab-{name}", f"--array={array}", f"--output={log_dir}/{name}-%A_%a.out",
               "--open-mode=append", f"--chdir={Path.cwd()}", "--ntasks=1", "--requeue", f"--signal={stop}"]
    for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos),
                        ("time", job.time), ("cpus-per-task", job.cpus_per_worker), ("mem", job.mem),
                        ("constraint", job.constraint), ("nodelist", job.nodelist)):
        if value is not None:
            options.append(f"--{flag}={value}")
    if job.gpus_per_worker:
        options.append(f"--gres=gpu:{job.gpus_per_worker}")
    lines = [f"#SBATCH {o}" for o in options]
    lines += [line if line.lstrip().startswith("#SBATCH") else f"#SBATCH {line.strip()}" for line in job.sbatch_lines]
    args = [sys.executable, *worker_args(job, command)]
    hidden = make_url(url).password is not None
    db_line = ("# MAE_LAB_DB comes from the submitting shell's environment (its URL holds a password)" if hidden
               else f"export MAE_LAB_DB={shlex.quote(url)}")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    about = textwrap.fill(
        f"Written by `mae-lab slurm` on {stamp}: a job array of {job.workers} `mae-lab {command}` draining study "
        f"{name!r}. Each task is one worker on the same database (the queue): a stop signal ({stop.name}, "
        f"{stop.lead_s} s before the time limit{', sent to this batch shell' if stop.batch else ''}) or a preemption "
        f"marks the running trial interrupted; the task then requeues itself, at most {job.max_requeues} times, and "
        "any worker resumes the trial from its checkpoint. Progress: `mae-lab list`, `mae-lab show TRIAL`.",
        width=116, initial_indent="# ", subsequent_indent="# ")
    env = [db_line] + ([f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}"]
                       if os.environ.get("PYTHONPATH") else [])
    return f"""#!/bin/bash
{about}
{chr(10).join(lines)}

set -u
{chr(10).join(env)}
MAX_REQUEUES={job.max_requeues}
echo "mae-lab: array task ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} (job $SLURM_JOB_ID) on $(hostname), \\
restart ${{SLURM_RESTART_COUNT:-0}}"

# the worker is a job step, so that --signal reaches it; a signal to this shell (B:) is passed on
srun --ntasks=1 ${{SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}} {shlex.join(args)} &
worker=$!
for sig in {" ".join(STOP_SIGNALS)}; do trap "kill -$sig $worker 2>/dev/null" "$sig"; done
while :; do
  wait "$worker"; rc=$?
  kill -0 "$worker" 2>/dev/null || break  # a trapped signal interrupts wait: wait again for the exit code
done
echo "mae-lab: the worker exited with code $rc"
if [ "$rc" -gt 128 ]; then  # stopped by a signal: requeue this array task, the trial resumes from its checkpoint
  if [ "${{SLURM_RESTART_COUNT:-0}}" -ge "$MAX_REQUEUES" ]; then
    echo "mae-lab: not requeued: $MAX_REQUEUES requeues done (--max-requeues)"
  elif ! command -v scontrol >/dev/null; then
    echo "mae-lab: cannot requeue: scontrol is not on PATH inside the job"
  else
    echo "mae-lab: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
fi
exit "$rc"
"""


def refusal(stderr: str) -> str:
    """sbatch's error as one line naming the option it is about."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = "; ".join(line.removeprefix("sbatch: error: ") for line in lines) or "no reason given"
    low = reason.lower()
    option = next((opt for key, opt in REFUSALS if key in low), "sbatch")
    return f"{option}: sbatch refused the job array: {reason}"


def submit(job: ArrayJob, *, dry_run: bool = False, allow_pipe: bool = False) -> Submitted:
    """Check ``job``, then submit the array with sbatch (the script on stdin) and keep the script in the ``slurm``
    folder beside the artifacts (``<db folder>/slurm/<study>.sbatch`` for SQLite). Returns at once."""
    study, trials = plan(job.study)  # a bad study file ends here (StudyError)
    resolve_data(study, trials, job.data_root, allow_pipe)
    search = study.search is not None
    url = absolute_url(resolve_url(job.db_url))
    stop = check(job, url, search)
    name, command = study.study.name, "search" if search else "worker"
    log_dir = artifacts_dir(url).resolve().parent / "slurm"
    script = sbatch_script(job, url, stop, name, command, log_dir)
    if dry_run:
        return Submitted(None, script, None, command)
    sbatch = slurm_tool("sbatch")
    env = {**os.environ, "MAE_LAB_DB": url}

    def run_sbatch(*flags: str) -> str:
        proc = subprocess.run([sbatch, *flags], input=script, capture_output=True, text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise SlurmError(refusal(proc.stderr or proc.stdout))
        return proc.stdout

    run_sbatch("--test-only")  # sbatch's own checks (partition, account, gres ...) before anything is written
    connect(url)  # a database that cannot be opened ends here, before anything is queued (DbError)
    log_dir.mkdir(parents=True, exist_ok=True)
    job_id = run_sbatch("--parsable").strip().split(";")[0]
    path = write_atomic(log_dir / f"{name}.sbatch", script)
    return Submitted(job_id, script, path, command)
