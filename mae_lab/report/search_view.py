"""The Optuna side of a searched study for the report: best trials (the Pareto front for two objectives) and
fANOVA parameter importances, read from Optuna's storage; as (title, columns, rows) tables, rich and Markdown."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine

from mae_lab.store.optuna_storage import PRIOR, searched, storage


@dataclass
class SearchReport:
    objectives: list[str]
    states: dict[str, int]  # Optuna state -> searched trials
    priors: int
    best: list[dict[str, Any]]  # best trials (single objective: top 5) or the Pareto front (two), best first
    pareto: bool
    importances: dict[str, dict[str, float]]  # objective -> param -> importance (normalized)
    note: str = ""  # why importances are missing, when they are


def search_report(engine: Engine, name: str, objectives: list[str], top: int = 5) -> SearchReport | None:
    """The Optuna side of a searched study: best trials or Pareto front, parameter importances. None when the
    database holds no Optuna study of that name."""
    url = engine.url.render_as_string(hide_password=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        ostudy = optuna.load_study(study_name=name, storage=storage(url))
    except KeyError:
        return None
    trials = ostudy.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in searched(trials):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pareto = len(ostudy.directions) > 1

    def entry(t: FrozenTrial) -> dict[str, Any]:
        return {"number": t.number, "values": dict(zip(objectives, t.values)), "params": dict(t.params),
                "prior": PRIOR in t.user_attrs}

    if pareto:
        best = sorted((entry(t) for t in ostudy.best_trials), key=lambda e: -list(e["values"].values())[0])
    else:
        best = [entry(t) for t in sorted(complete, key=lambda t: -t.values[0])[:top]]
    importances: dict[str, dict[str, float]] = {}
    note = ""
    if len(complete) < 2:
        note = "parameter importances need at least 2 completed trials"
    else:
        for i, obj in enumerate(objectives):
            try:
                importances[obj] = optuna.importance.get_param_importances(
                    ostudy, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                    target=functools.partial(_objective_value, i))
            except (RuntimeError, ValueError) as exc:
                note = f"parameter importances unavailable: {exc}"
                break
    return SearchReport(list(objectives), states, len(trials) - len(searched(trials)), best, pareto, importances,
                        note)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in params.items())


def search_tables(rep) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of a SearchReport: best trials or Pareto front, then parameter importances."""
    objs = rep.objectives
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(rep.states.items()))
    what = "Pareto front" if rep.pareto else "best trials"
    title_ = f"search: {what} ({states}" + (f"; {rep.priors} prior observations" if rep.priors else "") + ")"
    best = [[f"#{b['number']}" + (" (prior)" if b["prior"] else ""),
             *(f"{100 * b['values'][o]:.1f}" for o in objs), _params_text(b["params"])] for b in rep.best]
    tables = [(title_, ["trial", *(f"{o} top-1 %" for o in objs), "params"], best)]
    if rep.importances:
        params = list(next(iter(rep.importances.values())))
        imp = [[k, *(f"{rep.importances[o].get(k, 0.0):.3f}" for o in objs)] for k in params]
        tables.append(("search: parameter importance (fANOVA, normalized)", ["param", *objs], imp))
    return tables


def render_search(rep, console: Console) -> None:
    for name, cols, rows in search_tables(rep):
        table = Table(title=name, title_justify="left")
        for i, c in enumerate(cols):
            table.add_column(c, justify="left" if i == 0 or c == "params" else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    if rep.note:
        console.print(rep.note, markup=False, highlight=False)


def search_markdown(rep) -> list[str]:
    lines: list[str] = []
    for name, cols, rows in search_tables(rep):
        lines += [f"**{name}**", "", "| " + " | ".join(cols) + " |",
                  "|" + "|".join(":---" if i == 0 or c == "params" else "---:" for i, c in enumerate(cols)) + "|"]
        lines += ["| " + " | ".join(c.replace("|", r"\|") for c in r) + " |" for r in rows]
        lines.append("")
    if rep.note:
        lines += [rep.note, ""]
    return lines


def _objective_value(i: int, t: FrozenTrial) -> float:
    """Objective i of a completed trial (Optuna's importance target)."""
    return t.values[i]
