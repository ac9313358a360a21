"""Optuna search over a study's ``[search]`` space, through the same runner and database as ``mae-lab run``.

``mae-lab search STUDY.toml`` opens (or creates) an Optuna study named after the study in the same database URL as
mae-lab's own tables (Optuna's RDB storage: its tables sit beside the ``mae_*`` ones, so ``optuna-dashboard URL``
shows it), then runs an ask/tell loop:

1. ask: the sampler (tpe, random, cmaes, grid) proposes a point of the space;
2. the point becomes one trial spec per seed (``expand.resolve``), recorded as trial rows of the study before
   anything runs (axes = the sampled parameters, ``optuna_trial`` = the trial number), so ``list`` and ``report``
   see it at once;
3. each row runs through ``runner.run_trial`` exactly as in ``mae-lab run``; with a pruner, pretraining reports its
   kNN top-1 every ``pretrain.probe_every`` epochs and stops early (status "pruned") when the pruner says so;
4. tell: the objective(s), top-1 of the linear probe and/or fine-tuning, mean over seeds; or PRUNED / FAIL.

A spec done before, in this study or another, is never trained again: done trials whose spec is a point of the
space are told to Optuna as prior observations before sampling (user attribute ``prior``; they do not count
towards ``n_trials``), and a sampled point already done takes its recorded result. ``n_trials`` is the study's
total, so a rerun tops it up. A search killed mid-trial leaves an Optuna trial RUNNING: the next search sees that
trial's rows have a dead worker (or no heartbeat for ``stale_after_s``), fails it and asks the same point again,
which resumes from its pretraining checkpoint. Sampling happens here only: the runner and the model never see Optuna.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import Engine

from mae_lab.run.inits import check_inits
from mae_lab.run.progress import Display, PlainDisplay
from mae_lab.run.runner import Pruned, run_trial
from mae_lab.run.search_space import (
    AskTellGridSampler,
    distributions,
    grid_values,
    in_space,
    make_pruner,
    make_sampler,
)
from mae_lab.run.tracking import trackers_for
from mae_lab.store.engine import artifacts_dir, connect
from mae_lab.store.optuna_storage import PRIOR, searched, storage
from mae_lab.store.outage import outage_limit_s
from mae_lab.store.queue import LostClaim, claim_of, claim_trial, is_stale
from mae_lab.store.reads import done_with_results, find_done, get_result, get_trials
from mae_lab.store.states import FINAL, HEARTBEAT_S, METRIC_COLUMNS, STALE_AFTER_S
from mae_lab.store.tables import ResultRow, TrialRow
from mae_lab.store.writes import add_trial, adopt_result, sync_study
from mae_lab.study.expand import Trial, resolve
from mae_lab.study.identity import BoundTrial, bind, identity
from mae_lab.study.planning import pick_device, plan, resolve_data, run_context, study_hash
from mae_lab.study.spec import Study, StudyError, TrialSpec, get_dotted
from mae_lab.study.tables import SearchSection


def _label(point: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in point.items())


def _counted(trials: list[FrozenTrial]) -> int:
    """Searched trials that count towards n_trials: finished, running or queued; a failed trial that was asked
    again (``retry_of``) counts once, through its retry."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(1 for t in searched(trials)
               if t.state != TrialState.FAIL or t.number not in retried)


@dataclass
class SearchSummary:
    name: str
    target: int  # searched trials the study should have
    states: dict[int, str] = field(default_factory=dict)  # Optuna number -> final state, trials asked by this call
    trained: int = 0  # trial rows trained (or resumed) by this call
    reused: int = 0  # trial rows whose spec was done before: its result was told, nothing trained
    priors: int = 0  # done trials told to Optuna as prior observations by this call
    recovered: int = 0  # trials a dead search left RUNNING, closed from their rows or asked again
    total: int = 0  # searched trials in the study after this call
    best: list[str] = field(default_factory=list)  # one line per best trial (the Pareto front for two objectives)

    def count(self, state: str) -> int:
        return sum(1 for s in self.states.values() if s == state)

    @property
    def ok(self) -> bool:
        return self.count("FAIL") == 0


def prior_points(engine: Engine, study: Study, search: SearchSection,
                 study_id: int | None) -> list[tuple[dict[str, Any], list[ResultRow], list[str]]]:
    """Done trials of other studies whose spec is a point of the search space (``search``, the study's), for every
    seed of the study: (point, results in seed order, "study/trial id" sources)."""
    space, seeds = search.space, study.study.seeds
    found: dict[str, dict[int, tuple[ResultRow, str]]] = {}
    points: dict[str, dict[str, Any]] = {}
    for row, result in done_with_results(engine):
        if row.study_id == study_id or row.seed not in seeds:
            continue
        try:
            spec = json.loads(row.spec_json)
            point = {k: get_dotted(spec, k) for k in space}
        except (KeyError, TypeError, ValueError):
            continue
        if not all(in_space(space[k], v) for k, v in point.items()):
            continue
        if any(getattr(result, METRIC_COLUMNS[o]) is None for o in search.objectives):
            continue
        try:
            ran = TrialSpec.model_validate_json(row.spec_json)
            if identity(resolve(study, point, row.seed)) != identity(ran):
                continue  # differs from the study's base in something the search does not vary (not how it ran)
        except ValueError:  # StudyError, or a spec this version no longer reads
            continue
        key = json.dumps(point, sort_keys=True)
        points[key] = point
        found.setdefault(key, {}).setdefault(row.seed, (result, f"{row.study_id}/{row.id}"))
    return [(points[k], [by_seed[s][0] for s in seeds], [by_seed[s][1] for s in seeds])
            for k, by_seed in found.items() if len(by_seed) == len(seeds)]


def _objective_values(results: Sequence[ResultRow | None], objectives: Sequence[str]) -> list[float] | None:
    """Each objective's mean over the seeds' results; None when a result or a value is missing or not finite."""
    values = []
    for obj in objectives:
        vals: list[float] = []
        for r in results:
            v = getattr(r, METRIC_COLUMNS[obj]) if r is not None else None
            if v is None or not math.isfinite(v):
                return None
            vals.append(v)
        values.append(statistics.fmean(vals))
    return values


def _outcome(engine: Engine, ids: list[int], objectives: Sequence[str]) -> tuple[TrialState, list[float] | None]:
    """An Optuna trial's state and values from its trial rows."""
    rows = get_trials(engine, ids)
    statuses = {r.status for r in rows}
    if "pruned" in statuses:
        return TrialState.PRUNED, None
    if statuses != {"done"}:
        return TrialState.FAIL, None
    values = _objective_values([get_result(engine, r.id) for r in rows], objectives)
    return (TrialState.COMPLETE, values) if values is not None else (TrialState.FAIL, None)


def _tell(ostudy: optuna.Study, trial: optuna.Trial | int, state: TrialState, values: list[float] | None) -> None:
    if state == TrialState.COMPLETE:
        ostudy.tell(trial, values, skip_if_finished=True)
    else:
        ostudy.tell(trial, state=state, skip_if_finished=True)


def recover(engine: Engine, ostudy: optuna.Study, objectives: Sequence[str], stale_after_s: float) -> int:
    """Close the Optuna trials that a dead search left RUNNING: from their rows when these finished, else FAIL and
    ask the same point again (``retry_of``), which resumes from its checkpoint. Returns how many."""
    n = 0
    now = datetime.now()
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ids = t.user_attrs.get("trial_ids") or []
        rows = get_trials(engine, ids)
        age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0
        if rows and all(r.status in FINAL for r in rows):
            _tell(ostudy, t.number, *_outcome(engine, ids, objectives))
        elif any(is_stale(r, stale_after_s) or r.status == "interrupted" for r in rows) or (
                age > stale_after_s and not any(r.status == "running" for r in rows)):
            if not _retry(ostudy, t.number, t.params):
                continue  # another search closed it first
        else:
            continue
        n += 1
    return n


def _retry(ostudy: optuna.Study, number: int, params: dict[str, Any]) -> bool:
    """Fail a trial and queue its point again (``retry_of``); False if it was already finished."""
    try:
        ostudy.tell(number, state=TrialState.FAIL)
    except (ValueError, RuntimeError):
        return False
    ostudy.enqueue_trial(params, user_attrs={"retry_of": number}, skip_if_exists=False)
    return True


def run_search(path: str | Path, *, db_url: str | None = None, n_trials: int | None = None, device: str = "auto",
               data_root: str | None = None, artifacts: str | Path | None = None,
               data_override: dict[str, str] | None = None, allow_pipe: bool = False, display=None,
               stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
               poll_s: float = 5.0) -> SearchSummary:
    """Run the ``[search]`` of the study at ``path`` until the Optuna study holds ``n_trials`` searched trials
    (default: the file's ``n_trials``), the grid is exhausted or ``timeout_s`` has passed."""
    display = display or PlainDisplay()
    study, base = plan(path, data_override)  # validates the file and the space's bounds
    check_inits(study, base, db_url)  # a bad pretrain.init of the base point: exit 2, nothing written
    search = study.search
    if search is None:
        raise StudyError(study.path, "search", "the study has no [search] table: run it with 'mae-lab run'")
    dists = distributions(search)
    device = pick_device(device)
    artifacts = Path(artifacts or artifacts_dir(db_url)).resolve()
    trackers = trackers_for(study, None, db_url=db_url, artifacts=artifacts, warn=display.message)  # [log]
    outage_limit_s()  # a bad MAE_LAB_DB_OUTAGE_S ends here, before the database is opened
    engine = connect(db_url)
    s = study.study
    row = sync_study(engine, name=s.name, description=s.description, paper=s.paper, path=str(path),
                     spec_text=study.text, spec_hash=study_hash(study), trials=[], deactivate_missing=False)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = _optuna_study(study, search, db_url)
    summary = SearchSummary(s.name, n_trials or search.n_trials)
    summary.priors = _tell_priors(engine, ostudy, study, search, row.id, dists)
    if summary.priors:
        display.message(f"search {s.name}: {summary.priors} trial(s) already done in the database told to Optuna "
                        "as prior observations")
    summary.recovered = recover(engine, ostudy, search.objectives, stale_after_s)
    # a fresh sampler seed per call: a rerun must not replay the first call's random stream
    ostudy.sampler = make_sampler(search, s.seeds[0] * 1_000_003 + len(ostudy.get_trials(deepcopy=False)))
    if search.sampler == "grid":
        grid_size = math.prod(len(grid_values(p)) for p in search.space.values())
        summary.target = min(summary.target, grid_size)
    display.message(f"search {s.name}: {search.sampler} sampler, pruner {search.pruner}, objectives "
                    f"{' + '.join(search.objectives)}; {_counted(ostudy.get_trials(deepcopy=False))} of "
                    f"{summary.target} trials in the study, on {device}")

    loop = _SearchLoop(engine, study, search, row.id, ostudy, summary, display, device=device, artifacts=artifacts,
                       trackers=trackers, data_root=data_root, allow_pipe=allow_pipe, stale_after_s=stale_after_s,
                       heartbeat_s=heartbeat_s, poll_s=poll_s)
    deadline = time.monotonic() + search.timeout_s if search.timeout_s else None
    while not _finished(ostudy, summary.target):
        if deadline is not None and time.monotonic() > deadline:
            display.message(f"search {s.name}: time budget of {search.timeout_s:g}s spent")
            break
        loop.run_point(ostudy.ask(dists))

    trials = ostudy.get_trials(deepcopy=False)
    summary.total = _counted(trials)
    if any(t.state == TrialState.COMPLETE for t in trials):
        summary.best = [f"#{t.number} " + ", ".join(f"{o} {100 * v:.1f}%" for o, v in zip(search.objectives, t.values))
                        + f" ({_label({k: t.params[k] for k in search.space if k in t.params})})"
                        for t in ostudy.best_trials]
    return summary


def _optuna_study(study: Study, search: SearchSection, db_url: str | None) -> optuna.Study:
    """The study's Optuna study in the database (created, or loaded when its objectives agree)."""
    directions = [StudyDirection.MAXIMIZE] * len(search.objectives)
    base = resolve(study, {}, study.study.seeds[0])
    pruner = make_pruner(search, base.pretrain.epochs, base.pretrain.probe_every)
    name = study.study.name
    ostudy = optuna.create_study(study_name=name, storage=storage(db_url), directions=directions,
                                 pruner=pruner, load_if_exists=True)
    if len(ostudy.directions) != len(directions):
        raise StudyError(study.path, "search.objectives",
                         f"the database's Optuna study {name!r} has {len(ostudy.directions)} objective(s), this "
                         f"file {len(directions)}: rename the study to start a new search")
    ostudy.set_user_attr("objectives", list(search.objectives))
    return ostudy


def _tell_priors(engine: Engine, ostudy: optuna.Study, study: Study, search: SearchSection, study_id: int,
                 dists: dict[str, Any]) -> int:
    """Tell Optuna the done specs anywhere in the database that are points of the space and it has not been told
    (prior observations); returns how many."""
    told = {t.user_attrs[PRIOR] for t in ostudy.get_trials(deepcopy=False) if PRIOR in t.user_attrs}
    n = 0
    for point, results, sources in prior_points(engine, study, search, study_id):
        key = json.dumps(point, sort_keys=True)
        values = _objective_values(results, search.objectives)
        if key in told or values is None:
            continue
        ostudy.add_trial(optuna.trial.create_trial(params=point, distributions=dists, values=values,
                                                   user_attrs={PRIOR: key, "sources": sources}))
        n += 1
    return n


def _finished(ostudy: optuna.Study, target: int) -> bool:
    """No queued point left to ask, and the study holds `target` searched trials or the grid is exhausted."""
    trials = ostudy.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return False
    return _counted(trials) >= target or (isinstance(ostudy.sampler, AskTellGridSampler)
                                          and ostudy.sampler.is_exhausted(ostudy))


def _pruning_report(trial: optuna.Trial, pruner: str) -> Callable[[dict[str, Any]], None]:
    """The pretraining callback that reports each kNN top-1 to `trial` and raises Pruned when the pruner says so."""
    def report(m: dict[str, Any]) -> None:
        value = m.get("knn_top1")
        if value is None:
            return
        trial.report(value, m["epoch"])
        if trial.should_prune():
            raise Pruned(m["epoch"], f"pruned by the {pruner} pruner after pretraining epoch {m['epoch']}"
                                     f" (knn_top1 {value:.4f})")
    return report


@dataclass
class _SearchLoop:
    """One search call's ask/tell body: a sampled point becomes one trial row per seed, run as `run` runs them."""
    engine: Engine
    study: Study
    search: SearchSection  # the study's
    study_id: int
    ostudy: optuna.Study
    summary: SearchSummary
    display: Display
    device: str
    artifacts: Path
    trackers: Any
    data_root: str | None
    allow_pipe: bool
    stale_after_s: float
    heartbeat_s: float
    poll_s: float
    infos: dict[str, Any] = field(default_factory=dict)  # data spec JSON -> its DatasetInfo, resolved once

    def run_point(self, trial: optuna.Trial) -> None:
        """Record the point's trial rows, run them (a seed that is not done ends the trial) and tell the outcome."""
        search, seeds, summary = self.search, self.study.study.seeds, self.summary
        point = {k: trial.params[k] for k in search.space}
        label = _label(point)
        try:
            specs = [resolve(self.study, point, seed) for seed in seeds]
        except StudyError as exc:  # a combination the schema refuses (e.g. heads that do not divide the width)
            trial.set_user_attr("error", str(exc))
            self.ostudy.tell(trial, state=TrialState.FAIL)
            summary.states[trial.number] = "FAIL"
            self.display.trial_end(f"  #{trial.number} {label}: invalid combination: {exc.reason}")
            return
        unbound = [Trial(spec, dict(point)) for spec in specs]
        planned = [bind(t, run_context(t.spec, self.data_info(t), self.device)) for t in unbound]  # as `run` does
        rows = [add_trial(self.engine, self.study_id, {
                    "hash": t.hash, "pretrain_hash": t.pretrain_hash, "seed": t.spec.seed, "label": label,
                    "axes_json": json.dumps(point), "spec_json": t.spec.model_dump_json()}, optuna_trial=trial.number)
                for t in planned]
        trial.set_user_attr("trial_ids", [r.id for r in rows])
        trial.set_user_attr("hashes", [r.hash for r in rows])
        self.display.trial_start(_counted(self.ostudy.get_trials(deepcopy=False)), summary.target,
                                 f"#{trial.number} {label}", rows[0].hash)
        report = _pruning_report(trial, search.pruner) if search.pruner != "none" else None
        try:
            for i, (t, trow) in enumerate(zip(planned, rows)):
                if self.run_row(trow, t, report if i == 0 else None) != "done":
                    break  # a pruned or failed seed ends the Optuna trial
        except KeyboardInterrupt:  # the row is marked interrupted; the next search asks this point again
            _retry(self.ostudy, trial.number, trial.params)
            raise
        state, values = _outcome(self.engine, [r.id for r in rows], search.objectives)
        _tell(self.ostudy, trial, state, values)
        summary.states[trial.number] = state.name
        shown = ", ".join(f"{o} {100 * v:.1f}%" for o, v in zip(search.objectives, values or []))
        self.display.trial_end(f"  #{trial.number} {label}: {state.name.lower()}" + (f", {shown}" if shown else ""))

    def run_row(self, trow: TrialRow, t: BoundTrial, report: Callable[[dict[str, Any]], None] | None) -> str:
        """Bring one trial row to a final status: reuse a done result, else claim and run it (waiting while another
        live process runs the same spec). Returns the row's status."""
        engine, summary = self.engine, self.summary
        if trow.status in ("done", "pruned"):
            summary.reused += 1
            return trow.status
        while (claimed := claim_trial(engine, trow.id, stale_after_s=self.stale_after_s)) is None:
            current = get_trials(engine, [trow.id])[0]
            if current.status in ("done", "pruned"):
                summary.reused += 1
                return current.status
            time.sleep(self.poll_s)
        found = find_done(engine, trow.hash)
        if found is not None:  # the copy is a write like any other: fenced by the claim just taken
            try:
                adopt_result(engine, claimed.id, found[1], claim=claim_of(claimed))
            except LostClaim as exc:  # taken over meanwhile: the successor's rows stand, as in run_trial
                self.display.message(f"  {exc}")
                return "lost"
            summary.reused += 1
            return "done"
        summary.trained += 1
        return run_trial(engine, claimed, self.data_info(t), device=self.device, artifacts=self.artifacts,
                         display=self.display, on_pretrain_metrics=report, heartbeat_s=self.heartbeat_s,
                         data_root=self.data_root, trackers=self.trackers, study=self.study.study.name)

    def data_info(self, t: Trial) -> Any:
        key = t.spec.data.model_dump_json()
        if key not in self.infos:
            self.infos[key] = resolve_data(self.study, [t], self.data_root, self.allow_pipe)[key]
        return self.infos[key]
