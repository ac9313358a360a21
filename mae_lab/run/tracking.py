"""Live views of a study's trials in TensorBoard and MLflow, written from what the database holds.

A tracker is only a view: every number it gets is one the runner has just written to the database (each epoch's
metrics, every ``[log] every`` pretraining steps a ``pretrain_step`` row, the result, the reconstruction), under the
key ``<stage>/<name>`` at that row's step or epoch (results: ``result/<name>`` at step 0). A trial that resumes first
replays its rows (the trackers skip what they hold), and a backfill (``mae-lab log``) replays the rows of done
trials, so a backfill writes what live logging did. Logging is execution, never science: it is no part of a trial's
identity, runs on rank 0 only (the runner), and a tracker that fails (a server down, a full disk) warns once and is
left for the rest of the run, while the trial goes on to its result.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.engine import make_url as parse_url

from mae_lab.run.trackers import MlflowRun, TensorBoardRun, TrackerError, TrialMeta, parse_trackers, require
from mae_lab.store.engine import artifacts_dir, connect, resolve_url
from mae_lab.store.queue import Claim, LostClaim
from mae_lab.store.reads import get_result, get_study, get_trials, study_trials, trial_details
from mae_lab.store.tables import TrialRow
from mae_lab.store.writes import set_provenance
from mae_lab.study.spec import Study

STEP_STAGE = "pretrain_step"  # the metrics rows of every `every`-th pretraining step (epoch = the step)
RESULT_KEYS = ("linear_top1", "finetune_top1", "linear_test_top1", "finetune_test_top1", "knn_top1", "pretrain_loss",
               "pretrain_wall_s", "pretrain_images_per_s", "pretrain_peak_mem_mib", "linear_wall_s",
               "finetune_wall_s", "encoder_gflops", "encoder_params", "total_params")


def mlflow_uri(db_url: str | None, artifacts: Path) -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` beside a SQLite database (else in ``artifacts``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    parsed = parse_url(resolve_url(db_url))
    local = parsed.database if parsed.get_backend_name() == "sqlite" and parsed.database != ":memory:" else None
    folder = Path(local).parent if local else artifacts
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def trial_meta(study: str, row: TrialRow, commit: str | None) -> TrialMeta:
    return TrialMeta(study=study, hash=row.hash, seed=row.seed, label=row.label, commit=commit, axes=row.axes,
                     params=_flat(json.loads(row.spec_json)))


@dataclass
class Trackers:
    """The views one run (``mae-lab run``, ``worker`` or ``log``) writes to, and those that failed in it."""

    names: list[str]
    every: int  # pretraining steps between pretrain_step rows
    tensorboard_dir: Path
    mlflow_uri: str
    mlflow_artifacts: Path | None  # where a local MLflow store keeps artifacts (None: the server decides)
    warn: Callable[[str], None] = print
    failed: set[str] = field(default_factory=set)

    def fail(self, name: str, exc: BaseException) -> None:
        if name not in self.failed:
            self.failed.add(name)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.warn(f"warning: logging to {name} failed ({type(exc).__name__}: {reason[:300]}); it is left for "
                      "the rest of this run, the trials go on and are recorded in the database")

    def open(self, engine: Engine, study: str, row: TrialRow, *, commit: str | None,
             claim: Claim | None = None, fresh: bool | None = None) -> TrialLog:
        """The trial's runs in every working tracker, with what the database already holds replayed into them.
        ``fresh`` (default: the database holds no metrics of the trial): the trial starts over, so does its view."""
        assert row.id is not None  # a row read from the database
        rows, _, _ = trial_details(engine, row.id)
        fresh = not rows if fresh is None else fresh
        meta = trial_meta(study, row, commit)
        runs: list[TensorBoardRun | MlflowRun] = []
        for name in self.names:
            if name in self.failed:
                continue
            try:
                if name == "tensorboard":
                    runs.append(TensorBoardRun(self.tensorboard_dir, meta, fresh=fresh))
                else:
                    run = MlflowRun(self.mlflow_uri, self.mlflow_artifacts, meta,
                                    run_id=None if fresh else row.mlflow_run_id)
                    runs.append(run)
                    if run.run_id != row.mlflow_run_id:
                        set_provenance(engine, row.id, claim=claim, mlflow_run_id=run.run_id)
            except LostClaim:
                raise
            except Exception as exc:  # noqa: BLE001 - a view never fails a trial
                self.fail(name, exc)
        log = TrialLog(self, runs, next((r.run_id for r in runs if isinstance(r, MlflowRun)), row.mlflow_run_id))
        by_step: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
        for m in rows:
            by_step[(m.stage, m.epoch)][m.name] = m.value
        for (stage, step), values in sorted(by_step.items()):
            log.metrics(stage, step, values)
        return log


@dataclass
class TrialLog:
    """One trial's runs in the working trackers; every call is guarded (a failure warns once and drops the run)."""

    trackers: Trackers | None
    runs: list[Any]
    mlflow_run_id: str | None = None  # the trial's MLflow run (this attempt's, else the one recorded before)

    @property
    def every(self) -> int:
        return self.trackers.every if self.trackers is not None else 0

    @property
    def active(self) -> bool:
        return bool(self.runs)

    def _each(self, call: Callable[[Any], None]) -> None:
        for run in list(self.runs):
            try:
                call(run)
            except Exception as exc:  # noqa: BLE001 - a view never fails a trial
                self.runs.remove(run)
                if self.trackers is not None:
                    self.trackers.fail(run.name, exc)

    def metrics(self, stage: str, step: int, values: dict[str, float]) -> None:
        """One database metrics row set: ``<stage>/<name>`` at ``step`` (the epoch, or the step of pretrain_step)."""
        if self.runs:
            self._each(lambda r: r.scalars(step, {f"{stage}/{k}": v for k, v in values.items()}))

    def close(self, engine: Engine, trial_id: int, status: str | None) -> None:
        """The trial ended with ``status`` (None: as the database says): its result and reconstruction as the
        database holds them, then close. A trial taken over by another worker ("lost") is left to it."""
        if not self.runs:
            return
        if status == "lost":
            return self._each(lambda r: r.close())
        status = status or get_trials(engine, [trial_id])[0].status
        result = get_result(engine, trial_id) if status in ("done", "pruned") else None
        values = {f"result/{k}": float(v) for k in RESULT_KEYS
                  if result is not None and (v := getattr(result, k)) is not None}
        _, _, arts = trial_details(engine, trial_id)
        recon = next((Path(a.path) for a in arts if a.kind == "recon"), None)
        self._each(lambda r: r.finish(status, values, recon))
        self._each(lambda r: r.close())


NO_LOG = TrialLog(None, [])


def trackers_for(study: Study, override: str | None, *, db_url: str | None, artifacts: Path,
                 warn: Callable[[str], None]) -> Trackers | None:
    """The run's trackers: ``--log`` (``override``) else the study's ``[log] trackers``; None for none. Raises
    TrackerError (bad input, before anything is written) for an unknown name or a missing extra."""
    names: list[str] = parse_trackers(override) if override is not None else list(study.log.trackers)
    if not names:
        return None
    require(names, "--log" if override is not None else f"{study.path}: log.trackers")
    return make_trackers(names, study.log.every, db_url=db_url, artifacts=artifacts, warn=warn)


def make_trackers(names: list[str], every: int, *, db_url: str | None, artifacts: Path,
                  warn: Callable[[str], None]) -> Trackers:
    uri = mlflow_uri(db_url, artifacts)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    return Trackers(names, every, artifacts / "tensorboard", uri, artifacts / "mlflow" if local else None, warn)


def backfill(study: str, to: str, *, db_url: str | None,
             warn: Callable[[str], None] = print) -> tuple[int, str, set[str]]:
    """``mae-lab log STUDY --to tensorboard|mlflow``: write every done trial of ``study`` as the database holds it
    (what live logging writes; what a view already holds is skipped). Returns (trials, where, failed trackers)."""
    names = parse_trackers(to, "--to")
    require(names, "--to")
    engine = connect(db_url, create=False)
    row = get_study(engine, study)
    if row is None or row.id is None:
        raise TrackerError(f"no study named {study!r} in the database")
    trackers = make_trackers(names, 1, db_url=db_url, artifacts=artifacts_dir(db_url).resolve(), warn=warn)
    done = [t for t, _ in study_trials(engine, row.id) if t.status == "done"]
    for t in done:
        log = trackers.open(engine, study, t, commit=t.git_commit, fresh=False)
        log.close(engine, t.id or 0, t.status)  # (a row read from the database has its id)
    where = ", ".join(str(trackers.tensorboard_dir / study) if n == "tensorboard" else trackers.mlflow_uri
                      for n in names)
    return len(done), where, trackers.failed
