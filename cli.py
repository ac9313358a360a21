"""The mae-lab command line: parse, call one library function, print.

Exit codes (mae_lab.run.boundary): 0 success, 1 some trials failed or diverged, 2 bad input (study file, data,
database URL), 75 the database server stayed away longer than MAE_LAB_DB_OUTAGE_S, 130 interrupted (Ctrl-C),
128 + N for a stop signal N (SIGTERM 143, SIGUSR1 138, SIGUSR2 140).
Our library loads inside the commands that use it: --help imports only typer, rich and the boundary, and validate,
list, report and run --dry-run never import torch (tests/test_house.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mae_lab.run.boundary import Boundary, Command, Group, fail, torchrun_argv, torchrun_rank, trial_errors
from mae_lab.store.states import STALE_AFTER_S

app = typer.Typer(cls=Boundary, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Declarative ablation studies for Masked Autoencoders, recorded in a database.")
data_app = typer.Typer(cls=Group, no_args_is_help=True, help="Pack, fetch and inspect WebDataset shards.")
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


def study_arg(help: str):  # noqa: A002 - typer's name
    """A study file argument. click's own readability check is off: it reports an unreadable file (to a user who is
    not root) as a usage box; the Boundary says it in one line with exit 2 instead."""
    return typer.Argument(help=help, readable=False)


LogOpt = Annotated[Optional[str], typer.Option(
    "--log", help="Log every trial live to these views, e.g. 'tensorboard,mlflow' (instead of the study's [log] "
                  "trackers; needs the extras mae-lab[tensorboard], mae-lab[mlflow]).")]
StaleOpt = Annotated[float, typer.Option(
    "--stale-after", min=1, help="Take over a running trial of another host after this many seconds without a "
                                 "heartbeat (a dead worker on this host is taken over at once).")]


def _open_db(url: str | None, create: bool = True):
    from mae_lab.store.engine import connect

    return connect(url, create=create)  # a DbError is bad input: the boundary says it in one line, exit 2


@app.command(cls=Command)
def run(
    ctx: typer.Context,
    study: Annotated[Path, study_arg(help="The study TOML file.")],
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
    stale_after: StaleOpt = STALE_AFTER_S,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes per trial: DistributedDataParallel "
                                       "pretraining through torchrun (one per GPU, or gloo on CPU); "
                                       "pretrain.batch_size is per process.")] = 1,
    log: LogOpt = None,
):
    """Expand STUDY into trials and run every trial not done yet (pretrain, linear probe, fine-tune)."""
    if dry_run:
        from mae_lab.run.views import dry_run as print_dry_run

        with trial_errors("", display=False):
            return print_dry_run(study, db_url=db, data=data, data_root=data_root, allow_pipe=allow_pipe,
                                 allow_large_grid=allow_large_grid, device=device, nproc=nproc, console=out())
    rank = torchrun_rank()  # None outside torchrun
    if nproc > 1 and rank is None:  # start torchrun, whose processes each run this command again
        from mae_lab.run.distributed import launch_study
        from mae_lab.run.trackers import parse_trackers

        with trial_errors("run the same command to resume it", display=False):
            parse_trackers(log or "")  # a bad --log ends here, before torchrun starts
            code = launch_study(nproc, torchrun_argv(ctx.meta["argv"], study), study, data, data_root, allow_pipe,
                                allow_large_grid, device)
        raise typer.Exit(code)
    from mae_lab.run.distributed import run_here  # torch from here on

    with trial_errors("run the same command to resume it", display=rank in (None, 0)) as display:
        summary = run_here(study, db_url=db, device=device, data_root=data_root, data=data, rerun=rerun,
                           max_trials=max_trials, max_rounds=rounds, allow_pipe=allow_pipe, display=display,
                           stale_after_s=stale_after, allow_large_grid=allow_large_grid, log=log)
    if summary is not None:  # None on a rank > 0: rank 0 reports
        _print_summary(summary)


def _print_summary(summary) -> None:
    from mae_lab.run.views import run_summary

    out().print(run_summary(summary))
    if not summary.ok:
        raise typer.Exit(1)


@app.command(cls=Command)
def worker(
    ctx: typer.Context,
    study: Annotated[Path, study_arg(help="The study TOML file (the same file on every machine).")],
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    data: DataOpt = None,
    allow_pipe: PipeOpt = False,
    allow_large_grid: LargeGridOpt = False,
    stale_after: StaleOpt = STALE_AFTER_S,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between looks at trials that other "
                                                                "workers run.")] = 10.0,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes per trial (torchrun, as for 'run'): rank 0 "
                                       "alone claims trials and records them.")] = 1,
    log: LogOpt = None,
):
    """Drain STUDY with any number of workers on one database (PostgreSQL for several machines): each trial is
    claimed by exactly one worker; the trial of a dead worker is taken over and resumes from its checkpoint.
    Exits when no trial is left to run or running."""
    rank = torchrun_rank()  # None outside torchrun
    if nproc > 1 and rank is None:  # start torchrun, whose processes each run this command again
        from mae_lab.run.distributed import launch

        with trial_errors("any worker resumes it", display=False):
            code = launch(nproc, torchrun_argv(ctx.meta["argv"], study), command="worker", device=device)
        raise typer.Exit(code)
    from mae_lab.run.distributed import run_here  # torch from here on

    with trial_errors("any worker resumes it", display=rank in (None, 0)) as display:
        summary = run_here(study, db_url=db, device=device, data_root=data_root, data=data, allow_pipe=allow_pipe,
                           display=display, stale_after_s=stale_after, wait=True, poll_s=poll,
                           allow_large_grid=allow_large_grid, log=log)
    if summary is not None:  # None on a rank > 0: rank 0 reports
        _print_summary(summary)


@app.command(cls=Command)
def slurm(
    study: Annotated[Path, study_arg(help="The study TOML file (a run or a search study).")],
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
    stale_after: StaleOpt = STALE_AFTER_S,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between a waiting worker's looks at the "
                                                                "queue.")] = 10.0,
    allow_pipe: PipeOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sbatch script; submit nothing.")] = False,
):
    """Submit a SLURM job array of WORKERS 'mae-lab worker' tasks (or 'search' for a search study) draining
    STUDY, and return with the job ID; the sbatch script is kept beside the database. Follow with 'mae-lab list'."""
    from mae_lab.run.slurm import ArrayJob, submit

    job = ArrayJob(study=study, workers=workers, db_url=db, partition=partition, account=account, qos=qos,
                   time=time, cpus_per_worker=cpus_per_worker, mem=mem, gpus_per_worker=gpus_per_worker,
                   constraint=constraint, parallel=parallel, nodelist=nodelist, signal=stop_signal,
                   max_requeues=max_requeues, nproc=nproc, device=device, data_root=data_root,
                   stale_after=stale_after, poll=poll, sbatch_lines=tuple(sbatch or ()))
    done = submit(job, dry_run=dry_run, allow_pipe=allow_pipe)
    if dry_run:
        print(done.script, end="")
        return
    out().print(f"submitted job array {done.job_id}: {workers} x mae-lab {done.command} {study}; script "
                f"{done.path}; follow with: mae-lab list", markup=False, soft_wrap=True)


@app.command(cls=Command)
def ray(study: Annotated[Path, study_arg(help="The study TOML file (a run or a search study).")],
        workers: Annotated[int, typer.Option("--workers", "-n", help="Ray tasks: one worker each.")] = 2,
        address: Annotated[str, typer.Option(envvar="RAY_ADDRESS", help="auto, HOST:PORT or local.")] = "auto",
        db: DbOpt = None,
        gpus_per_worker: Annotated[float, typer.Option(help="GPUs per task (Ray's num_gpus).")] = 0,
        cpus_per_worker: Annotated[float, typer.Option(help="CPUs per task (Ray's num_cpus).")] = 1,
        max_retries: Annotated[int, typer.Option(help="Retries of a task whose worker is killed.")] = 3,
        nproc: Annotated[int, typer.Option(help="Processes per trial inside a task (torchrun).")] = 1,
        device: DeviceOpt = "auto", data_root: DataRootOpt = None, stale_after: StaleOpt = STALE_AFTER_S,
        poll: Annotated[float, typer.Option(min=0.1, help="Seconds between a waiting worker's looks.")] = 10.0,
        allow_pipe: PipeOpt = False):
    """Run WORKERS 'mae-lab worker' (or 'search') as Ray tasks draining STUDY and wait; Ctrl-C stops them."""
    from mae_lab.run.ray_launch import RayJob, launch

    job = RayJob(study=study, workers=workers, address=address, db_url=db, gpus_per_worker=gpus_per_worker,
                 cpus_per_worker=cpus_per_worker, max_retries=max_retries, nproc=nproc, device=device,
                 data_root=data_root, stale_after=stale_after, poll=poll)
    raise typer.Exit(launch(job, lambda line: out().print(line, markup=False, soft_wrap=True), allow_pipe=allow_pipe))


@app.command(cls=Command)
def search(
    study: Annotated[Path, study_arg(help="The study TOML file, with a [search] table.")],
    trials: Annotated[Optional[int], typer.Option("--trials", min=1, help="Searched trials the study should hold "
                                                  "in all \\[default: the file's search.n_trials].")] = None,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    data: DataOpt = None,
    allow_pipe: PipeOpt = False,
    stale_after: StaleOpt = STALE_AFTER_S,
):
    """Optuna search over STUDY's \\[search] space, stored in the same database (optuna-dashboard reads it):
    each sampled point is trained by the same runner as 'run'; points done before are told, not trained."""
    from mae_lab.run.search import run_search
    from mae_lab.run.views import search_summary
    from mae_lab.study.planning import parse_data_override

    with trial_errors("search again to resume it") as display:
        summary = run_search(study, db_url=db, n_trials=trials, device=device, data_root=data_root,
                             data_override=parse_data_override(data), allow_pipe=allow_pipe, display=display,
                             stale_after_s=stale_after)
    for line in search_summary(summary):
        out().print(line, markup=False)
    if not summary.ok:
        raise typer.Exit(1)


@app.command(cls=Command)
def validate(study: Annotated[Path, study_arg(help="The study TOML file.")],
             data_root: DataRootOpt = None, allow_pipe: PipeOpt = False,
             allow_large_grid: LargeGridOpt = False):
    """Check a study file (schema, presets, shapes, data) without running it."""
    from mae_lab.study.planning import validate_study

    out().print(f"{study}: ok ({validate_study(study, data_root, allow_pipe, allow_large_grid)} trials)")


@app.command(cls=Command)
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
    written = report_command(engine, study, fmt=fmt, out=out_path, plots=plots, site=all_, console=out(),
                             from_csv=from_csv)
    for path in written:
        out().print(f"wrote {path}", markup=False)


@app.command("list", cls=Command)
def list_(db: DbOpt = None):
    """List the studies in the database with their trials counted by status."""
    from mae_lab.run.views import studies_table

    out().print(studies_table(_open_db(db, create=False)))


@app.command(cls=Command)
def show(trial: Annotated[str, typer.Argument(help="Trial id or hash prefix.")], db: DbOpt = None,
         recon: Annotated[Optional[Path], typer.Option(
             "--recon", help="Write the trial's reconstructions (paper Figure 2) to this PNG.")] = None,
         across: Annotated[Optional[str], typer.Option(
             "--across", help="With --recon: the same images side by side across the trials of this axis "
                              "(e.g. mask_ratio), same seed.")] = None,
         data_root: DataRootOpt = None):
    """Show one trial: spec, provenance, metrics, results and artifacts; --recon writes its reconstructions."""
    from mae_lab.run.views import show_trial
    from mae_lab.store.reads import find_trial

    engine = _open_db(db, create=False)
    row = find_trial(engine, trial)
    if row is None:
        raise fail(f"no single trial matches {trial!r} (give the id or a longer hash prefix)")
    if recon is None and across is None:
        return show_trial(engine, row, out())
    if recon is None:
        raise fail("--across needs --recon OUT.png")
    from mae_lab.run.recon_figures import show_recon

    labels = show_recon(engine, row, recon, across=across, data_root=data_root)
    out().print(f"wrote {recon}: reconstructions of {'; '.join(labels)}", markup=False)


@app.command("log", cls=Command)
def log_(study: Annotated[str, typer.Argument(help="Study name (in the database).")],
         to: Annotated[str, typer.Option("--to", help="tensorboard or mlflow (or both: 'tensorboard,mlflow').")],
         db: DbOpt = None):
    """Write what the database holds for STUDY's done trials to TensorBoard or MLflow, as live logging does (what a
    view already holds is skipped). TensorBoard: the artifacts folder; MLflow: MLFLOW_TRACKING_URI, else mlflow.db
    beside the database."""
    from mae_lab.run.tracking import backfill

    with trial_errors("", display=False):
        n, where, failed = backfill(study, to, db_url=db, warn=lambda m: Console(stderr=True).print(m, markup=False))
    out().print(f"{study}: {n} done trials logged to {where}", markup=False)
    if failed:
        raise typer.Exit(1)


@app.command(cls=Command)
def export(trial: Annotated[str, typer.Argument(help="Trial id or hash prefix (a done trial).")],
           out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New folder for the export.")],
           to: Annotated[str, typer.Option("--to", help="timm (local-dir: hub layout) or hf (ViTModel).")],
           db: DbOpt = None):
    """Write a trial's pretrained encoder as safetensors plus the config timm or Hugging Face loads."""
    from mae_lab.run.export import export_trial

    engine = _open_db(db, create=False)
    written = export_trial(engine, trial, to, out_dir)
    out().print(f"wrote {written} ({to})", markup=False)


@data_app.command("pack", cls=Command)
def data_pack(src: Annotated[Path, typer.Argument(help="Image folder: class folders of images, train/ + val/ of "
                                                      "class folders, or images with no class folders (unlabeled, "
                                                      "for pretraining).")],
              dest: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder for shards + dataset.json.")],
              shard_size: Annotated[int, typer.Option(min=1)] = 5000,
              name: Annotated[Optional[str], typer.Option()] = None,
              val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.0):
    """Pack an image folder into WebDataset shards plus dataset.json (image files stored as they are)."""
    from rich.progress import Progress

    from mae_lab.data import pack_imagefolder

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("packing", total=None)
        meta = pack_imagefolder(src, dest, shard_size=shard_size, name=name, val_fraction=val_fraction,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    splits = ", ".join(f"{k}: {v['samples']}" for k, v in meta["splits"].items())
    kind = f"{len(meta['classes'])} classes" if meta["classes"] else "unlabeled"
    out().print(f"packed {meta['name']} into {dest}: {splits}; {kind}; {len(meta['sha256'])} shards", markup=False,
                soft_wrap=True)


@data_app.command("info", cls=Command)
def data_info(pattern: Annotated[str, typer.Argument(help="Shard pattern, e.g. 'data/x-{000000..000009}.tar'.")],
              label_key: Annotated[str, typer.Option(help="the label's field in .json (without .cls)")] = "label"):
    """Count the samples, classes and image sizes of some shards."""
    from mae_lab.data import dataset_info

    info = dataset_info(pattern, label_key=label_key)
    out().print_json(json.dumps(info, default=str))


@data_app.command("get", cls=Command)
def data_get(name: Annotated[str, typer.Argument(help="cifar10 or cifar100.")], data_root: DataRootOpt = None):
    """Download a dataset through torchvision and pack it into shards under the data root."""
    from mae_lab.data import get_dataset

    path = get_dataset(name, data_root)
    out().print(f"{name}: shards and dataset.json in {path}", markup=False, soft_wrap=True)


if __name__ == "__main__":
    app()
