"""What the commands print: a dry run's plan, a run's or a search's summary, a trial (``show``) and the studies
(``list``). Torch-free: ``run --dry-run``, ``show`` and ``list`` end here."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from mae_lab.store.engine import DbError, connect
from mae_lab.store.reads import get_study, list_studies, study_trials, trial_details
from mae_lab.store.states import STATUSES
from mae_lab.store.tables import RUN_PROVENANCE, TrialRow
from mae_lab.study.identity import BoundTrial
from mae_lab.study.planning import binder, parse_data_override, pick_device, plan, resolve_data
from mae_lab.study.spec import Study

PLAIN_PLAN = 500  # a dry run of more trials prints tab-separated lines instead of a table


def dry_run(study: Path, *, db_url: str | None, data: str | None, data_root: str | None, allow_pipe: bool,
            allow_large_grid: bool, device: str, nproc: int, console: Console) -> None:
    """Print the trials ``run`` would record, with the hashes it records: under this data, process count and
    precision, and each trial's status in the database (pending when there is none)."""
    spec, trials = plan(study, parse_data_override(data), allow_large_grid)
    infos = resolve_data(spec, trials, data_root, allow_pipe)
    bind = binder(infos, pick_device(device), nproc)
    print_plan(spec, [bind(t) for t in trials], db_url, console)


def print_plan(study: Study, trials: list[BoundTrial], db_url: str | None, console: Console) -> None:
    status: dict[str, str] = {}
    try:  # read-only: a missing database just means every trial is pending
        engine = connect(db_url, create=False)
        row = get_study(engine, study.study.name)
        if row is not None:
            status = {t.hash: t.status for t, _ in study_trials(engine, row.id)}
    except (DbError, SQLAlchemyError):
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
    console.print(table)


def run_summary(summary) -> str:  # noqa: ANN001 - a runner.RunSummary (the runner imports torch)
    parts = [f"{summary.count(s)} {s}" for s in ("done", "failed", "diverged") if summary.count(s)]
    if summary.copied:
        parts.insert(0, f"{summary.copied} copied from another study")
    return f"{summary.total} trials: {summary.skipped} already done" + "".join(f", {p}" for p in parts)


def search_summary(summary) -> list[str]:  # noqa: ANN001 - a search.SearchSummary (search imports optuna)
    counts = ", ".join(f"{summary.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if summary.count(s))
    return [f"search {summary.name}: {summary.total} of {summary.target} trials in the study; this run: "
            f"{len(summary.states)} asked" + (f" ({counts})" if counts else "") +
            f", {summary.trained} trained, {summary.reused} reused" +
            (f", {summary.priors} prior observations" if summary.priors else ""),
            *(f"best {line}" for line in summary.best)]


def studies_table(engine) -> Table:  # noqa: ANN001
    table = Table(title="studies")
    table.add_column("study")
    for s in STATUSES:
        table.add_column(s, justify="right")
    for study, counts in list_studies(engine):
        table.add_row(study.name, *(str(counts.get(s, 0)) for s in STATUSES))
    return table


def show_trial(engine, row: TrialRow, console: Console) -> None:  # noqa: ANN001
    """A trial: spec, how it ran (tables.RUN_PROVENANCE), metrics, result, artifacts and error."""
    metrics, result, arts = trial_details(engine, row.id)
    console.print(f"[bold]trial {row.id}[/bold] {row.hash} {row.label} — {row.status}")
    ran = ", ".join(f"{k.replace('_', ' ')} {getattr(row, k)}" for k in RUN_PROVENANCE if getattr(row, k) is not None)
    for line in (ran, f"started {row.started_at}, ended {row.ended_at}, attempts {row.attempts}"
                 + (f", progress {row.progress}" if row.progress else "")):
        console.print(line, markup=False, soft_wrap=True)
    console.print_json(row.spec_json)
    if result is not None:
        console.print_json(json.dumps(result.model_dump(exclude={"id", "trial_id"})))
    if metrics:
        table = Table(title="metrics")
        for col in ("stage", "epoch", "name", "value"):
            table.add_column(col)
        for m in metrics:
            table.add_row(m.stage, str(m.epoch), m.name, f"{m.value:.6g}")
        console.print(table)
    for a in arts:
        console.print(f"artifact {a.kind}: {a.path} sha256 {a.sha256}", markup=False, soft_wrap=True)
    if row.error:
        console.print(f"[red]error:[/red] {row.error}", markup=True)
