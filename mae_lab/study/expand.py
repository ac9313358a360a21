"""Study -> trial specs. A trial's identity is a hash of its canonical resolved spec."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mae_lab.study.init_check import FieldError, resolve_fields
from mae_lab.study.presets import PRESETS, MAEConfig, grid_k
from mae_lab.study.spec import Study, StudyError, TrialSpec, schedule_problem, set_dotted, validate_trial


@dataclass(frozen=True)
class Trial:
    """One expanded trial: its resolved spec, identity hashes, and the values of the study's axes."""

    spec: TrialSpec
    hash: str  # identity of the whole trial
    pretrain_hash: str  # identity of its pretraining (shared by trials that differ only in evaluation)
    axes: dict[str, Any]  # dotted key -> value, for this trial's grid point / case

    @property
    def label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()) or "default"


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
    """What a trial's identity needs from how it runs: the data's content, the process count, the precision."""

    fingerprint: str | None = None  # DatasetInfo.fingerprint; None: the data as the spec names it
    world_size: int = 1  # processes at pretrain.batch_size each: the global batch is what counts
    precision: str | None = None  # "bf16" or "fp32", resolved for the device; None: pretrain.amp as written


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if type(v) is dict:
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def trial_hash(spec: TrialSpec, ctx: RunContext = RunContext()) -> str:
    return _digest(identity(spec, ctx))


def pretrain_identity(spec: TrialSpec, ctx: RunContext = RunContext()) -> dict[str, Any]:
    """The part of ``identity`` that determines pretraining: seed, data, model, pretrain (not eval)."""
    return _pretrain_part(identity(spec, ctx))


def _pretrain_part(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k.partition(".")[0] in PRETRAIN_SECTIONS}


def hashes(spec: TrialSpec, ctx: RunContext = RunContext()) -> tuple[str, str]:
    """(trial_hash, pretrain_hash), from one identity: what expansion and binding compute for every trial."""
    return hashes_of(identity(spec, ctx))


_NOT_SEED = tuple(f for f in TrialSpec.model_fields if f != "seed")  # a trial's sections but its seed


def _per_seed(flat: dict[str, Any]) -> Callable[[int], tuple[str, str]]:
    """seed -> (trial hash, pretrain hash) of the identity ``flat`` with that seed (``hashes_of``, nothing else)."""
    return lambda seed: hashes_of({**flat, "seed": seed})


def hashes_of(flat: dict[str, Any]) -> tuple[str, str]:
    """(trial hash, pretrain hash) of an identity dict."""
    return _digest(flat), _digest(_pretrain_part(flat))


def bind_all(trials: Iterable[Trial], ctx_of: Callable[[TrialSpec], RunContext]) -> list[Trial]:
    """`bind` for many trials: each under ``ctx_of(its spec)``. The identity is computed once for a run of trials
    that share everything but the seed (expansion gives a point's seeds the same sections)."""
    out: list[Trial] = []
    last: tuple[tuple, RunContext, Callable[[int], tuple[str, str]]] | None = None
    for t in trials:
        ctx, sections = ctx_of(t.spec), tuple(getattr(t.spec, f) for f in _NOT_SEED)
        if last is None or last[1] != ctx or any(a is not b for a, b in zip(sections, last[0])):
            last = (sections, ctx, _per_seed(identity(t.spec, ctx)))
        h, ph = last[2](t.spec.seed)
        out.append(dataclasses.replace(t, hash=h, pretrain_hash=ph))
    return out


def pretrain_hash(spec: TrialSpec, ctx: RunContext = RunContext()) -> str:
    """Hash of the fields that affect pretraining (shared by trials that differ only in evaluation)."""
    return _digest(pretrain_identity(spec, ctx))


def bind(trial: Trial, ctx: RunContext) -> Trial:
    """``trial`` with the hashes it has under ``ctx`` (what the database records)."""
    h, ph = hashes(trial.spec, ctx)
    return dataclasses.replace(trial, hash=h, pretrain_hash=ph)


def mae_config(spec: TrialSpec) -> MAEConfig:
    return MAEConfig(**spec.model.model_dump(exclude={"preset"}))


@functools.cache
def _mae_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(MAEConfig)}


def resolve(study: Study, point: dict[str, Any], seed: int) -> TrialSpec:
    """Fill the model from its preset and check what depends on several fields, then the probed blocks, the fine-tune
    size and the init file (its sha256 into the spec); errors name the key."""
    spec = resolve_settings(study, point, seed)
    try:  # probed blocks, fine-tune size, and the init file's sha256 into the spec (issue 17)
        return resolve_fields(spec)
    except FieldError as exc:
        raise StudyError(study.path, f"grid.{exc.key}" if exc.key in point else exc.key, exc.reason) from None


def resolve_settings(study: Study, point: dict[str, Any], seed: int) -> TrialSpec:
    """``resolve`` without reading any file: the settings as written, the model filled from its preset and checked
    (what a report compares points against: a pure function of the study text)."""
    raw = set_dotted(study.base, "seed", seed)
    spec = validate_trial(study.path, raw, point)
    model = spec.model
    if model.preset not in PRESETS:
        key = "grid.model.preset" if "model.preset" in point else "model.preset"
        raise StudyError(study.path, key, f"unknown preset {model.preset!r} (valid: {', '.join(PRESETS)})")
    full = {**_mae_defaults(), **PRESETS[model.preset], **model.model_dump(exclude_none=True)}
    spec = spec.model_copy(update={"model": type(model).model_validate(full)})

    def where(*keys: str) -> str:
        for k in keys:
            if f"model.{k}" in point:
                return f"grid.model.{k}"
        return f"model.{keys[0]}"

    m = spec.model
    if m.embed_dim % m.num_heads:
        raise StudyError(study.path, where("num_heads", "embed_dim"),
                         f"embed_dim {m.embed_dim} is not divisible by num_heads {m.num_heads}")
    if m.decoder_embed_dim % m.decoder_num_heads:
        raise StudyError(study.path, where("decoder_num_heads", "decoder_embed_dim"),
                         f"decoder_embed_dim {m.decoder_embed_dim} is not divisible by "
                         f"decoder_num_heads {m.decoder_num_heads}")
    if m.img_size % m.patch_size:
        raise StudyError(study.path, where("patch_size", "img_size"),
                         f"img_size {m.img_size} is not divisible by patch_size {m.patch_size}")
    grid = m.img_size // m.patch_size
    if m.mask_sampling == "grid":
        k = grid_k(m.mask_ratio)
        if k is None:
            raise StudyError(study.path, where("mask_ratio", "mask_sampling"),
                             f"grid masking keeps one patch per k x k cell, so mask_ratio must be 1 - 1/k^2 "
                             f"(0.75, 0.8889, 0.9375, ...); got {m.mask_ratio}")
        if grid % k:
            raise StudyError(study.path, where("mask_ratio", "patch_size"),
                             f"grid masking with k={k} needs a patch grid divisible by {k}; got {grid}x{grid}")
    if int(grid * grid * (1 - m.mask_ratio)) < 1:
        raise StudyError(study.path, where("mask_ratio"),
                         f"mask_ratio {m.mask_ratio} keeps no patch of the {grid}x{grid} grid")
    ft = spec.eval.finetune
    if ft.last_k_blocks is not None and ft.last_k_blocks > m.depth:
        key = "grid.eval.finetune.last_k_blocks" if "eval.finetune.last_k_blocks" in point \
            else "eval.finetune.last_k_blocks"
        raise StudyError(study.path, key, f"last_k_blocks {ft.last_k_blocks} exceeds the encoder depth {m.depth}")
    problem = schedule_problem(spec)
    if problem is not None:
        key, reason = problem
        stage = key.rsplit(".", 1)[0]
        raise StudyError(study.path, next((f"grid.{k}" for k in (key, f"{stage}.epochs") if k in point), key), reason)
    try:
        mae_config(spec)
    except ValueError as exc:  # anything MAEConfig checks beyond the above (e.g. widths for sin-cos tables)
        key = next((f"grid.{k}" for k in point if k.startswith("model.")), "model")
        raise StudyError(study.path, key, str(exc)) from None
    return spec


def search_values(study: Study) -> dict[str, list[tuple[str, Any]]]:
    """Per searched key, the (field, value) pairs that bound it: low and high, or every choice."""
    out = {}
    for key, p in study.search.space.items():
        if p.type == "categorical":
            out[key] = [("choices", c) for c in p.choices]
        else:
            conv = int if p.type == "int" else float
            out[key] = [("low", conv(p.low)), ("high", conv(p.high))]
    return out


def check_search(study: Study) -> None:
    """Each searched key's bounds (or choices), alone on the base settings, must make a valid trial; errors name
    ``search.space.KEY.FIELD``. (Combinations are checked as they are sampled: an invalid one fails its trial.)"""
    for key, pairs in search_values(study).items():
        for name, value in pairs:
            try:
                resolve(study, {key: value}, study.study.seeds[0])
            except StudyError as exc:
                if exc.reason.startswith("unknown key"):
                    raise StudyError(study.path, f"search.space.{key}", exc.reason) from None
                reason = exc.reason if exc.reason.startswith("value ") else f"value {value!r}: {exc.reason}"
                raise StudyError(study.path, f"search.space.{key}.{name}", reason) from None


def expand(study: Study) -> list[Trial]:
    """One trial per (point, seed), in file order; seeds vary fastest. A search study expands to its base point
    (the search samples the rest), after its space is checked."""
    if study.search is not None:
        check_search(study)
    trials = []
    for point in study.points:
        first = resolve(study, point, study.study.seeds[0])  # validated once per point: seeds change only `seed`
        digests = _per_seed(identity(first))  # and its identity computed once: the seed is one key of it
        for seed in study.study.seeds:
            spec = first if seed == first.seed else first.model_copy(update={"seed": seed})
            trials.append(Trial(spec, *digests(seed), dict(point)))
    return trials
