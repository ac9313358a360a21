"""The mae-lab command line: parse, call one library function, print.

Exit codes: 0 success, 1 some trials failed or diverged, 2 bad input (study file, data, database URL), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM: a scheduler's stop or `kill`, handled as Ctrl-C is; SIGUSR1 138, SIGUSR2 140).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

# Our library loads inside the commands that use it: --help imports only typer and rich (0.13 s; with
# mae_lab.store.db and mae_lab.study.spec at the top, i.e. sqlmodel, SQLAlchemy and pydantic, 0.47 s on the same
# machine),
# and validate, list and report never import torch (tests/test_house.py).

# The errors of bad input (a study, data, a database URL, a checkpoint), as (module, class). The boundary looks a
# class up only once its module is loaded (an error's class is loaded by the time one is raised), so the front door
# imports no torch.
USER_ERRORS = (("mae_lab.study.spec", "StudyError"), ("mae_lab.data.shards", "DataError"),
               ("mae_lab.store.db", "DbError"), ("mae_lab.train.checkpoint", "CheckpointError"))


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")  # the stops a scheduler sends (SLURM's --signal): all end a run


class Terminated(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGUSR1, SIGUSR2), raised where the program is: it unwinds as Ctrl-C does (the running
    trial is marked interrupted, with this message), so a batch scheduler's stop leaves no trial "running" for a
    stale-heartbeat takeover to find. The exit code is 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def stop_handler():
    """A handler that raises Terminated at the first stop signal and ignores the ones after it: under srun and
    torchrun each process gets a stop twice, and a second raise inside the first one's cleanup (marking the trial
    interrupted, removing a temp file) would leave that cleanup half done."""
    fired = []

    def on_stop(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated(signum)
    return on_stop


def interrupted_code(exc: KeyboardInterrupt) -> int:
    return 128 + exc.signum if isinstance(exc, Terminated) else 130


class Boundary(TyperGroup):
    """Every command runs inside this boundary: an anticipated error (bad input, a missing or unreadable path, a
    permission) becomes one line on stderr with exit 2, Ctrl-C exit 130, a stop signal 128 + its number (SIGTERM
    143). Anything else keeps its
    traceback (a trial's own failure is recorded with its traceback in the trial, by the runner, and never reaches
    here)."""

    def invoke(self, ctx):
        main = threading.current_thread() is threading.main_thread()  # only the main thread may set a handler
        on_stop = stop_handler()
        previous = {sig: signal.signal(getattr(signal, sig), on_stop) for sig in STOP_SIGNALS} if main else {}
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            Console(stderr=True).print("interrupted")
            raise typer.Exit(interrupted_code(exc)) from None
        except Exception as exc:
            if isinstance(exc, BrokenPipeError):  # the reader left (`| head`): click ends quietly
                raise
            user = tuple(getattr(sys.modules[m], c) for m, c in USER_ERRORS if m in sys.modules)
            if isinstance(exc, OSError) and exc.filename is not None:
                raise fail(f"{exc.filename}: {exc.strerror or exc}") from None
            if isinstance(exc, (OSError, UnicodeError, *user)):
                raise fail(str(exc)) from None
            raise
        finally:
            for sig, handler in previous.items():  # a caller's own handler (a test runner, a notebook) is theirs again
                signal.signal(getattr(signal, sig), handler)


app = typer.Typer(cls=Boundary, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Declarative ablation studies for Masked Autoencoders, recorded in a database.")
data_app = typer.Typer(no_args_is_help=True, help="Pack, fetch and inspect WebDataset shards.")
app.add_typer(data_app, name="data")


def out() -> Console:
    """Standard output (made per call, so COLUMNS and the terminal are read when a command runs)."""
    return Console(highlight=False)

DbOpt = Annotated[Optional[str], typer.Option("--db", envvar="MAE_LAB_DB", show_envvar=True,
                                              help="Database URL or SQLite file \\[default: sqlite:///db/mae_lab.db].")]
DataRootOpt = Annotated[Optional[str], typer.Option("--data-root", envvar="MAE_LAB_DATA", show_envvar=True,
                                                    help="Folder of named datasets \\[default: db/data].")]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="Override the study's data: 'train=PATTERN,val=PATTERN' or 'dataset=NAME'.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
PipeOpt = Annotated[bool, typer.Option("--allow-pipe", help="Allow 'pipe:' shard URLs (they run shell commands).")]
LargeGridOpt = Annotated[bool, typer.Option("--allow-large-grid", help="Allow a study of more than 10,000 trials "
                                             "(refused otherwise: a typo in a grid multiplies fast).")]
StaleOpt = Annotated[float, typer.Option(
    "--stale-after", min=1, help="Take over a running trial of another host after this many seconds without a "
                                 "heartbeat (a dead worker on this host is taken over at once).")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: MESSAGE`` as one line on stderr (line breaks inside the message become '; ')."""
    message = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    Console(stderr=True, highlight=False).print(f"error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def trial_errors(resume_hint: str, display: bool = True) -> Iterator[object]:
    """Yield a progress display (None if not `display`) and turn bad input into one line with exit 2, and Ctrl-C
    (SIGTERM) into exit 130 (143) with `resume_hint`."""
    from mae_lab.run.progress import make_display
    from mae_lab.store.db import DbError
    from mae_lab.study.spec import StudyError

    try:
        shown = make_display(out()) if display else None
        try:
            yield shown
        finally:
            if shown is not None:
                shown.close()
    except (StudyError, DbError, ValueError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt as exc:
        Console(stderr=True).print(f"interrupted: the running trial is marked interrupted; {resume_hint}")
        raise typer.Exit(interrupted_code(exc)) from None


def _open_db(url: str | None, create: bool = True):
    from mae_lab.store import db as dbm

    try:
        return dbm.connect(url, create=create)
    except dbm.DbError as exc:
        raise fail(str(exc)) from None


class KeepArgs(TyperCommand):
    """A command that keeps the argument vector it was given (``ctx.meta["argv"]``), for --nproc to forward."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)


def torchrun_argv(argv: list[str], study: Path) -> list[str]:
    """The ``run`` arguments every torchrun process gets: the user's own, unchanged, minus ``--nproc N`` (or
    ``--nproc=N``). ValueError for a study the processes cannot each read again (a pipe, /dev/stdin)."""
    if not study.is_file():
        raise ValueError(f"--nproc: {study} is not a regular file, and each of torchrun's processes reads the study "
                         "again: save it to a file first")
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True  # its value is the next argument
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@app.command(cls=KeepArgs)
def run(
    ctx: typer.Context,
    study: Annotated[Path, typer.Argument(help="The study TOML file.")],
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    data: DataOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the expanded trials; run nothing.")] = False,
    rerun: Annotated[bool, typer.Option("--rerun", help="Run every trial again, even those done.")] = False,
    max_trials: Annotated[Optional[int], typer.Option("--max-trials", min=1, help="Stop after N trials.")] = None,
    rounds: Annotated[Optional[int], typer.Option("--rounds", min=1, help="Adaptive seeds: run at most N rounds, "
                                                  "and end rather than wait for another process's last trials of "
                                                  "a round (a later call goes on).")] = None,
    allow_pipe: PipeOpt = False,
    allow_large_grid: LargeGridOpt = False,
    stale_after: StaleOpt = 600.0,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes per trial: DistributedDataParallel "
                                       "pretraining through torchrun (one per GPU, or gloo on CPU); "
                                       "pretrain.batch_size is per process.")] = 1,
):
    """Expand STUDY into trials and run every trial not done yet (pretrain, linear probe, fine-tune)."""
    from mae_lab.study.planning import bind_trials, parse_data_override, pick_device, plan, resolve_data

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1  # this process is one rank of a torchrun
    rank0 = not ddp or os.environ.get("RANK", "0") == "0"
    launcher = dry_run or (nproc > 1 and not ddp)
    if nproc > 1 and not ddp and not dry_run:
        try:
            forward = torchrun_argv(ctx.meta["argv"], study)
        except ValueError as exc:
            raise fail(str(exc)) from None
    with trial_errors("run the same command to resume it", display=rank0 and not launcher) as display:
        override = parse_data_override(data)
        if launcher:
            spec, trials = plan(study, override, allow_large_grid)
            infos = resolve_data(spec, trials, data_root, allow_pipe)
            if dry_run:  # the hashes `run` records: under this data, process count and precision
                trials = bind_trials(trials, infos=infos, device=pick_device(device), world_size=nproc)
                return _print_plan(spec, trials, db)
        from mae_lab.run.distributed import launch, run_study_ddp  # torch from here on (a dry run ends above)
        from mae_lab.run.runner import run_study

        if launcher:
            raise typer.Exit(launch(nproc, forward, device=device))
        kwargs = dict(db_url=db, device=device, data_root=data_root, data_override=override, rerun=rerun,
                      max_trials=max_trials, max_rounds=rounds, allow_pipe=allow_pipe, display=display,
                      stale_after_s=stale_after, allow_large_grid=allow_large_grid)
        summary = run_study_ddp(study, **kwargs) if ddp else run_study(study, **kwargs)
    if summary is not None:  # None on a rank > 0: rank 0 reports
        _print_summary(summary)


def _print_summary(summary) -> None:
    parts = [f"{summary.count(s)} {s}" for s in ("done", "failed", "diverged") if summary.count(s)]
    if summary.copied:
        parts.insert(0, f"{summary.copied} copied from another study")
    out().print(f"{summary.total} trials: {summary.skipped} already done" + "".join(f", {p}" for p in parts))
    if not summary.ok:
        raise typer.Exit(1)


@app.command(cls=KeepArgs)
def worker(
    ctx: typer.Context,
    study: Annotated[Path, typer.Argument(help="The study TOML file (the same file on every machine).")],
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    data: DataOpt = None,
    allow_pipe: PipeOpt = False,
    allow_large_grid: LargeGridOpt = False,
    stale_after: StaleOpt = 600.0,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between looks at trials that other "
                                                                "workers run.")] = 10.0,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes per trial (torchrun, as for 'run'): rank 0 "
                                       "alone claims trials and records them.")] = 1,
):
    """Drain STUDY with any number of workers on one database (PostgreSQL for several machines): each trial is
    claimed by exactly one worker; the trial of a dead worker is taken over and resumes from its checkpoint.
    Exits when no trial is left to run or running."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1  # this process is one rank of a torchrun
    if nproc > 1 and not ddp:
        try:
            forward = torchrun_argv(ctx.meta["argv"], study)
        except ValueError as exc:
            raise fail(str(exc)) from None
        from mae_lab.run.distributed import check_nproc, launch

        try:
            check_nproc(nproc, device)
        except ValueError as exc:
            raise fail(str(exc)) from None
        raise typer.Exit(launch(nproc, forward, command="worker", device=device))
    from mae_lab.run.distributed import run_study_ddp
    from mae_lab.run.runner import run_study
    from mae_lab.study.planning import parse_data_override

    rank0 = not ddp or os.environ.get("RANK", "0") == "0"
    with trial_errors("any worker resumes it", display=rank0) as display:
        kwargs = dict(db_url=db, device=device, data_root=data_root, data_override=parse_data_override(data),
                      allow_pipe=allow_pipe, display=display, stale_after_s=stale_after, wait=True, poll_s=poll,
                      allow_large_grid=allow_large_grid)
        summary = run_study_ddp(study, **kwargs) if ddp else run_study(study, **kwargs)
    if summary is not None:  # None on a rank > 0: rank 0 reports
        _print_summary(summary)


@app.command()
def slurm(
    study: Annotated[Path, typer.Argument(help="The study TOML file (a run or a search study).")],
    workers: Annotated[int, typer.Option("--workers", "-n", help="Array tasks: one worker each.")] = 2,
    db: DbOpt = None,
    partition: Annotated[Optional[str], typer.Option(help="SLURM partition.")] = None,
    account: Annotated[Optional[str], typer.Option(help="SLURM account.")] = None,
    qos: Annotated[Optional[str], typer.Option(help="SLURM QOS.")] = None,
    time: Annotated[Optional[str], typer.Option("--time", help="Time limit per task (SLURM's format, e.g. "
                                                "4:00:00); longer than the --signal lead.")] = None,
    cpus_per_worker: Annotated[Optional[int], typer.Option(help="CPUs per task.")] = None,
    mem: Annotated[Optional[str], typer.Option(help="Memory per task, e.g. 32G.")] = None,
    gpus_per_worker: Annotated[int, typer.Option(help="GPUs per task (--gres=gpu:K).")] = 0,
    constraint: Annotated[Optional[str], typer.Option(help="Node features (--constraint).")] = None,
    parallel: Annotated[Optional[int], typer.Option(help="At most this many tasks at once (%k).")] = None,
    nodelist: Annotated[Optional[str], typer.Option(help="Keep the tasks on these nodes (one node for SQLite).")
                        ] = None,
    stop_signal: Annotated[str, typer.Option("--signal", help="[B:]SIG@SECONDS, SIG one of TERM, USR1, USR2: "
                                             "sent SECONDS before the time limit; B: to the batch shell.")
                           ] = "TERM@120",
    max_requeues: Annotated[int, typer.Option(help="A task stopped by a signal requeues itself at most this "
                                              "many times.")] = 3,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes per trial inside a task (torchrun; at most "
                                       "--gpus-per-worker when GPUs are asked for).")] = 1,
    sbatch: Annotated[Optional[list[str]], typer.Option("--sbatch", help="An extra #SBATCH option, e.g. "
                                                        "'--exclusive' (repeatable).")] = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    stale_after: StaleOpt = 600.0,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between a waiting worker's looks at the "
                                                                "queue.")] = 10.0,
    allow_pipe: PipeOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sbatch script; submit nothing.")] = False,
):
    """Submit a SLURM job array of WORKERS 'mae-lab worker' tasks (or 'search' for a search study) draining
    STUDY, and return with the job ID; the sbatch script is kept beside the database. Follow with 'mae-lab list'."""
    from mae_lab.run.slurm import ArrayJob, SlurmError, submit

    job = ArrayJob(study=study, workers=workers, db_url=db, partition=partition, account=account, qos=qos,
                   time=time, cpus_per_worker=cpus_per_worker, mem=mem, gpus_per_worker=gpus_per_worker,
                   constraint=constraint, parallel=parallel, nodelist=nodelist, signal=stop_signal,
                   max_requeues=max_requeues, nproc=nproc, device=device, data_root=data_root,
                   stale_after=stale_after, poll=poll, sbatch_lines=tuple(sbatch or ()))
    try:
        done = submit(job, dry_run=dry_run, allow_pipe=allow_pipe)
    except SlurmError as exc:
        raise fail(str(exc)) from None
    if dry_run:
        print(done.script, end="")
        return
    out().print(f"submitted job array {done.job_id}: {workers} x mae-lab {done.command} {study}; script "
                f"{done.path}; follow with: mae-lab list", markup=False, soft_wrap=True)


@app.command()
def search(
    study: Annotated[Path, typer.Argument(help="The study TOML file, with a [search] table.")],
    trials: Annotated[Optional[int], typer.Option("--trials", min=1, help="Searched trials the study should hold "
                                                  "in all \\[default: the file's search.n_trials].")] = None,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    data: DataOpt = None,
    allow_pipe: PipeOpt = False,
    stale_after: StaleOpt = 600.0,
):
    """Optuna search over STUDY's \\[search] space, stored in the same database (optuna-dashboard reads it):
    each sampled point is trained by the same runner as 'run'; points done before are told, not trained."""
    from mae_lab.run.search import run_search
    from mae_lab.study.planning import parse_data_override

    with trial_errors("search again to resume it") as display:
        summary = run_search(study, db_url=db, n_trials=trials, device=device, data_root=data_root,
                             data_override=parse_data_override(data), allow_pipe=allow_pipe, display=display,
                             stale_after_s=stale_after)
    counts = ", ".join(f"{summary.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if summary.count(s))
    out().print(f"search {summary.name}: {summary.total} of {summary.target} trials in the study; this run: "
                f"{len(summary.states)} asked" + (f" ({counts})" if counts else "") +
                f", {summary.trained} trained, {summary.reused} reused" +
                (f", {summary.priors} prior observations" if summary.priors else ""), markup=False)
    for line in summary.best:
        out().print(f"best {line}", markup=False)
    if not summary.ok:
        raise typer.Exit(1)


PLAIN_PLAN = 500  # a dry run of more trials prints tab-separated lines instead of a table


def _print_plan(study, trials, db_url: str | None) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from mae_lab.store import db as dbm

    status: dict[str, str] = {}
    try:  # read-only: a missing database just means every trial is pending
        engine = dbm.connect(db_url, create=False)
        row = dbm.get_study(engine, study.study.name)
        if row is not None:
            status = {t.hash: t.status for t, _ in dbm.study_trials(engine, row.id)}
    except (dbm.DbError, SQLAlchemyError):
        pass
    if len(trials) > PLAIN_PLAN:  # a rich table lays out every row first: plain lines list 10,000 trials in ~0.1 s
        rows = (f"{i}\t{t.hash[:12]}\t{t.pretrain_hash[:8]}\t{t.spec.seed}\t{t.label}\t{status.get(t.hash, 'pending')}"
                for i, t in enumerate(trials, 1))
        print(f"{study.study.name}: {len(trials)} trials (dry run)\n#\thash\tpretrain\tseed\taxes\tstatus")
        print("\n".join(rows))
        return
    table = Table(title=f"{study.study.name}: {len(trials)} trials (dry run)")
    for col in ("#", "hash", "pretrain", "seed", "axes", "status"):
        table.add_column(col)
    for i, t in enumerate(trials, 1):
        table.add_row(str(i), t.hash[:12], t.pretrain_hash[:8], str(t.spec.seed), t.label,
                      status.get(t.hash, "pending"))
    out().print(table)


@app.command()
def validate(study: Annotated[Path, typer.Argument(help="The study TOML file.")],
             data_root: DataRootOpt = None, allow_pipe: PipeOpt = False,
             allow_large_grid: LargeGridOpt = False):
    """Check a study file (schema, presets, shapes, data) without running it."""
    from mae_lab.study.planning import plan, resolve_data

    spec, trials = plan(study, allow_large_grid=allow_large_grid)
    resolve_data(spec, trials, data_root, allow_pipe)
    out().print(f"{study}: ok ({len(trials)} trials)")


@app.command()
def report(
    study: Annotated[Optional[str], typer.Argument(help="Study name (default: every study).")] = None,
    db: DbOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, md, csv, latex (booktabs) or json.")] = "table",
    out_path: Annotated[Optional[Path], typer.Option(
        "--out", help="Write to this file (atomically) instead of printing; with --all, a folder of pages.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Also write the study's PNG plots here.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="One Markdown page per study, with its plots, under --out "
                                                     "(e.g. docs/results/).")] = False,
    from_csv: Annotated[Optional[Path], typer.Option(
        "--from", help="Read the trials from a trials.csv written by --all instead of the database.")] = None,
):
    """Per point: mean ± std and n over seeds, the difference to the default with its paired 95% interval over
    seeds (Welch's beside it), a computed verdict against the paper, and the paper's numbers."""
    from mae_lab.report.site import report_command

    if all_ and study:
        raise fail("give a study name or --all, not both")
    engine = None if from_csv is not None else _open_db(db, create=False)
    try:
        written = report_command(engine, study, fmt=fmt, out=out_path, plots=plots, site=all_, console=out(),
                                 from_csv=from_csv)
    except KeyError as exc:
        raise fail(str(exc.args[0])) from None
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    for path in written:
        out().print(f"wrote {path}", markup=False)


@app.command("list")
def list_(db: DbOpt = None):
    """List the studies in the database with their trials counted by status."""
    from mae_lab.store import db as dbm

    engine = _open_db(db, create=False)
    table = Table(title="studies")
    table.add_column("study")
    for s in dbm.STATUSES:
        table.add_column(s, justify="right")
    for study, counts in dbm.list_studies(engine):
        table.add_row(study.name, *(str(counts.get(s, 0)) for s in dbm.STATUSES))
    out().print(table)


@app.command()
def show(trial: Annotated[str, typer.Argument(help="Trial id or hash prefix.")], db: DbOpt = None,
         recon: Annotated[Optional[Path], typer.Option(
             "--recon", help="Write the trial's reconstructions (paper Figure 2) to this PNG.")] = None,
         across: Annotated[Optional[str], typer.Option(
             "--across", help="With --recon: the same images side by side across the trials of this axis "
                              "(e.g. mask_ratio), same seed.")] = None,
         data_root: DataRootOpt = None):
    """Show one trial: spec, provenance, metrics, results and artifacts; --recon writes its reconstructions."""
    from mae_lab.store import db as dbm

    engine = _open_db(db, create=False)
    row = dbm.find_trial(engine, trial)
    if row is None:
        raise fail(f"no single trial matches {trial!r} (give the id or a longer hash prefix)")
    if recon is not None or across is not None:
        from mae_lab.run.recon_figures import ReconError, show_recon

        if recon is None:
            raise fail("--across needs --recon OUT.png")
        try:
            labels = show_recon(engine, row, recon, across=across, data_root=data_root)
        except (ReconError, OSError) as exc:
            raise fail(str(exc)) from None
        out().print(f"wrote {recon}: reconstructions of {'; '.join(labels)}", markup=False)
        return
    metrics, result, arts = dbm.trial_details(engine, row.id)
    out().print(f"[bold]trial {row.id}[/bold] {row.hash} {row.label} — {row.status}")
    dirty = " (dirty)" if row.git_dirty else " (clean)" if row.git_dirty is False else ""
    for line in (f"git {row.git_commit}{dirty}; mae-lab {row.mae_lab_version}, torch {row.torch_version}, "
                 f"timm {row.timm_version}",
                 f"host {row.host}, device {row.device} ({row.device_name}), world size {row.world_size}, "
                 f"CPU threads {row.cpu_threads}, precision {row.resolved_precision}",
                 f"data root {row.data_root}, data fingerprint {row.data_fingerprint}",
                 f"started {row.started_at}, ended {row.ended_at}, attempts {row.attempts}"
                 + (f", progress {row.progress}" if row.progress else "")):
        out().print(line, markup=False)
    out().print_json(row.spec_json)
    if result is not None:
        out().print_json(json.dumps(result.model_dump(exclude={"id", "trial_id"})))
    if metrics:
        table = Table(title="metrics")
        for col in ("stage", "epoch", "name", "value"):
            table.add_column(col)
        for m in metrics:
            table.add_row(m.stage, str(m.epoch), m.name, f"{m.value:.6g}")
        out().print(table)
    for a in arts:
        out().print(f"artifact {a.kind}: {a.path} sha256 {a.sha256}")
    if row.error:
        out().print(f"[red]error:[/red] {row.error}", markup=True)


@app.command()
def export(trial: Annotated[str, typer.Argument(help="Trial id or hash prefix (a done trial).")],
           out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the export.")],
           to: Annotated[str, typer.Option("--to", help="timm (local-dir: hub layout) or hf (ViTModel).")],
           db: DbOpt = None):
    """Write a trial's pretrained encoder as safetensors plus the config timm or Hugging Face loads."""
    from mae_lab.run.export import ExportError, export_trial

    engine = _open_db(db, create=False)
    try:
        written = export_trial(engine, trial, to, out_dir)
    except (ExportError, OSError) as exc:
        raise fail(str(exc)) from None
    out().print(f"wrote {written} ({to})", markup=False)


@data_app.command("pack")
def data_pack(src: Annotated[Path, typer.Argument(help="Image folder: class folders of images, train/ + val/ of "
                                                      "class folders, or images with no class folders (unlabeled, "
                                                      "for pretraining).")],
              dest: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder for shards + dataset.json.")],
              shard_size: Annotated[int, typer.Option(min=1)] = 5000,
              name: Annotated[Optional[str], typer.Option()] = None,
              val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.0):
    """Pack an image folder into WebDataset shards plus dataset.json (image files stored as they are)."""
    from rich.progress import Progress

    from mae_lab.data import DataError, pack_imagefolder

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("packing", total=None)
        try:
            meta = pack_imagefolder(src, dest, shard_size=shard_size, name=name, val_fraction=val_fraction,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
        except DataError as exc:
            raise fail(str(exc)) from None
    splits = ", ".join(f"{k}: {v['samples']}" for k, v in meta["splits"].items())
    kind = f"{len(meta['classes'])} classes" if meta["classes"] else "unlabeled"
    out().print(f"packed {meta['name']} into {dest}: {splits}; {kind}; {len(meta['sha256'])} shards", markup=False,
                soft_wrap=True)


@data_app.command("info")
def data_info(pattern: Annotated[str, typer.Argument(help="Shard pattern, e.g. 'data/x-{000000..000009}.tar'.")],
              label_key: Annotated[str, typer.Option(help="the label's field in .json (without .cls)")] = "label"):
    """Count the samples, classes and image sizes of some shards."""
    from mae_lab.data import DataError, dataset_info

    try:
        info = dataset_info(pattern, label_key=label_key)
    except DataError as exc:
        raise fail(str(exc)) from None
    out().print_json(json.dumps(info, default=str))


@data_app.command("get")
def data_get(name: Annotated[str, typer.Argument(help="cifar10 or cifar100.")], data_root: DataRootOpt = None):
    """Download a dataset through torchvision and pack it into shards under the data root."""
    from mae_lab.data import DataError, get_dataset

    try:
        path = get_dataset(name, data_root)
    except DataError as exc:
        raise fail(str(exc)) from None
    out().print(f"{name}: shards and dataset.json in {path}", markup=False, soft_wrap=True)


if __name__ == "__main__":
    app()
