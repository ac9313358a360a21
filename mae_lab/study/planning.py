"""Planning a run, with no torch: load and expand a study, resolve and check its data, and give each trial the
hashes it has under this run's data, process count and precision. `mae-lab validate` and `run --dry-run` end here;
`runner` runs what this plans.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mae_lab.data import DataError, DatasetInfo, resolve_spec_data, verify_dataset
from mae_lab.errors import BadInput
from mae_lab.study.expand import Trial, expand
from mae_lab.study.identity import BoundTrial, RunContext, bind
from mae_lab.study.precision import pick_device, resolve_bf16
from mae_lab.study.spec import DataSpec, Study, StudyError, TrialSpec, load_study, set_dotted

__all__ = ["binder", "check_batches", "parse_data_override", "pick_device", "plan", "resolve_data",
           "run_context", "study_hash", "trial_rows"]


def parse_data_override(text: str | None) -> dict[str, str]:
    """``train=PATTERN,val=PATTERN`` or ``dataset=NAME`` -> a [data] override."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("dataset", "train", "val", "pretrain_dataset", "pretrain_shards"):
            raise BadInput(f"--data {text!r}: expected dataset=NAME or train=PATTERN,val=PATTERN (and optionally "
                           "pretrain_dataset=NAME or pretrain_shards=PATTERN)")
        out[key.strip()] = value.strip()
    return out


def plan(path: str | Path, data_override: dict[str, str] | None = None, allow_large_grid: bool = False
         ) -> tuple[Study, list[Trial]]:
    """Load, validate and expand a study file (raises StudyError; writes nothing)."""
    study = load_study(path, allow_large_grid=allow_large_grid)
    if data_override:
        data = dict(study.base.get("data", {}))
        if "train" in data_override or "val" in data_override:
            data.pop("dataset", None)
        data.update(data_override)
        study = study.model_copy(update={"base": set_dotted(study.base, "data", data)})
    return study, expand(study)


def validate_study(path: str | Path, data_root: str | None, allow_pipe: bool = False, allow_large_grid: bool = False,
                   data_override: dict[str, str] | None = None) -> int:
    """Check a study file (schema, presets, shapes, data) without running it; its number of trials."""
    study, trials = plan(path, data_override, allow_large_grid)
    resolve_data(study, trials, data_root, allow_pipe)
    return len(trials)


def resolve_data(study: Study, trials: list[Trial], data_root: str | None, allow_pipe: bool = False
                 ) -> dict[str, DatasetInfo]:
    """Resolve and verify every distinct [data] of the trials up front; a DataError names the study file and key.
    Labels are checked where some trial with that [data] probes or fine-tunes."""
    need_label: dict[str, bool] = {}
    for t in trials:
        key = t.spec.data.model_dump_json()
        need_label[key] = need_label.get(key, False) or t.spec.eval.linear.enabled or t.spec.eval.finetune.enabled
    infos: dict[str, DatasetInfo] = {}
    for t in trials:
        d: DataSpec = t.spec.data
        key = d.model_dump_json()
        if key in infos:
            continue
        try:
            info = resolve_spec_data(d, data_root=data_root, allow_pipe=allow_pipe)
            verify_dataset(info, need_label=need_label[key], label_key=d.label_key, allow_pipe=allow_pipe)
            infos[key] = info
        except DataError as exc:
            raise StudyError(study.path, exc.key, str(exc)) from None
    check_batches(study, trials, infos)
    return infos


def check_batches(study: Study, trials: list[Trial], infos: dict[str, DatasetInfo]) -> None:
    """Refuse a training batch the training split cannot fill once (pretraining and fine-tuning drop the last
    partial batch, so an epoch would have no step); the linear probe caps its batch at the split."""
    for t in trials:
        info, d, pt, ft = infos[t.spec.data.model_dump_json()], t.spec.data, t.spec.pretrain, t.spec.eval.finetune
        n = min(info.num_train, d.train_samples or info.num_train)
        where = f"{n} training samples" + (" (data.train_samples)" if n == d.train_samples else "")
        if pt.epochs and pt.batch_size * pt.accum_iter > n:
            key = next((f"grid.{k}" for k in ("pretrain.batch_size", "pretrain.accum_iter") if k in t.axes),
                       "pretrain.batch_size")
            raise StudyError(study.path, key, f"a batch of {pt.batch_size} x accum_iter {pt.accum_iter} is more "
                             f"than the {where}: an epoch would have no optimizer step")
        if ft.enabled and ft.batch_size > n:
            key = "grid." * ("eval.finetune.batch_size" in t.axes) + "eval.finetune.batch_size"
            raise StudyError(study.path, key, f"a batch of {ft.batch_size} is more than the {where}: "
                             "fine-tuning would have no step")


def study_hash(study: Study) -> str:
    return hashlib.sha256(study.text.encode()).hexdigest()[:16]


def run_context(spec: TrialSpec, info: DatasetInfo, device: str, world_size: int = 1) -> RunContext:
    """What the trial's identity takes from how it runs: the data's fingerprint, the process count, and the
    precision ``pretrain.amp`` resolves to on ``device``."""
    bf16 = resolve_bf16(spec.pretrain.amp, device.split(":")[0], spec.model.embed_dim)
    fingerprint = info.fingerprint
    if info.pretrain is not None:  # pretraining reads another dataset: both are the data's identity
        fingerprint = hashlib.sha256(f"{info.fingerprint}\n{info.pretrain.fingerprint}".encode()).hexdigest()
    return RunContext(fingerprint=fingerprint or None, world_size=world_size, precision="bf16" if bf16 else "fp32")


def binder(infos: dict[str, DatasetInfo], device: str, world_size: int = 1) -> Callable[[Trial], BoundTrial]:
    """Trial -> the trial with the hashes it has under this run's data, process count and precision (``run_context``):
    what the database records, a dry run prints, and adaptive rounds give their new trials."""
    return lambda t: bind(t, run_context(t.spec, infos[t.spec.data.model_dump_json()], device, world_size))


def trial_rows(study: Study, trials: list[BoundTrial]) -> list[dict[str, Any]]:
    """The rows the database records: bound trials only (an unbound ``Trial`` has no hash)."""
    return [{"hash": t.hash, "pretrain_hash": t.pretrain_hash, "seed": t.spec.seed, "label": t.label,
             "axes_json": json.dumps(t.axes), "spec_json": t.spec.model_dump_json()} for t in trials]
