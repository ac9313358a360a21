"""Run a study's workers as Ray tasks on a Ray cluster: N tasks, each one ``mae-lab worker`` (or, for a study with
a ``[search]`` table, one ``mae-lab search``, an Optuna worker on the shared storage) in a child process, with
``num_gpus`` and ``num_cpus`` per task. Ray places and restarts the workers; the database stays the queue and
Optuna's sampler the search's (Ray Tune is not used).

- Each task starts the worker as a child (its own signals and torch threads; torchrun for ``--nproc``), which sees
  the GPUs Ray gave the task (CUDA_VISIBLE_DEVICES) and appends its output to ``<db folder>/ray/<study>-<i>.out``.
- A worker ended by a signal (killed, out of memory, a node drained) fails its task with WorkerStopped, and Ray
  retries the task, up to ``max_retries``, as it retries one whose process or node died. The retry, or any other
  worker, takes the trial over and resumes it from its checkpoint: at once on the same machine (the PID recorded
  in the trial is dead: ``store.queue.release_dead_local``), else once its heartbeat is stale.
- The worker dies with its task's process, so that no orphan keeps a trial, or a GPU Ray has given to another
  task: Ray 2.60 kills a dead task's children itself; older Ray did not after a crash, so the child also asks
  Linux for SIGTERM at its parent's death (PR_SET_PDEATHSIG; SIGTERM marks its trial interrupted).
- ``launch`` waits for the tasks and reports each one's end. Ctrl-C (or SIGTERM) cancels them: each worker gets
  SIGTERM and marks its trial interrupted. A driver's tasks end with the driver: to leave them running, submit the
  launcher itself as a Ray job (``ray job submit --no-wait -- mae-lab ray ...``).

A SQLite file serves the workers of one node only: on a cluster of several nodes, use PostgreSQL. Nothing is
started, and nothing written, unless every option checks out first.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from mae_lab.errors import BadInput
from mae_lab.run.launch import absolute_url, check_workers, worker_args
from mae_lab.store.engine import artifacts_dir, connect, resolve_url, safe_url
from mae_lab.store.states import STALE_AFTER_S
from mae_lab.study.planning import plan, resolve_data

try:
    import ray
except ImportError:  # the extra mae-lab[ray]; `launch` says so in one line
    ray = None  # type: ignore[assignment]

NEEDS_RAY = 'mae-lab ray needs Ray: pip install "mae-lab[ray]"'
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CANCEL_GRACE_S = 60.0  # after Ctrl-C: how long the workers get to mark their trials interrupted


class RayError(BadInput, ValueError):
    """Bad input for a Ray launch: one line that names the option."""


class WorkerStopped(RuntimeError):
    """A worker ended by a signal: its task fails with this, and Ray retries the task (``retry_exceptions``)."""


@dataclass(frozen=True)
class RayJob:
    """Everything one launch asks for."""

    study: Path
    workers: int = 2
    address: str = "auto"  # auto: the cluster this machine joined (RAY_ADDRESS); HOST:PORT; local: start one here
    db_url: str | None = None
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_retries: int = 3
    nproc: int = 1
    device: str = "auto"
    data_root: str | None = None
    stale_after: float = STALE_AFTER_S
    poll: float = 10.0  # seconds between a waiting worker's looks at the queue


@dataclass(frozen=True)
class Worker:
    """One task's child process: what it runs, where, and with which environment."""

    index: int
    argv: list[str]
    env: dict[str, str]  # added to the task's own (MAE_LAB_*, PYTHONPATH of the launching shell)
    cwd: str
    log: str


@dataclass(frozen=True)
class Launched:
    refs: list  # one Ray ObjectRef per worker
    name: str  # the study's
    command: str  # worker or search
    logs: Path
    nodes: int


def check(job: RayJob, search: bool) -> None:
    """The options that need no cluster: RayError (one line naming the option) if one is wrong."""
    check_workers(RayError, job.workers, job.nproc, job.gpus_per_worker, search)
    if job.cpus_per_worker < 0:
        raise RayError(f"--cpus-per-worker {job.cpus_per_worker:g}: cannot be negative")
    if job.max_retries < 0:
        raise RayError(f"--max-retries {job.max_retries}: cannot be negative")


def check_cluster(job: RayJob, url: str, nodes: int) -> None:
    """SQLite serves one node only (SQLite over a network file system corrupts)."""
    if make_url(url).get_backend_name() == "sqlite" and job.workers > 1 and nodes > 1:
        raise RayError(f"--db {safe_url(url)}: a SQLite file serves the workers of one node only, and the Ray cluster "
                       f"at {job.address} has {nodes} nodes: use PostgreSQL (--db postgresql://...)")


def join(address: str) -> int:
    """Connect to the Ray cluster at ``address`` (unless this process already has), or start one here for "local";
    returns how many of its nodes are alive."""
    if ray is None:
        raise RayError(NEEDS_RAY)
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:  # ray.init would retry a silent address for minutes
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as exc:
            raise RayError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                           "with `ray start --head`, or give --address local") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RayError(f"--address {address}: no Ray cluster to join ({first}); start one with `ray start "
                           "--head`, or give --address local") from None
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def run_worker(w: Worker) -> tuple[int, str, int]:
    """A Ray task: run one worker to its end; returns (index, host, exit code). A worker ended by a signal raises
    WorkerStopped (Ray retries the task); a cancelled task (KeyboardInterrupt) sends the worker SIGTERM first."""
    Path(w.log).parent.mkdir(parents=True, exist_ok=True)
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
    with open(w.log, "ab") as log:
        log.write(f"mae-lab: ray task {w.index} on {socket.gethostname()} (pid {os.getpid()}): "
                  f"{' '.join(w.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, *w.argv], cwd=w.cwd if Path(w.cwd).is_dir() else None,
                                env={**os.environ, **w.env}, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)) if prctl else None)
        try:
            while True:  # a timed wait, so that a cancel's KeyboardInterrupt is seen
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:  # cancelled (KeyboardInterrupt)
            proc.send_signal(signal.SIGTERM)  # the worker marks its trial interrupted
            log.write(f"mae-lab: cancelled: the worker exited with code {proc.wait()}\n".encode())
            raise
        log.write(f"mae-lab: the worker exited with code {code}\n".encode())
    if code < 0 or code > 128:  # a signal: -N when it killed the worker, 128 + N when the worker caught it
        raise WorkerStopped(f"worker {w.index} on {socket.gethostname()} ended by signal "
                            f"{-code if code < 0 else code - 128} (exit {code})")
    return w.index, socket.gethostname(), code


def start(job: RayJob, *, allow_pipe: bool = False) -> Launched:
    """Check ``job``, join the cluster and start the workers' tasks; returns at once."""
    study, trials = plan(job.study)  # a bad study file ends here (StudyError)
    resolve_data(study, trials, job.data_root, allow_pipe)
    search = study.search is not None
    url = absolute_url(resolve_url(job.db_url))
    check(job, search)
    nodes = join(job.address)
    check_cluster(job, url, nodes)
    connect(url)  # a database that cannot be opened ends here, before any task starts (DbError)
    name, command = study.study.name, "search" if search else "worker"
    logs = artifacts_dir(url).resolve().parent / "ray"
    env = {k: v for k, v in os.environ.items() if k.startswith("MAE_LAB_") or k == "PYTHONPATH"}
    env["MAE_LAB_DB"] = url
    if "MAE_LAB_ARTIFACTS" in env:
        env["MAE_LAB_ARTIFACTS"] = str(Path(env["MAE_LAB_ARTIFACTS"]).resolve())
    # max_calls=1: each attempt in a fresh process; retry_exceptions takes a list (ray's stubs say bool)
    task = ray.remote(num_cpus=job.cpus_per_worker, num_gpus=job.gpus_per_worker, max_retries=job.max_retries,
                      retry_exceptions=[WorkerStopped], max_calls=1)(run_worker)  # type: ignore[call-overload]
    task = task.options(name=f"mae-lab-{command}-{name}")
    argv = worker_args(job, command)
    refs = [task.remote(Worker(i, argv, env, str(Path.cwd()), str(logs / f"{name}-{i}.out")))
            for i in range(job.workers)]
    return Launched(refs, name, command, logs, nodes)


def ending(exc: BaseException) -> str:
    """A failed task's end, in one line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, WorkerStopped):
        return f"{cause}; its retries are spent"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def wait(launched: Launched, say: Callable[[str], None]) -> int:
    """Wait for every task and ``say`` each one's end; 0 when every worker exited 0, else 1. Ctrl-C (SIGTERM)
    cancels the tasks, waits up to CANCEL_GRACE_S for their workers to mark their trials interrupted, and
    re-raises."""
    index = {ref: i for i, ref in enumerate(launched.refs)}
    pending, code = list(launched.refs), 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                try:
                    i, host, exit_code = ray.get(ref)
                    say(f"{launched.command} {i} on {host}: exit {exit_code}")
                    code = code or int(exit_code != 0)
                except ray.exceptions.RayError as exc:
                    say(f"{launched.command} {index[ref]}: {ending(exc)}")
                    code = 1
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        ray.wait(pending, num_returns=len(pending), timeout=CANCEL_GRACE_S)
        for ref in pending:
            ray.cancel(ref, force=True)  # one that did not end in time (its trial is taken over later)
        raise
    return code


def launch(job: RayJob, say: Callable[[str], None], *, allow_pipe: bool = False) -> int:
    """Start the workers, say where their logs go, and wait for them (see ``wait``)."""
    launched = start(job, allow_pipe=allow_pipe)
    say(f"started {job.workers} x mae-lab {launched.command} {job.study} as Ray tasks on {launched.nodes} node(s); "
        f"logs {launched.logs}/{launched.name}-*.out; follow with: mae-lab list")
    return wait(launched, say)
