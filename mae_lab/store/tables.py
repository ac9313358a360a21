"""The experiment database's tables (SQLModel) and the one list of provenance columns (statuses: store.states).

The trials table is the work queue (``store.queue``); every module reaches the tables through ``store.engine``
(connect, migrations, transactions), ``store.queue`` (claims, heartbeats, fenced writes), ``store.writes`` and
``store.reads``.

An ``id`` column is typed ``int``, not ``int | None``: the database assigns it on insert, and every row this package
hands out has been inserted (read back, or flushed by the write that made it). Only a row built and not yet added
holds None, and nothing passes such a row on. The column is the same either way (a primary key is never NULL).
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

SCHEMA_VERSION = 7


def now() -> datetime:
    return datetime.now(UTC)


def _since(version: int) -> Any:
    """A provenance column added by the migration to schema ``version`` (``engine.MIGRATIONS`` reads it)."""
    return Field(default=None, sa_column_kwargs={"info": {"since": version}})


class RunProvenance(SQLModel):
    """How the run that made a trial's result went; none of it changes the trial's identity. The one list of these
    columns: TrialRow inherits them, and the migrations that added them, ``run.provenance``, a copied result
    (``writes.adopt_result``), trials.csv (``records.PROVENANCE``) and ``mae-lab show`` read them from here."""

    host: str | None = _since(1)
    git_commit: str | None = _since(1)
    git_dirty: bool | None = _since(1)
    torch_version: str | None = _since(1)
    timm_version: str | None = _since(1)
    mae_lab_version: str | None = _since(3)
    device: str | None = _since(1)
    device_name: str | None = _since(3)  # e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    world_size: int | None = _since(3)  # processes that pretrained it
    cpu_threads: int | None = _since(4)  # torch's intra-op CPU threads per process: core-minutes = wall x this
    resolved_precision: str | None = _since(3)  # resolved pretraining precision: bf16 or fp32
    data_root: str | None = _since(3)  # where the data was read from
    data_fingerprint: str | None = _since(3)  # the data's identity, part of the hash
    slurm_job: str | None = _since(6)  # the SLURM array task (ARRAYJOB_TASK) or job that ran it
    mlflow_run_id: str | None = _since(7)  # its run in an MLflow view (run.tracking), continued when it resumes


RUN_PROVENANCE = tuple(RunProvenance.model_fields)


class Meta(SQLModel, table=True):
    __tablename__ = "mae_meta"
    key: str = Field(primary_key=True)
    value: str


class StudyRow(SQLModel, table=True):
    __tablename__ = "mae_studies"
    id: int = Field(default=None, primary_key=True)  # assigned on insert (module docstring)
    name: str = Field(index=True, unique=True)
    description: str = ""
    paper: str | None = None
    path: str = ""
    spec_text: str = Field(sa_column=Column(Text))
    spec_hash: str
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)


class TrialRow(RunProvenance, table=True):
    __tablename__ = "mae_trials"
    __table_args__ = (UniqueConstraint("study_id", "hash"),)
    id: int = Field(default=None, primary_key=True)  # assigned on insert (module docstring)
    study_id: int = Field(foreign_key="mae_studies.id", index=True)
    position: int = 0  # order in the study's expansion
    active: bool = True  # False once the study file no longer expands to this trial
    hash: str = Field(index=True)
    pretrain_hash: str = Field(index=True)
    seed: int
    label: str = ""
    axes_json: str = "{}"
    spec_json: str = Field(sa_column=Column(Text))
    status: str = Field(default="pending", index=True)
    attempts: int = 0
    worker: str | None = None  # host:node:pid of the process running it (workers.py); (worker, attempts): its claim
    heartbeat_at: datetime | None = None
    progress: str | None = None  # e.g. "pretrain step 120" (schema 3)
    progress_at: datetime | None = None  # when progress last changed: a hung worker stops advancing it (schema 3)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    optuna_trial: int | None = None
    resumed_from_epoch: int | None = None  # the pretraining checkpoint epoch this attempt started from

    @property
    def axes(self) -> dict[str, Any]:
        return json.loads(self.axes_json)


class MetricRow(SQLModel, table=True):
    __tablename__ = "mae_metrics"
    __table_args__ = (UniqueConstraint("trial_id", "stage", "epoch", "name"),)
    id: int = Field(default=None, primary_key=True)  # assigned on insert (module docstring)
    trial_id: int = Field(foreign_key="mae_trials.id", index=True)
    stage: str  # pretrain | linear | finetune
    epoch: int
    name: str
    value: float


class ResultRow(SQLModel, table=True):
    __tablename__ = "mae_results"
    id: int = Field(default=None, primary_key=True)  # assigned on insert (module docstring)
    trial_id: int = Field(foreign_key="mae_trials.id", unique=True)
    linear_top1: float | None = None  # the validation split (what search, pruning and probe_every read)
    finetune_top1: float | None = None  # the validation split
    linear_test_top1: float | None = None  # the test split; None without one (schema 3)
    finetune_test_top1: float | None = None  # the test split; None without one (schema 3)
    knn_top1: float | None = None
    pretrain_loss: float | None = None
    pretrain_wall_s: float | None = None
    pretrain_images_per_s: float | None = None
    pretrain_peak_mem_mib: float | None = None  # CUDA: peak allocated; CPU: the process's peak RSS (schema 2)
    linear_wall_s: float | None = None
    finetune_wall_s: float | None = None
    encoder_gflops: float | None = None  # per image, at the trial's mask ratio
    encoder_params: int | None = None
    total_params: int | None = None
    pretrain_reused: bool = False  # the pretraining was shared with another trial
    result_copied: bool | None = None  # a copy of a done trial's result (same spec hash): nothing ran (schema 5)
    artifact_error: str | None = Field(default=None, sa_column=Column(Text))  # FLOPs / recon failed after the result


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "mae_artifacts"
    __table_args__ = (UniqueConstraint("trial_id", "kind"),)
    id: int = Field(default=None, primary_key=True)  # assigned on insert (module docstring)
    trial_id: int = Field(foreign_key="mae_trials.id", index=True)
    kind: str  # checkpoint | recon
    path: str
    sha256: str


class CheckpointRow(SQLModel, table=True):
    """The pretraining checkpoint shared by every trial with the same pretrain hash."""

    __tablename__ = "mae_checkpoints"
    pretrain_hash: str = Field(primary_key=True)
    path: str
    sha256: str
    epoch: int
    updated_at: datetime = Field(default_factory=now)
