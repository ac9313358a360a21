"""Run a study that `planning` planned: claim trials one by one and run each (pretrain -> evaluate -> record).
A trial's pretraining is keyed by its pretrain hash, so trials that differ only in evaluation settings share one
checkpoint; a file lock serializes two processes that reach the same pretraining at once.
"""
from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.engine import Engine

from mae_lab.data import DatasetInfo
from mae_lab.run.inits import check_inits, init_source
from mae_lab.run.progress import Display, PlainDisplay
from mae_lab.run.provenance import code_version, provenance
from mae_lab.run.resume import check_checkpoints, file_lock, verified_checkpoint
from mae_lab.run.tracking import NO_LOG, STEP_STAGE, Trackers, TrialLog, trackers_for
from mae_lab.store.engine import artifacts_dir, connect
from mae_lab.store.outage import DbFull, DbUnavailable, outage_limit_s
from mae_lab.store.queue import Claim, Heartbeat, LostClaim, claim_next, claim_of, has_runnable
from mae_lab.store.reads import find_done, get_checkpoint, study_name, study_trials, trial_details
from mae_lab.store.states import HEARTBEAT_S, STALE_AFTER_S
from mae_lab.store.tables import StudyRow, TrialRow
from mae_lab.store.writes import (
    adopt_result,
    clear_metrics,
    finish_trial,
    record_checkpoint,
    record_metrics,
    reset_trials,
    set_provenance,
    sync_study,
)
from mae_lab.store.writes import record_artifacts as record_result_artifacts
from mae_lab.study import planning, rounds
from mae_lab.study.expand import mae_config
from mae_lab.study.identity import pretrain_identity
from mae_lab.study.spec import StudyError, TrialSpec
from mae_lab.train.checkpoint import sha256_file
from mae_lab.train.common import DivergenceError
from mae_lab.train.finetune import finetune
from mae_lab.train.model import count_params, encoder_flops_per_image
from mae_lab.train.pretrain import pretrain
from mae_lab.train.probe import linear_probe
from mae_lab.train.probe_surface import STAGE as SURFACE
from mae_lab.train.probe_surface import probe_surface
from mae_lab.train.recon import save_trial_recon
from mae_lab.train.weights import init_model

OOM_HINT = "CUDA out of memory: lower pretrain.batch_size and raise pretrain.accum_iter to keep the effective batch\n"


class Pruned(Exception):
    """Raised by an ``on_pretrain_metrics`` callback to stop a trial early (a search's pruner said so)."""

    def __init__(self, epoch: int, reason: str):
        self.epoch = epoch
        super().__init__(reason)


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0  # already done before this run
    copied: int = 0  # done in another study before: the result copied (adopt_result)
    ran: list[tuple[str, str]] = field(default_factory=list)  # (hash, final status)

    def count(self, status: str) -> int:
        return sum(1 for _, s in self.ran if s == status)

    @property
    def ok(self) -> bool:
        return all(s == "done" for _, s in self.ran)


def run_trial(engine: Engine, row: TrialRow, info: DatasetInfo, *, device: str, artifacts: Path,
              display: Display, on_pretrain_metrics: Callable[[dict[str, Any]], None] | None = None,
              heartbeat_s: float = HEARTBEAT_S, dist_ctx: Any = None, data_root: str | None = None,
              trackers: Trackers | None = None, study: str = "") -> str:
    """Pretrain (or resume / reuse), probe, fine-tune and record one claimed trial; return its final status.

    ``on_pretrain_metrics`` sees every pretraining epoch's metrics after they are recorded (``knn_top1`` every
    ``pretrain.probe_every`` epochs, on the validation split); raising ``Pruned`` there closes the trial as
    "pruned" with what it has. A background thread writes the trial's heartbeat and progress every
    ``heartbeat_s``. Every write is fenced by the claim in ``row``: a worker whose trial was taken over stops
    with "lost" (and says so). The result is recorded before the artifacts (FLOPs, reconstructions): an artifact
    failure is noted in ``artifact_error`` and the trial stays done with its numbers.
    ``dist_ctx`` (a ``distributed.DistContext``, this being rank 0): the other ranks pretrain alongside.
    ``trackers``: live views of the trial (``tracking.py``), fed from what is recorded; ``study`` names it there.
    """
    claim = claim_of(row)
    status, log = None, NO_LOG  # status None: the views read it from the database (an exception ended the trial)
    with Heartbeat(engine, claim, heartbeat_s) as beat:
        try:
            if trackers is not None:
                log = trackers.open(engine, study, row, commit=code_version()[0], claim=claim)
            status = _run_trial(engine, row, claim, beat, info, device=device, artifacts=artifacts, display=display,
                                on_pretrain_metrics=on_pretrain_metrics, dist_ctx=dist_ctx, data_root=data_root,
                                log=log)
            if status == "failed" and torch.cuda.is_available():
                torch.cuda.empty_cache()  # the failed trial's tensors are gone with its traceback: free their cache
            return status
        except LostClaim as exc:
            display.message(f"  {exc}")
            status = "lost"  # another worker goes on with the trial and its views
            if dist_ctx is not None:
                raise
            return status
        finally:
            log.close(engine, claim.trial_id, status)


@dataclass
class _TrialViews:
    """Where a running trial's numbers go: the database (each write fenced by the claim), then the live views, the
    heartbeat's progress and the display. ``last``: the latest pretraining metrics, for a pruned trial's result."""
    engine: Engine
    row: TrialRow
    claim: Claim
    beat: Heartbeat
    log: TrialLog
    display: Display
    spec: TrialSpec
    ckpt: Path
    on_pretrain_metrics: Callable[[dict[str, Any]], None] | None
    last: dict[str, Any] = field(default_factory=dict)

    def record(self, stage: str, epoch: int, values: dict[str, Any]) -> None:  # the database, then the live views
        record_metrics(self.engine, self.row.id, stage, epoch, values, claim=self.claim)
        self.log.metrics(stage, epoch, values)

    def note(self, progress: str) -> None:  # what the heartbeat shows; a claim lost meanwhile stops the trial here
        self.beat.progress = progress
        self.beat.check()

    def on_step(self, stage: str, step: int) -> None:
        self.note(f"{stage} step {step}")

    def pretrain_epoch(self, m: dict[str, Any]) -> None:
        epochs = self.spec.pretrain.epochs
        surface = m.pop(SURFACE, None)  # {"block{b}": top-1} every pretrain.probe_every epochs
        if surface:
            self.record(SURFACE, m["epoch"], surface)
        if m.get("ckpt_sha256"):
            record_checkpoint(self.engine, self.row.pretrain_hash, str(self.ckpt), m["ckpt_sha256"], m["epoch"],
                              claim=self.claim)
        self.record("pretrain", m["epoch"], {k: v for k, v in m.items() if k not in ("epoch", "ckpt_sha256")
                                             and v is not None})
        self.beat.progress = f"pretrain epoch {m['epoch']}/{epochs}"
        self.display.epoch("pretrain", m["epoch"], epochs, m)
        self.last.update({k: v for k, v in m.items() if v is not None})
        if self.on_pretrain_metrics is not None:
            self.on_pretrain_metrics(m)

    def eval_epoch(self, stage: str, total: int, m: dict[str, Any]) -> None:
        self.record(stage, m["epoch"], {k: v for k, v in m.items() if k != "epoch" and v is not None})
        self.beat.progress = f"{stage} epoch {m['epoch']}/{total}"
        self.display.epoch(stage, m["epoch"], total, m)


def _run_trial(engine: Engine, row: TrialRow, claim: Claim, beat: Heartbeat, info: DatasetInfo, *,
               device: str, artifacts: Path, display: Display,
               on_pretrain_metrics: Callable[[dict[str, Any]], None] | None, dist_ctx: Any,
               data_root: str | None, log: TrialLog) -> str:
    spec = TrialSpec.model_validate_json(row.spec_json)
    world_size = dist_ctx.world_size if dist_ctx is not None else 1
    ctx = planning.run_context(spec, info, device, world_size)
    set_provenance(engine, row.id, claim=claim, **provenance(device, ctx, data_root, log.mlflow_run_id))
    ckpt = artifacts / "pretrain" / f"{row.pretrain_hash}.pt"
    views = _TrialViews(engine, row, claim, beat, log, display, spec, ckpt, on_pretrain_metrics)
    together = False  # under DDP: the other ranks are inside this trial's pretraining (its collectives) with us
    try:
        display.stage("pretrain", spec.pretrain.epochs)
        with file_lock(ckpt.with_suffix(".lock")):
            verified_checkpoint(engine, row.pretrain_hash, ckpt, display)
            done_before = get_checkpoint(engine, row.pretrain_hash)
            reused = ckpt.exists() and done_before is not None and done_before.epoch >= spec.pretrain.epochs > 0
            if ckpt.exists() and done_before is not None:
                set_provenance(engine, row.id, claim=claim, resumed_from_epoch=done_before.epoch)
            if dist_ctx is not None:
                together = True
                dist_ctx.announce({"spec_json": row.spec_json, "info": info, "identity": pretrain_identity(spec, ctx),
                                   "ckpt": str(ckpt) if spec.pretrain.epochs else None})
            start = (init_model(spec, init_source(spec, engine))  # DDP copies rank 0's weights
                     if spec.pretrain.init else None)
            pre = pretrain(spec, info, device=device, ckpt_path=ckpt if spec.pretrain.epochs else None,
                           resume=True, on_epoch=views.pretrain_epoch, world_size=world_size, model=start,
                           identity=pretrain_identity(spec, ctx), on_step=functools.partial(views.on_step, "pretrain"),
                           control_group=dist_ctx.control if dist_ctx is not None else None,
                           on_log=functools.partial(views.record, STEP_STAGE) if log.active else None,
                           log_every=log.every)
            together = False  # the other ranks wait for the next message again: a failure from here leaves them
        for epoch, loss in enumerate(pre.loss_history, start=1):  # epochs run before a resume, or shared
            views.record("pretrain", epoch, {"loss": loss})
        result: dict[str, Any] = {"pretrain_loss": pre.final_loss, "pretrain_wall_s": pre.wall_s,
                                  "pretrain_images_per_s": pre.images_per_s,
                                  "pretrain_peak_mem_mib": pre.peak_mem_mib, "pretrain_reused": reused}
        model = pre.model
        result.update(_evaluate(views, model, info, device, pre.epochs))
        if "knn_top1" in views.last:
            result["knn_top1"] = views.last["knn_top1"]
        arts = {"checkpoint": (str(ckpt), sha256_file(ckpt))} if ckpt.exists() else {}
        finish_trial(engine, row.id, "done", result=result, artifacts=arts, claim=claim)
    except Pruned as exc:
        last = views.last
        finish_trial(engine, row.id, "pruned", error=str(exc), claim=claim,
                     result={"pretrain_loss": last.get("loss"), "knn_top1": last.get("knn_top1"),
                             "pretrain_wall_s": last.get("wall_s")})
        return "pruned"
    except DivergenceError as exc:
        finish_trial(engine, row.id, "diverged", error=str(exc), claim=claim)
        return "diverged"
    except (LostClaim, DbUnavailable, DbFull):  # nothing more may be written: a successor's trial, no server, no room
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the command line raises it as one, with its message)
        finish_trial(engine, row.id, "interrupted", error=str(exc) or "interrupted by the user (Ctrl-C)",
                     claim=claim)
        raise
    except Exception as exc:  # noqa: BLE001 - a failing trial is recorded and the study goes on
        hint = OOM_HINT if isinstance(exc, torch.cuda.OutOfMemoryError) else ""
        finish_trial(engine, row.id, "failed", error=hint + traceback.format_exc(), claim=claim)
        if together:
            raise  # the other ranks may be stuck in a collective of this trial: end the run (torchrun stops them)
        return "failed"
    record_artifacts(engine, row, spec, model, info, artifacts)
    return "done"


def _evaluate(views: _TrialViews, model: Any, info: DatasetInfo, device: str, pre_epochs: int) -> dict[str, Any]:
    """The linear probe and fine-tuning, as the spec enables each (its earlier metrics cleared first); their
    result fields. With ``eval.linear.blocks``, the probe surface at the last pretraining epoch."""
    spec, lin, ft = views.spec, views.spec.eval.linear, views.spec.eval.finetune
    result: dict[str, Any] = {}
    if lin.enabled:
        result.update(_eval_stage(views, "linear", linear_probe, lin.epochs, model, info, device))
        if lin.blocks:  # the probe surface at the last epoch (one forward pass for every block)
            views.record(SURFACE, pre_epochs, probe_surface(spec, model, info, device))
    if ft.enabled:
        result.update(_eval_stage(views, "finetune", finetune, ft.epochs, model, info, device))
    return result


def _eval_stage(views: _TrialViews, stage: str, evaluate: Callable[..., dict], epochs: int, model: Any,
                info: DatasetInfo, device: Any) -> dict[str, Any]:
    """One evaluation stage (its earlier metrics cleared first): its result fields ``{stage}_top1`` and so on."""
    clear_metrics(views.engine, views.row.id, stage, claim=views.claim)
    views.display.stage(stage, epochs)
    out = evaluate(views.spec, model, info, device=device,
                   on_epoch=functools.partial(views.eval_epoch, stage, epochs), on_progress=views.note)
    return {f"{stage}_top1": out["top1"], f"{stage}_test_top1": out["test_top1"], f"{stage}_wall_s": out["wall_s"]}


def record_artifacts(engine: Engine, row: TrialRow, spec: TrialSpec, model: Any, info: DatasetInfo,
                     artifacts: Path) -> None:
    """After a done trial's result: encoder FLOPs and parameter counts, and its reconstruction PNG. A failure here
    is recorded in the result's ``artifact_error``; the trial stays done with its numbers."""
    update: dict[str, Any] = {}
    arts: dict[str, tuple[str, str]] = {}
    try:
        update.update(encoder_gflops=encoder_flops_per_image(mae_config(spec)), total_params=count_params(model),
                      encoder_params=sum(v.numel() for v in model.encoder_state_dict().values()))
        recon_png = artifacts / "recon" / f"{row.hash}.png"
        arts["recon"] = (str(recon_png), save_trial_recon(model, spec, info, recon_png))
    except Exception as exc:  # noqa: BLE001 - the result is already recorded; say what is missing
        update["artifact_error"] = f"{type(exc).__name__}: {exc}"
    record_result_artifacts(engine, row.id, arts, update)


def _summary_line(engine: Engine, row: TrialRow, status: str) -> str:
    _, result, _ = trial_details(engine, row.id)
    if status != "done" or result is None:
        return f"  {row.hash[:8]} {row.label}: {status}"
    parts = [f"{row.hash[:8]} {row.label}: done"]
    if result.linear_top1 is not None:
        parts.append(f"linear {100 * result.linear_top1:.1f}%")
    if result.finetune_top1 is not None:
        parts.append(f"finetune {100 * result.finetune_top1:.1f}%")
    parts.append(f"pretrain {result.pretrain_wall_s:.0f}s" + (" (shared)" if result.pretrain_reused else ""))
    return "  " + ", ".join(parts)


def run_study(path: str | Path, *, db_url: str | None = None, device: str = "auto", data_root: str | None = None,
              artifacts: str | Path | None = None, data_override: dict[str, str] | None = None, rerun: bool = False,
              max_trials: int | None = None, allow_pipe: bool = False, display: Display | None = None,
              stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
              wait: bool = False, poll_s: float = 10.0, dist_ctx: Any = None,
              allow_large_grid: bool = False, max_rounds: int | None = None, log: str | None = None) -> RunSummary:
    """Validate ``path`` fully, record its trials, then run every trial not done yet.

    The trials table is the queue: each trial is claimed in one transaction, so any number of processes (``mae-lab
    run`` or ``mae-lab worker``, on one machine with SQLite or on many with PostgreSQL) drain a study together and
    run each trial once. A running trial whose worker is dead on this host, or whose heartbeat is older than
    ``stale_after_s``, is claimed again and resumes from its checkpoint. With ``wait`` (a worker), the loop does
    not end while other workers still run trials: it polls every ``poll_s`` and takes over any that go stale.
    ``max_rounds`` (adaptive seeds): run at most this many rounds, and end rather than wait for another process's
    last trials of a round; a later call goes on (``make results`` runs the studies breadth-first so).
    ``dist_ctx``: this is rank 0 of a DistributedDataParallel run (``distributed.run_study_ddp``).
    ``log``: ``"tensorboard,mlflow"``, the live views, instead of the study's ``[log] trackers``.
    """
    display = display or PlainDisplay()
    study, planned = planning.plan(path, data_override, allow_large_grid)
    if study.search is not None:
        raise StudyError(study.path, "search", "this study is a search: run it with 'mae-lab search'")
    infos = planning.resolve_data(study, planned, data_root, allow_pipe)
    device = planning.pick_device(device)
    world_size = dist_ctx.world_size if dist_ctx is not None else 1

    bind_run = planning.binder(infos, device, world_size)
    trials = [bind_run(t) for t in planned]  # the hashes under this run's context: what the database records
    check_inits(study, trials, db_url)  # a bad pretrain.init ends here, before anything is written
    artifacts = Path(artifacts or artifacts_dir(db_url)).resolve()
    check_checkpoints(study, trials, infos, device, world_size, artifacts)  # likewise a checkpoint to resume
    trackers = trackers_for(study, log, db_url=db_url, artifacts=artifacts, warn=display.message)  # and a view
    outage_limit_s()  # a bad MAE_LAB_DB_OUTAGE_S ends here, before the database is opened
    engine = connect(db_url)
    s = study.study
    summary, todo, rounds_run = RunSummary(), 0, 0
    tried: set[int] = set()  # trial ids this process claimed
    synced: set[str] = set()  # trial hashes written to the database
    row: StudyRow | None = None  # the study's row, synced in the first round (when synced is still empty)
    while True:  # rounds: one, unless the seeds are adaptive (rounds.py recomputes the next round from the DB)
        if s.adaptive is not None and (synced or not rerun):
            trials = rounds.current_trials(engine, study, trials, bind=bind_run,
                                           trusted=lambda h: not rerun or h in synced)
        new = [t for t in trials if t.hash not in synced]
        if synced and not new:
            assert row is not None  # synced is not empty: the first round synced the row
            if max_rounds is not None or not any(t.status == "running" for t, _ in study_trials(engine, row.id)):
                break  # with max_rounds, another process's last trials are not waited for: a later call goes on
            time.sleep(poll_s)  # another process runs this round's last trials: their results decide the next
        else:
            row = sync_study(engine, name=s.name, description=s.description, paper=s.paper, path=str(path),
                                spec_text=study.text, spec_hash=planning.study_hash(study),
                                trials=planning.trial_rows(study, trials))
            if rerun:
                for ckpt in reset_trials(engine, row.id, [t.hash for t in new]):
                    Path(ckpt.path).unlink(missing_ok=True)
            synced.update(t.hash for t in new)
            status = {t.hash: t.status for t, _ in study_trials(engine, row.id)}
            done = sum(1 for t in new if status.get(t.hash) == "done")
            summary.total, summary.skipped, todo = len(trials), summary.skipped + done, todo + len(new) - done
            display.message(f"study {s.name}: {len(trials)} trials, {summary.skipped} done, {todo - len(summary.ran)}"
                            f" to run on {device}" + (" (adaptive seeds: next round)" if len(synced) > len(new)
                                                      else ""))
        assert row is not None  # synced now, or in an earlier round
        by_hash = {t.hash: t for t in trials}
        waiting = False
        while max_trials is None or len(summary.ran) < max_trials:
            claimed = claim_next(engine, row.id, skip=tried, stale_after_s=stale_after_s)
            if claimed is None and has_runnable(engine, row.id, stale_after_s=stale_after_s, skip=tried):
                time.sleep(0.05)  # another worker's claim held the row we reached for: look again, never exit
                continue
            if claimed is None:
                busy = [t for t, _ in study_trials(engine, row.id) if t.status == "running" and t.hash in by_hash]
                if not wait or not busy:
                    break
                if not waiting:
                    display.message(f"waiting for {len(busy)} trial(s) running on other workers "
                                    f"(taken over if a worker dies, or its heartbeat or progress stops for "
                                    f"{stale_after_s:.0f}s)")
                waiting = True
                time.sleep(poll_s)
                continue
            waiting = False
            tried.add(claimed.id)
            found = None if rerun else find_done(engine, claimed.hash)
            if found is not None:  # the same trial (spec hash) is done in another study: its result serves here
                claim = claim_of(claimed)
                adopt_result(engine, claim.trial_id, found[1], claim=claim)
                summary.copied, todo = summary.copied + 1, todo - 1
                display.message(f"trial {claimed.hash[:8]} {claimed.label}: done before in study "
                                f"{study_name(engine, found[0].study_id)!r}; its result is copied, nothing runs")
                continue
            trial = by_hash.get(claimed.hash)  # None: another process added the next round (adaptive seeds) first
            spec = trial.spec if trial is not None else TrialSpec.model_validate_json(claimed.spec_json)
            display.trial_start(len(summary.ran) + 1, todo, claimed.label, claimed.hash)
            result = run_trial(engine, claimed, infos[spec.data.model_dump_json()], device=device,
                               artifacts=artifacts, display=display, heartbeat_s=heartbeat_s, dist_ctx=dist_ctx,
                               data_root=data_root, trackers=trackers, study=s.name)
            summary.ran.append((claimed.hash, result))
            display.trial_end(_summary_line(engine, claimed, result))
        rounds_run += 1
        if s.adaptive is None or (max_trials is not None and len(summary.ran) >= max_trials) \
                or (max_rounds is not None and rounds_run >= max_rounds):
            break
    return summary
