"""What ``mae-lab report`` writes: one study or every study printed or written in a format, with plots, and
``--all``'s folder of per-study Markdown pages (tables, plots, reconstructions) with an index."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from sqlalchemy.engine import Engine

from mae_lab.atomic import write_atomic
from mae_lab.plots import study_plots
from mae_lab.report import headline, study_names, summarize, title
from mae_lab.report_format import FORMATS, render, render_text, to_csv, to_dict, to_markdown

def report_command(engine: Engine, name: str | None, *, fmt: str = "table", out: str | Path | None = None,
                   plots: str | Path | None = None, site: bool = False, console: Console | None = None
                   ) -> list[Path]:
    """What ``mae-lab report`` does: print or write one study (or every study), optionally with plots.

    ``site``: ``out`` is a folder that gets one Markdown page per study plus its plots (``write_site``).
    Otherwise ``out`` is one file holding every selected study in ``fmt`` (JSON: a list when several), and the
    table format prints to ``console`` when there is no ``out``. Returns the files written.
    Raises KeyError for an unknown study, ValueError for a bad format or an empty database.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    names = study_names(engine, name)
    if site:
        if out is None:
            raise ValueError("--all writes a folder of pages: give it with --out DIR (e.g. docs/results/)")
        return write_site(engine, out, names)
    reports = [summarize(engine, n) for n in names]
    written: list[Path] = []
    if plots is not None:
        for rep in reports:
            written += study_plots(engine, rep, Path(plots) / rep.name if len(reports) > 1 else Path(plots))
    if fmt == "json" and len(reports) > 1:
        text = json.dumps([to_dict(r) for r in reports], indent=2) + "\n"
    elif fmt == "csv" and len(reports) > 1:
        text = "".join(f"# {r.name}\n" + to_csv(r) for r in reports)
    else:
        text = "\n".join(render_text(r, fmt) for r in reports)
    if out is not None:
        written.insert(0, write_atomic(out, text))
    elif fmt == "table" and console is not None:
        for rep in reports:
            render(rep, console)
    elif console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True, end="")
    return written


def write_site(engine: Engine, folder: str | Path, names: list[str]) -> list[Path]:
    """One Markdown page per study (``<folder>/<study>.md``) with its tables and plots (``<folder>/<study>/``),
    plus ``<folder>/index.md`` linking them. Every file is written atomically."""
    # recon_lookup imports torch (checkpoints, datasets): only --all pays for it, the plain report stays light
    from mae_lab.recon_lookup import ReconError, study_recon_png

    folder = Path(folder)
    written: list[Path] = []
    index = ["# mae-lab results", "",
             "| study | paper | points | trials done | best linear here | linear ordering vs the paper | "
             "within seed noise |", "|:---|:---|---:|---:|:---|:---|---:|"]
    for name in names:
        rep = summarize(engine, name)
        images = study_plots(engine, rep, folder / rep.name)
        try:
            recon = study_recon_png(engine, rep)
        except ReconError:
            recon = None
        if recon is not None:
            images.append(write_atomic(folder / rep.name / "recon.png", recon))
        page = [f"# {title(rep)}", "", to_markdown(rep, heading=""), "## Plots", ""]
        for img in images:
            page += [f"![{img.stem}]({rep.name}/{img.name})", ""]
        if not images:
            page += ["(no finished trials to plot yet)", ""]
        written.append(write_atomic(folder / f"{rep.name}.md", "\n".join(page)))
        written += images
        done = sum(r.status.get("done", 0) for r in rep.rows)
        index.append(f"| [{rep.name}]({rep.name}.md) | {rep.paper or '-'} | {len(rep.rows)} | "
                     f"{done}/{sum(len(r.trials) for r in rep.rows)} | {' | '.join(headline(rep))} |")
    written.append(write_atomic(folder / "index.md", "\n".join(index) + "\n"))
    return written
