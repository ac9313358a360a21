"""Per-trial data: every trial of a study as one flat record, from the database or from a committed trials.csv.

The report model (``report.summarize_records``) is built from these records only, so ``mae-lab report --from
docs/results/trials.csv`` regenerates every page and plot without the database. A record holds the study it
belongs to (name, description, paper table, study TOML), the trial's identity (hash, pretrain hash, seed, axes,
resolved spec), every metric with its split in the column name, times, the pretraining loss per epoch, the linear
probe of the last block at each probed epoch (``linear_epochs``: [[epoch, val top-1], ...], from the ``probe_surface``
metrics that ``pretrain.probe_every`` with ``eval.linear.blocks`` records; the trial's own, so a trial that reused
another's pretraining has only its last epoch), and provenance. Floats are written with ``repr`` (CSV) or as JSON
numbers, so they read back bit for bit.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from mae_lab.errors import BadInput
from mae_lab.store.reads import get_study, pretraining_results, study_trials, trial_details
from mae_lab.store.tables import RUN_PROVENANCE

# column -> (type, where it comes from). Types: str, int, float, bool, json; "" in a CSV cell is None.
STUDY_COLUMNS = {"study": "str", "study_description": "str", "study_paper": "str", "study_toml": "str"}
TRIAL_COLUMNS = {"position": "int", "hash": "str", "pretrain_hash": "str", "seed": "int", "label": "str",
                 "axes": "json", "spec": "json", "status": "str"}
# result columns: the database name -> the published name, which says the split of every accuracy
METRIC_COLUMNS = {"linear_top1": "linear_val_top1", "finetune_top1": "finetune_val_top1",
                  "linear_test_top1": "linear_test_top1", "finetune_test_top1": "finetune_test_top1",
                  "knn_top1": "knn_val_top1", "pretrain_loss": "pretrain_loss",
                  "pretrain_wall_s": "pretrain_wall_s", "pretrain_images_per_s": "pretrain_images_per_s",
                  "pretrain_peak_mem_mib": "pretrain_peak_mem_mib", "linear_wall_s": "linear_wall_s",
                  "finetune_wall_s": "finetune_wall_s", "encoder_gflops": "encoder_gflops",
                  "encoder_params": "encoder_params", "total_params": "total_params"}
RESULT_COLUMNS = {**{v: "float" for v in METRIC_COLUMNS.values()}, "pretrain_reused": "bool",
                  # the numbers are a copy of a done trial's with the same spec hash (another study's): nothing ran
                  "result_copied": "bool",
                  # a shared pretraining is timed by the trial that ran it (of any study): these hold its figures
                  "timed_pretrain_wall_s": "float", "timed_pretrain_images_per_s": "float",
                  "timed_pretrain_peak_mem_mib": "float", "pretrain_losses": "json", "linear_epochs": "json"}
# how each trial ran (tables.RUN_PROVENANCE), less data_root, slurm_job and mlflow_run_id: a path and a job ID of the
# cluster that ran it, and a key into a tracking store, not a record
PROVENANCE = ("attempts", "started_at", "ended_at",
              *(k for k in RUN_PROVENANCE if k not in ("data_root", "slurm_job", "mlflow_run_id")),
              "resumed_from_epoch")
PROVENANCE_COLUMNS = {k: "str" for k in PROVENANCE}
COLUMNS = {**STUDY_COLUMNS, **TRIAL_COLUMNS, **RESULT_COLUMNS, **PROVENANCE_COLUMNS}
OPTIONAL = ("linear_epochs",)  # columns a trials.csv written before them may lack (read as empty)
SURFACE = "probe_surface"  # the stage of the per-epoch probes (train/probe_surface.py, which imports torch)
SPLITS = {"linear_val_top1": "val", "finetune_val_top1": "val", "linear_test_top1": "test",
          "finetune_test_top1": "test", "knn_val_top1": "val"}


class RecordsError(BadInput, ValueError):
    """A trials file that cannot be read: ``str()`` is one line naming the file and the column."""


@dataclass(frozen=True)
class StudyRecords:
    """One study and its trials (records in the study's expansion order)."""

    name: str
    description: str
    paper: str | None
    toml: str
    trials: list[dict[str, Any]]


def _provenance(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _canonical(value: Any, column: str) -> str:
    """JSON text of a json column: keys sorted, except a point's axes (their order is the study's)."""
    return json.dumps(value, sort_keys=column != "axes", separators=(",", ":"))


def _typed(value: Any, kind: str, column: str) -> Any:
    """A value as its column's type, so that records from the database equal those read back from a file."""
    if value is None or kind in ("str", "bool"):
        return value
    if kind == "json":
        return json.loads(_canonical(value, column))
    return float(value) if kind == "float" else int(value)


def from_db(engine: Engine, name: str) -> StudyRecords:
    """The records of a study's active trials (BadInput for an unknown study)."""
    study = get_study(engine, name)
    if study is None:
        raise BadInput(f"no study named {name!r} in the database")
    trials = study_trials(engine, study.id)
    reused = {t.pretrain_hash for t, r in trials if t.status == "done" and r is not None and r.pretrain_reused}
    ran = pretraining_results(engine, reused) if reused else {}
    out = []
    for pos, (t, r) in enumerate(trials):
        rec: dict[str, Any] = {"position": pos, "hash": t.hash, "pretrain_hash": t.pretrain_hash, "seed": t.seed,
                               "label": t.label, "axes": json.loads(t.axes_json), "spec": json.loads(t.spec_json),
                               "status": t.status}
        for col, pub in METRIC_COLUMNS.items():
            rec[pub] = None if r is None else getattr(r, col, None)
        rec["pretrain_reused"] = None if r is None else bool(r.pretrain_reused)
        rec["result_copied"] = None if r is None else bool(r.result_copied)
        timed = None if r is None else (ran.get(t.pretrain_hash) if r.pretrain_reused else r)
        for col in ("pretrain_wall_s", "pretrain_images_per_s", "pretrain_peak_mem_mib"):
            rec[f"timed_{col}"] = None if timed is None else getattr(timed, col)
        metrics, _, _ = trial_details(engine, t.id)
        losses = sorted((m.epoch, m.value) for m in metrics if m.stage == "pretrain" and m.name == "loss")
        rec["pretrain_losses"] = [v for _, v in losses]
        last_block = f"block{rec['spec']['model']['depth']}"
        probes = sorted((m.epoch, m.value) for m in metrics if m.stage == SURFACE and m.name == last_block)
        rec["linear_epochs"] = [[e, v] for e, v in probes] or None
        for k in PROVENANCE:
            rec[k] = _provenance(getattr(t, k, None))
        out.append({c: _typed(rec[c], kind, c) for c, kind in COLUMNS.items() if c not in STUDY_COLUMNS})
    return StudyRecords(study.name, study.description, study.paper, study.spec_text, out)


# --- files ----------------------------------------------------------------------------------------------------

def _cell(value: Any, kind: str, column: str) -> str:
    if value is None:
        return ""
    if kind == "json":
        return _canonical(value, column)
    if kind == "float":
        return repr(float(value))
    return str(value)


def to_csv(studies: list[StudyRecords]) -> str:
    """One line per trial, every column of COLUMNS (study columns repeated on each of its trials)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(COLUMNS))
    for s in studies:
        head = {"study": s.name, "study_description": s.description, "study_paper": s.paper, "study_toml": s.toml}
        for rec in s.trials:
            full = {**head, **rec}
            w.writerow([_cell(full.get(c), kind, c) for c, kind in COLUMNS.items()])
    return buf.getvalue()


def to_json(studies: list[StudyRecords]) -> str:
    """The same records grouped by study, with the split of every accuracy column."""
    return json.dumps({"splits": SPLITS, "units": "top-1 as a fraction; times in seconds; GFLOPs per image",
                       "studies": [{"name": s.name, "description": s.description, "paper": s.paper,
                                    "toml": s.toml, "trials": s.trials} for s in studies]},
                      indent=1, sort_keys=False) + "\n"


def _parse(text: str, kind: str, where: str) -> Any:
    if text == "":
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text not in ("True", "False"):
                raise ValueError(f"expected True or False, got {text!r}")
            return text == "True"
        if kind == "json":
            return json.loads(text)
    except ValueError as exc:
        raise RecordsError(f"{where}: {exc}") from None
    return text


def read_csv(path: str | Path) -> list[StudyRecords]:
    """Studies from a trials.csv written by ``to_csv``; RecordsError names the file and a missing or bad column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{p}: cannot read the trials file ({exc.__class__.__name__}: {exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c not in OPTIONAL]
    if missing:
        raise RecordsError(f"{p}: missing column {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                   if len(missing) > 1 else ""))
    studies: dict[str, StudyRecords] = {}
    for line, row in enumerate(reader, start=2):
        full = {c: _parse(row.get(c) or "", kind, f"{p}: line {line}: column {c!r}") for c, kind in COLUMNS.items()}
        if not full["study"]:
            raise RecordsError(f"{p}: line {line}: column 'study' is empty")
        s = studies.setdefault(full["study"], StudyRecords(full["study"], full["study_description"] or "",
                                                           full["study_paper"], full["study_toml"] or "", []))
        s.trials.append({c: full[c] for c in COLUMNS if c not in STUDY_COLUMNS})
    if not studies:
        raise RecordsError(f"{p}: no trials")
    return list(studies.values())
