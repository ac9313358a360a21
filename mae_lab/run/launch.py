"""What every launcher of workers (``slurm``, ``ray_launch``) shares: the worker options' checks, the worker's
command line, and a database URL that holds wherever a task starts."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import make_url

from mae_lab.errors import BadInput


class WorkerJob(Protocol):
    """The fields of a launch (``slurm.ArrayJob``, ``ray_launch.RayJob``) that its workers' command line reads."""

    @property
    def study(self) -> Path: ...
    @property
    def device(self) -> str: ...
    @property
    def stale_after(self) -> float: ...
    @property
    def poll(self) -> float: ...
    @property
    def nproc(self) -> int: ...
    @property
    def data_root(self) -> str | None: ...


def check_workers(error: type[BadInput], workers: int, nproc: int, gpus_per_worker: float, search: bool) -> None:
    """The worker options every launcher (SLURM, Ray) shares: ``error`` (one line naming the option) if one is
    wrong."""
    if workers < 1:
        raise error(f"--workers {workers}: at least one worker")
    if nproc < 1:
        raise error(f"--nproc {nproc}: at least one process per trial")
    if gpus_per_worker < 0:
        raise error(f"--gpus-per-worker {gpus_per_worker:g}: cannot be negative")
    if gpus_per_worker and nproc > gpus_per_worker:
        raise error(f"--nproc {nproc}: more processes per trial than the {gpus_per_worker:g} GPU(s) asked for each "
                    "worker (--gpus-per-worker)")
    if search and nproc > 1:
        raise error(f"--nproc {nproc}: a search study runs one process per worker (give --nproc 1, and more "
                    "--workers)")


def worker_args(job: WorkerJob, command: str) -> list[str]:
    """The worker's command line after the Python executable: ``-m cli worker|search STUDY ...``."""
    args = ["-m", "cli", command, str(job.study.resolve()), "--device", job.device,
            "--stale-after", f"{job.stale_after:g}"]
    if command == "worker":
        args += ["--poll", f"{job.poll:g}"] + (["--nproc", str(job.nproc)] if job.nproc > 1 else [])
    if job.data_root is not None:
        args += ["--data-root", str(Path(job.data_root).resolve())]
    return args


def absolute_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute (array tasks may start in another folder)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return parsed.set(database=str(Path(parsed.database).resolve())).render_as_string(hide_password=False)
    return url
