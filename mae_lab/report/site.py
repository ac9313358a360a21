"""What ``mae-lab report`` writes: one study or every study printed or written in a format, with plots, and
``--all``'s folder: per-study Markdown pages (tables, verdicts, plots, reconstructions), an index, ``summary.md``
(the hand-kept ``summary_intro.md`` followed by computed verdicts) and the per-trial data ``trials.csv`` /
``trials.json`` from which ``--from`` regenerates the same folder without the database."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from sqlalchemy.engine import Engine

from mae_lab.atomic import write_atomic
from mae_lab.errors import BadInput
from mae_lab.report.export import to_csv, to_dict
from mae_lab.report.formats import FORMATS, UNITS, render, render_text, to_markdown
from mae_lab.report.plots import study_plots
from mae_lab.report.recon_page import ReconError, study_recon_png
from mae_lab.report.study_report import StudyReport, headline, study_names, summarize, summarize_records, title
from mae_lab.report.summary import shared_control, verdict_table
from mae_lab.report.surface_view import surface_markdown, surface_notes, surface_plots
from mae_lab.report.trajectory import has_trajectories, probe_count, study_trajectories, trajectory_section
from mae_lab.store import records as trial_records
from mae_lab.store.records import StudyRecords

INTRO = "summary_intro.md"  # kept by hand beside summary.md; everything after it is computed


def report_command(engine: Engine | None, name: str | None, *, fmt: str = "table", out: str | Path | None = None,
                   plots: str | Path | None = None, site: bool = False, console: Console | None = None,
                   from_csv: str | Path | None = None) -> list[Path]:
    """What ``mae-lab report`` does: print or write one study (or every study), optionally with plots.

    ``site``: ``out`` is a folder that gets one Markdown page per study plus its plots (``write_site``).
    Otherwise ``out`` is one file holding every selected study in ``fmt`` (JSON: a list when several), and the
    table format prints to ``console`` when there is no ``out``. ``from_csv``: read the trials from a trials.csv
    instead of the database (``engine`` unused). Returns the files written.
    Raises BadInput for an unknown study, a bad format, an empty database or a bad trials file.
    """
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if site and out is None:
        raise BadInput("--all writes a folder of pages: give it with --out DIR (e.g. docs/results/)")
    site_dir = out if site else None
    if from_csv is not None:
        studies = _csv_studies(from_csv, name)
        if site_dir is not None:
            return write_site(studies, site_dir, source=Path(from_csv).parent)
        reports = [summarize_records(s) for s in studies]
    else:
        if engine is None:
            raise ValueError("report_command reads a database (engine) or a trials file (from_csv)")
        names = study_names(engine, name)
        if site_dir is not None:
            return write_site([trial_records.from_db(engine, n) for n in names], site_dir, engine=engine)
        reports = [summarize(engine, n) for n in names]
    written = _write_plots(reports, engine, Path(plots)) if plots is not None else []
    text = _report_text(reports, engine, fmt)
    if out is not None:
        written.insert(0, write_atomic(out, text))
    elif fmt == "table" and console is not None:
        for rep in reports:
            render(rep, console)
            for line in surface_notes(engine, rep.name) if engine is not None else []:
                console.print(line, markup=False, highlight=False)
    elif console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    return written


def _csv_studies(from_csv: str | Path, name: str | None) -> list[StudyRecords]:
    """The studies of a trials.csv; only `name` when given (BadInput when the file has none of that name)."""
    studies = trial_records.read_csv(from_csv)
    if name is None:
        return studies
    studies = [s for s in studies if s.name == name]
    if not studies:
        raise BadInput(f"no study named {name!r} in {from_csv}")
    return studies


def _write_plots(reports: list[StudyReport], engine: Engine | None, plots: Path) -> list[Path]:
    """Each study's plots in `plots` (in a folder per study when there are several), with its probe-surface
    heatmaps (eval.linear.blocks) when the database is at hand; the files written."""
    written: list[Path] = []
    for rep in reports:
        written += study_plots(rep, plots / rep.name if len(reports) > 1 else plots)
    if engine is not None:
        for rep in reports:
            written += surface_plots(engine, rep.name, plots / rep.name if len(reports) > 1 else plots)
    return written


def _report_text(reports: list[StudyReport], engine: Engine | None, fmt: str) -> str:
    """Every report in `fmt`, as one text (JSON: a list and CSV: one block per study when there are several)."""
    if fmt == "json" and len(reports) > 1:
        text = json.dumps([to_dict(r) for r in reports], indent=2) + "\n"
    elif fmt == "csv" and len(reports) > 1:
        text = "".join(f"# {r.name}\n" + to_csv(r) for r in reports)
    else:
        text = "\n".join(render_text(r, fmt) for r in reports)
    if fmt == "md" and engine is not None:  # probe surfaces: where the best block is
        text += "".join("\n" + surface_markdown(engine, r.name) for r in reports if surface_notes(engine, r.name))
    return text


def _recon(rep: StudyReport, engine: Engine | None, source: Path | None) -> bytes | None:
    """The study's reconstruction figure: rendered from the database's artifacts, or else carried over from
    ``source``, the folder of the trials.csv or the folder being rewritten (reconstructions need checkpoints, which
    neither a trials file nor a committed database holds)."""
    if engine is not None:
        try:
            png = study_recon_png(engine, rep)
        except ReconError:
            png = None
        if png is not None:
            return png
        # no checkpoints or figures here (a committed database): keep the figure the folder has
    old = None if source is None else source / rep.name / "recon.png"
    return old.read_bytes() if old is not None and old.is_file() else None


def summary_page(reports: list[StudyReport], studies: list[StudyRecords], intro: str) -> str:
    """``summary.md``: the hand-kept introduction, then every verdict, n per point and the compute spent, all
    computed from the trials."""
    lines = [intro.rstrip("\n"), "", "## Verdicts (computed by `mae-lab report --all`; do not edit below)", "",
             *verdict_table(reports), "", shared_control(reports)]
    lines += ["", "## State of the run", "", run_state(reports)]
    lines += ["", "## Orderings against the paper", ""]
    for rep in reports:
        _, order, _ = headline(rep)
        lines.append(f"- [{rep.name}]({rep.name}.md): linear ordering {order}; best here {headline(rep)[0]}")
    emerges = [f"- [{rep.name}]({rep.name}.md), {tr.sentence()}" for rep, s in zip(reports, studies)
               if has_trajectories(s) for tr in study_trajectories(rep, s)]
    if emerges:  # where each effect emerges over pretraining (pretrain.probe_every)
        lines += ["", "## Effects over pretraining", "", *emerges]
    lines += ["", "## Compute", "", compute_spent(studies), "", f"- {UNITS}", ""]
    return "\n".join(lines)


def run_state(reports: list[StudyReport]) -> str:
    """One line: how many points of the adaptive-seed studies are decided, undecided at their maximum seeds (their
    verdict states the smallest effect they rule out), or undecided with seeds still due."""
    decided = at_max = due = 0
    for rep in reports:
        for row in rep.rows:
            if rep.plan is None or row.decided is None:
                continue
            decided += row.decided
            at_max += not row.decided and row.n >= rep.plan.max
            due += not row.decided and row.n < rep.plan.max
    if not decided + at_max + due:
        return "No study here uses adaptive seeds."
    state = "complete" if not due else "in progress: `make results` resumes it and adds the seeds due"
    return (f"Adaptive seeds, {decided + at_max + due} points compared with their study's default: {decided} "
            f"decided, {at_max} undecided at their maximum seeds (the verdict states the smallest effect each rules "
            f"out), {due} undecided with seeds still due. The run is {state}.")


def compute_spent(studies: list[StudyRecords]) -> str:
    """One line: the trials done and the compute they took, from each trial's own wall clock (pretraining, probe,
    fine-tune; a pretraining shared by several trials, or a result copied to another study, counted once, where it
    ran) times the cores (CPU: processes x torch threads) or GPUs it held, in all and per machine it ran on."""
    per_machine: dict[str, list[float]] = {}  # name -> [trials, CPU core-min, GPU-min, process-min of unknown threads]
    for s in studies:
        for t in s.trials:
            if t["status"] != "done":
                continue
            own = 0.0 if t["pretrain_reused"] else (t["pretrain_wall_s"] or 0.0)
            minutes = 0.0 if t["result_copied"] else (own + (t["linear_wall_s"] or 0.0)
                                                      + (t["finetune_wall_s"] or 0.0)) / 60.0
            procs = int(t["world_size"] or 1)
            cuda = (t["device"] or "").startswith("cuda")
            name = t["device_name"] or "unrecorded"
            if not cuda and t["device_name"] and not name.endswith(")"):
                name += " (ISA flags not recorded)"  # CPU names before they carried the kernel level and bf16 flags
            m = per_machine.setdefault(name, [0, 0.0, 0.0, 0.0])
            m[0] += 1
            if cuda:
                m[2] += minutes * procs
            elif t["cpu_threads"]:
                m[1] += minutes * procs * int(t["cpu_threads"])
            else:
                m[3] += minutes * procs

    def spent(core: float, gpu: float, unknown: float) -> str:
        parts = [f"{core:.0f} CPU core-minutes"] if core or not gpu else []
        if gpu:
            parts.append(f"{gpu:.0f} GPU-minutes")
        if unknown:
            parts.append(f"{unknown:.0f} process-minutes whose CPU threads were not recorded (schema < 4)")
        return ", ".join(parts)

    trials, *total = [sum(m[i] for m in per_machine.values()) for i in range(4)]
    machines = "; ".join(f"{name}, {m[0]:.0f} trial{'s' * (m[0] != 1)}: {spent(*m[1:])}"
                         for name, m in sorted(per_machine.items())) or "-"
    probes = probe_count(studies)
    extra = (f" Beside the final linear probes: {probes} linear probe{'s' * (probes != 1)} at pretraining epochs "
             "(pretrain.probe_every with eval.linear.blocks; those inside pretraining are in its wall clock)."
             if probes else "")
    return (f"{trials:.0f} trials done: {spent(*total)} (each trial's own wall clock: pretraining, probe, fine-tune; "
            "a pretraining shared by several trials, or a result copied from another study, counted once, where it "
            f"ran). Per machine: {machines}.{extra}")


def write_site(studies: list[StudyRecords], folder: str | Path, *, engine: Engine | None = None,
               source: Path | None = None) -> list[Path]:
    """One Markdown page per study (``<folder>/<study>.md``) with its tables and plots (``<folder>/<study>/``),
    ``index.md``, ``summary.md`` (after ``summary_intro.md``, read from ``folder`` or else ``source``), and
    ``trials.csv`` / ``trials.json``. ``engine``: the database, for reconstructions and a search's Optuna side;
    ``source``: the folder of the trials.csv read instead. Every file is written atomically."""
    folder = Path(folder)
    written: list[Path] = []
    index = ["# mae-lab results", "", "Summary with computed verdicts: [summary.md](summary.md); per-trial data: "
             "[trials.csv](trials.csv), [trials.json](trials.json).", "",
             "| study | paper | points | trials done | best linear (val) here | linear ordering vs the paper | "
             "linear verdicts |", "|:---|:---|---:|---:|:---|:---|:---|"]
    reports = []
    for s in studies:
        rep = summarize(engine, s.name) if engine is not None else summarize_records(s)
        reports.append(rep)
        images = study_plots(rep, folder / rep.name)
        recon = _recon(rep, engine, folder if engine is not None else source)
        if recon is not None:
            images.append(write_atomic(folder / rep.name / "recon.png", recon))
        page = [f"# {title(rep)}", "", to_markdown(rep, heading=""), f"Compute: {compute_spent([s])}", "",
                "## Plots", ""]
        for img in images:
            page += [f"![{img.stem}]({rep.name}/{img.name})", ""]
        if not images:
            page += ["(no finished trials to plot yet)", ""]
        trajectory, traj_png = trajectory_section(rep, s, folder)
        if trajectory:  # effects over pretraining: Δ per probed epoch (pretrain.probe_every)
            page.append(trajectory)
            written += traj_png
        if engine is not None and (surface := surface_markdown(engine, rep.name, rep.name)):
            page.append(surface)  # the probe surface: where the best block is, and its heatmaps
            written += surface_plots(engine, rep.name, folder / rep.name)
        written.append(write_atomic(folder / f"{rep.name}.md", "\n".join(page)))
        written += images
        done = sum(r.status.get("done", 0) for r in rep.rows)
        index.append(f"| [{rep.name}]({rep.name}.md) | {rep.paper or '-'} | {len(rep.rows)} | "
                     f"{done}/{sum(len(r.trials) for r in rep.rows)} | {' | '.join(headline(rep))} |")
    written.append(write_atomic(folder / "index.md", "\n".join(index) + "\n"))
    intro_file = next((p for p in (folder / INTRO, None if source is None else source / INTRO)
                       if p is not None and p.is_file()), None)
    intro = intro_file.read_text(encoding="utf-8") if intro_file else "# mae-lab results: summary\n"
    if intro_file is not None and intro_file.parent != folder:
        written.append(write_atomic(folder / INTRO, intro))
    written.append(write_atomic(folder / "summary.md", summary_page(reports, studies, intro)))
    written.append(write_atomic(folder / "trials.csv", trial_records.to_csv(studies)))
    written.append(write_atomic(folder / "trials.json", trial_records.to_json(studies)))
    return written
