"""A trial's identity: a hash of what determines its numbers, computed once, under the context it runs in.

Expansion (``expand``) yields ``Trial``s, which have no hash: what a trial hashes to depends on the data's content,
the process count and the resolved precision (``RunContext``, from ``planning.run_context``). ``bind`` gives a trial
its hashes under such a context, as a ``BoundTrial``, the only kind of trial the database records; it refuses a
context whose precision is unresolved, so a hash of the spec as written ("unbound") cannot reach the database.
``hashes`` is the one function that hashes: the trial's identity, and from the same canonical form its pretraining's
(the checkpoint key, shared by trials that differ only in evaluation).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mae_lab.study.expand import Trial
from mae_lab.study.spec import TrialSpec

# Identity: what determines a trial's numbers. Execution choices are provenance, left out of every hash; the loaders
# and the RNG streams (rng.py) make them unable to change the numbers.
EXECUTION = ("data.num_workers", "data.in_memory", "pretrain.compile")
# A field added after identities were first stored leaves the hash alone at the value that means "as before": list it
# here with that value when you add it (tests/test_identity.py fails for a field that is in neither list).
HASH_NEUTRAL: dict[str, Any] = {
    "data.val_holdout": None,
    "data.val_seed": 0,
    "data.label_key": "label",
    "data.pretrain_dataset": None,
    "data.pretrain_shards": None,
    "pretrain.init": None,
    "pretrain.init_sha256": None,
    "eval.linear.blocks": [],
    "eval.finetune.img_size": None,
}
DATA_LOCATION = ("data.dataset", "data.train", "data.val", "data.pretrain_dataset", "data.pretrain_shards")
PRETRAIN_SECTIONS = ("seed", "data", "model", "pretrain")


@dataclass(frozen=True)
class RunContext:
    """What a trial's identity needs from how it runs: the data's content, the process count, the precision.
    ``RunContext()`` is the spec as written: what comparing two specs or a standalone checkpoint needs, never a
    hash the database records (``bind`` refuses it)."""

    fingerprint: str | None = None  # DatasetInfo.fingerprint; None: the data as the spec names it
    world_size: int = 1  # processes at pretrain.batch_size each: the global batch is what counts
    precision: str | None = None  # "bf16" or "fp32", resolved for the device; None: pretrain.amp as written


@dataclass(frozen=True)
class BoundTrial(Trial):
    """A trial with its hashes under the context it runs in (made by ``bind``): what the database records."""

    hash: str  # identity of the whole trial
    pretrain_hash: str  # identity of its pretraining (shared by trials that differ only in evaluation)


def identity(spec: TrialSpec, ctx: RunContext = RunContext()) -> dict[str, Any]:
    """The canonical dotted-key form of what determines ``spec``'s numbers under ``ctx``.

    Left out: execution choices (EXECUTION) and HASH_NEUTRAL fields at their neutral value. Replaced: the data's
    name and shard patterns by its fingerprint (when known), ``pretrain.batch_size`` by the global batch
    ``pretrain.global_batch`` (batch x accum x world size; ``accum_iter`` stays), ``pretrain.amp`` by the resolved
    ``pretrain.precision`` (when known).
    """
    flat = _flatten(spec.model_dump(mode="json"))
    for key in EXECUTION:
        flat.pop(key, None)
    for key, neutral in HASH_NEUTRAL.items():
        if key in flat and flat[key] == neutral:
            del flat[key]
    if ctx.fingerprint is not None:  # the content, not its name or folder
        for key in DATA_LOCATION:
            flat.pop(key, None)
        flat["data.fingerprint"] = ctx.fingerprint
    if flat.get("pretrain.init_sha256") is not None:  # the init's content, not where it was read from
        flat.pop("pretrain.init", None)
    pt = spec.pretrain
    del flat["pretrain.batch_size"]
    flat["pretrain.global_batch"] = pt.batch_size * pt.accum_iter * ctx.world_size
    if ctx.precision is not None:
        del flat["pretrain.amp"]
        flat["pretrain.precision"] = ctx.precision
    return flat


def pretrain_identity(spec: TrialSpec, ctx: RunContext = RunContext()) -> dict[str, Any]:
    """The part of ``identity`` that determines pretraining: seed, data, model, pretrain (not eval); a checkpoint
    stores it, and a resume must match it."""
    return _pretrain_part(identity(spec, ctx))


def hashes(spec: TrialSpec, ctx: RunContext) -> tuple[str, str]:
    """(trial hash, pretrain hash) of ``spec`` under ``ctx``: both from one ``identity``."""
    flat = identity(spec, ctx)
    return _digest(flat), _digest(_pretrain_part(flat))


def bind(trial: Trial, ctx: RunContext) -> BoundTrial:
    """``trial`` with the hashes it has under ``ctx`` (what the database records). ``ctx`` must be a run's
    (``planning.run_context``: precision resolved); the spec as written has no hash to record."""
    if ctx.precision is None:
        raise ValueError(f"trial {trial.label}: bound under a context with no resolved precision ({ctx}); "
                         "a recorded hash is the one it has under its run's context (planning.run_context)")
    return BoundTrial(trial.spec, trial.axes, *hashes(trial.spec, ctx))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _pretrain_part(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k.partition(".")[0] in PRETRAIN_SECTIONS}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if type(v) is dict:
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
