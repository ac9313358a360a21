"""Study and trial schemas, and TOML loading with precise errors.

A study file is data: ``[study]``, ``[data]``, ``[model]``, ``[pretrain]``, ``[eval]`` and a ``[grid]`` (cartesian
product over dotted keys) and/or ``[[cases]]`` (explicit points); ``[log]`` names live views (no part of a trial).
Every error names the file, the dotted key and the reason. This module imports nothing else of mae-lab's but
``spec_tables`` (the ``[study]``, ``[search]`` and ``[log]`` tables): presets are resolved in ``expand.py``.
"""
from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mae_lab.errors import BadInput
from mae_lab.study.tables import (
    AutoBool,
    Float,
    LogSection,
    SearchSection,
    Strict,
    StudySection,
    TableError,
    check_search_table,
)


class StudyError(BadInput, ValueError):
    """A study file is invalid. ``str()`` is one line: ``FILE: KEY: REASON``."""

    def __init__(self, path: str | Path, key: str, reason: str):
        self.path, self.key, self.reason = str(path), key, reason
        super().__init__(f"{self.path}: {key}: {reason}" if key else f"{self.path}: {reason}")


Augmentation = Literal["none", "fixed_crop", "random_resized_crop", "rrc_color_jitter"]


class DataSpec(Strict):
    dataset: str | None = "digits"
    train: str | None = None
    val: str | None = None
    augmentation: Augmentation = "random_resized_crop"
    train_samples: int | None = Field(None, ge=1, description="use only the first N training samples")
    num_workers: int = Field(0, ge=0)
    in_memory: bool = Field(False, description="decode the dataset once and keep it in memory")
    val_holdout: int | None = Field(None, ge=1, description="training samples held out as the val split when the "
                                    "dataset has no val split (None: 10%); ignored where it has one")
    val_seed: int = Field(0, ge=0, description="which training samples the held-out val split takes")
    label_key: str = Field("label", min_length=1, description="the label's field in a sample's .json (without .cls)")
    pretrain_dataset: str | None = Field(None, description="pretrain on this named dataset's train split instead")
    pretrain_shards: str | None = Field(None, description="pretrain on these (unlabeled) shards instead")

    @model_validator(mode="before")
    @classmethod
    def _patterns_replace_the_default(cls, data: Any) -> Any:
        """Shard patterns stand in for the default dataset, so a resolved spec says ``dataset = None``."""
        if isinstance(data, dict) and data.get("train") is not None and "dataset" not in data:
            return {**data, "dataset": None}
        return data

    @model_validator(mode="after")
    def _source(self) -> DataSpec:
        if (self.train is None) != (self.val is None):
            raise ValueError("give both 'train' and 'val' shard patterns, or neither")
        if self.train is not None and self.dataset is not None:
            raise ValueError("give either 'dataset' or 'train'/'val' patterns, not both")
        if self.pretrain_dataset is not None and self.pretrain_shards is not None:
            raise ValueError("give either 'pretrain_dataset' or 'pretrain_shards', not both")
        return self


class ModelSpec(Strict):
    """A size preset plus overrides of any MAEConfig field; ``expand`` fills every field from the preset."""

    preset: str = "vit_digits"
    img_size: int | None = Field(None, ge=1)
    patch_size: int | None = Field(None, ge=1)
    in_chans: int | None = Field(None, ge=1)
    embed_dim: int | None = Field(None, ge=1)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    decoder_embed_dim: int | None = Field(None, ge=1)
    decoder_depth: int | None = Field(None, ge=1)
    decoder_num_heads: int | None = Field(None, ge=1)
    mlp_ratio: Float | None = Field(None, gt=0)
    norm_pix_loss: bool | None = None
    mask_ratio: Float | None = Field(None, ge=0.0, lt=1.0)
    mask_sampling: Literal["random", "block", "grid"] | None = None
    mask_token_in_encoder: bool | None = None



class PretrainSpec(Strict):
    epochs: int = Field(10, ge=0, description="0 keeps the random init (a baseline)")
    batch_size: int = Field(256, ge=1)
    accum_iter: int = Field(1, ge=1)
    base_lr: Float = Field(1.5e-4, gt=0)
    min_lr: Float = Field(0.0, ge=0)
    weight_decay: Float = Field(0.05, ge=0)
    warmup_epochs: Float = Field(1.0, ge=0)
    amp: Literal["auto", "none", "bf16"] = Field(
        "auto",
        description="bf16 autocast; auto: where it pays (CUDA with bf16; a CPU with native bf16 from width 192)")
    compile: AutoBool = Field(
        "auto", description="torch.compile the training step; auto: on CUDA (on the CPU compiling outlasts short runs)")
    probe_every: int = Field(0, ge=0, description="every N epochs, a kNN probe on cached features (0: never)")
    init: str | None = Field(None, description="start from these weights: an official MAE checkpoint (encoder-only or "
                             "full), a timm ViT state dict (.pth / .safetensors) or a done trial's hash")
    init_sha256: str | None = Field(None, description="sha256 of the init's weights file: filled in when the study is "
                                    "expanded (the trial's identity); give it to pin the file")



class LinearSpec(Strict):
    enabled: bool = True
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    base_lr: Float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "lars"] = "sgd"
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    warmup_epochs: Float = Field(5.0, ge=0)
    pool: Literal["cls", "mean"] = "cls"
    blocks: list[int] = Field([], description="also probe the features after these blocks (1 = the first), "
                              "one forward pass for all; with pretrain.probe_every, at those epochs too")



class FinetuneSpec(Strict):
    enabled: bool = True
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    base_lr: Float = Field(1e-3, gt=0)
    layer_decay: Float = Field(0.75, gt=0, le=1)
    weight_decay: Float = Field(0.05, ge=0)
    warmup_epochs: Float = Field(2.0, ge=0)
    drop_path: Float = Field(0.1, ge=0, lt=1)
    label_smoothing: Float = Field(0.1, ge=0, lt=1)
    mixup: Float = Field(0.0, ge=0)
    cutmix: Float = Field(0.0, ge=0)
    randaug: str | None = Field(None, description="timm RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'")
    min_crop_scale: Float = Field(0.08, gt=0, le=1, description="RandomResizedCrop's smallest area fraction")
    flip: bool = Field(True, description="random horizontal flips while fine-tuning")
    global_pool: Literal["avg", "token"] = "avg"
    last_k_blocks: int | None = Field(None, ge=0, description="tune only the last k blocks (paper Fig. 9)")
    img_size: int | None = Field(None, ge=1, description="fine-tune and evaluate at this size, the position "
                                 "embeddings interpolated (None: model.img_size)")



class EvalSpec(Strict):
    linear: LinearSpec = LinearSpec()
    finetune: FinetuneSpec = FinetuneSpec()


class TrialSpec(Strict):
    """Everything that determines one trial's numbers. Frozen; hashed for the trial's identity."""

    seed: int = 0
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    pretrain: PretrainSpec = PretrainSpec()
    eval: EvalSpec = EvalSpec()


def schedule_problem(spec: TrialSpec) -> tuple[str, str] | None:
    """(key, reason) when a stage that runs has a warmup of at least its epochs: its learning rate would never leave
    the warmup ramp (a probe that never reaches its peak lr can land below chance), or when pretraining probes less
    often than it has epochs (``probe_every`` above them); None when every schedule is fine.
    Checked when a study is expanded, not on recorded specs, so that older databases stay readable."""
    stages = (("pretrain", spec.pretrain, spec.pretrain.epochs > 0),
              ("eval.linear", spec.eval.linear, spec.eval.linear.enabled),
              ("eval.finetune", spec.eval.finetune, spec.eval.finetune.enabled))
    for key, stage, runs in stages:
        if runs and stage.warmup_epochs >= stage.epochs:
            given = "" if "warmup_epochs" in stage.model_fields_set else " (the default)"
            return (f"{key}.warmup_epochs", f"a warmup of {stage.warmup_epochs:g} epochs{given} is not below "
                    f"{key}.epochs = {stage.epochs}: the learning rate would never leave its warmup; set "
                    f"{key}.warmup_epochs below the epochs (0 for none)")
    pt = spec.pretrain
    if pt.epochs > 0 and pt.probe_every > pt.epochs:
        return ("pretrain.probe_every", f"probe_every = {pt.probe_every} is above pretrain.epochs = {pt.epochs}: no "
                "epoch would be probed; set it to at most the epochs (0 for never)")
    return None


class StudyFile(Strict):
    """The whole TOML file, before expansion."""

    study: StudySection
    data: dict[str, Any] = {}
    model: dict[str, Any] = {}
    pretrain: dict[str, Any] = {}
    eval: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    cases: list[dict[str, Any]] = []
    search: SearchSection | None = None
    log: LogSection = LogSection()


class Study(BaseModel):
    """A loaded study: its header, the base trial (without seed), the points to expand, the source text."""

    model_config = ConfigDict(frozen=True)
    path: str
    text: str
    study: StudySection
    base: dict[str, Any]  # the trial dict without grid values: data / model / pretrain / eval
    points: list[dict[str, Any]]  # one dict of dotted key -> value per grid point (or [{}])
    search: SearchSection | None = None
    log: LogSection = LogSection()  # live views (TensorBoard, MLflow): how it runs, not what it computes


# --- error formatting -----------------------------------------------------------------------------------------

def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the sub-model that ``loc`` points into (for 'did you mean')."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return list(model.model_fields)


def _describe(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(root, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        parent = "".join(f"{p}." for p in loc[:-1])
        hint = f" (did you mean '{parent}{near[0]}'?)" if near else f" (valid: {', '.join(valid)})"
        return key, f"unknown key{hint}"
    if err["type"] == "missing":
        return key, "required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return key, f"{msg} (got {err['input']!r})" if err["type"] not in ("value_error", "model_type") else msg


def _first(exc: ValidationError) -> Mapping[str, Any]:
    """The error to report: an unknown key first (it often explains a 'missing' one)."""
    errors = exc.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def _raise(path: str | Path, exc: ValidationError, root: type[BaseModel]) -> NoReturn:
    key, reason = _describe(_first(exc), root)
    raise StudyError(path, key, reason) from None


# --- loading --------------------------------------------------------------------------------------------------

def set_dotted(d: dict, key: str, value: Any) -> dict:
    """Return a copy of the nested dict ``d`` with ``key`` ('a.b.c') set to ``value``."""
    head, _, rest = key.partition(".")
    out = dict(d)
    out[head] = set_dotted(dict(d.get(head) or {}), rest, value) if rest else value
    return out


def get_dotted(d: dict | BaseModel, key: str) -> Any:
    for part in key.split("."):
        d = getattr(d, part) if isinstance(d, BaseModel) else d[part]
    return d


def validate_trial(path: str | Path, raw: dict, point: dict[str, Any] | None = None) -> TrialSpec:
    """Validate one trial dict (base with ``point`` applied); errors name the grid key when it caused them."""
    for key, value in (point or {}).items():
        raw = set_dotted(raw, key, value)
    try:
        return TrialSpec.model_validate(raw)
    except ValidationError as exc:
        err = _first(exc)
        key = ".".join(str(p) for p in err["loc"])
        for gkey, value in (point or {}).items():
            if key == gkey or key.startswith(gkey + ".") or gkey.startswith(key + "."):
                _, reason = _describe(err, TrialSpec)
                if err["type"] == "extra_forbidden":
                    raise StudyError(path, f"grid.{gkey}", reason) from None
                raise StudyError(path, f"grid.{gkey}", f"value {value!r}: {reason}") from None
        _raise(path, exc, TrialSpec)


MAX_TRIALS = 10_000  # a larger study is refused unless the user allows it (a typo in a grid multiplies fast)


def _non_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """The first inf or nan anywhere in a parsed TOML value, with its dotted key (list positions left out)."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, key if k is None else f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _points(path: str | Path, f: StudyFile, allow_large: bool) -> list[dict[str, Any]]:
    """The grid's cartesian product, crossed with every case: each case is combined with every grid point."""
    for key, values in f.grid.items():
        if not values:
            raise StudyError(path, f"grid.{key}", "empty axis: give at least one value")
        seen = [repr(v) for v in values]
        dup = next((v for i, v in enumerate(seen) if v in seen[:i]), None)
        if dup is not None:
            raise StudyError(path, f"grid.{key}", f"duplicate value {dup}")
    both = next((k for case in f.cases for k in case if k in f.grid), None)
    if both is not None:
        raise StudyError(path, f"grid.{both}", f"'{both}' is also a case key: every case is crossed with every "
                         "grid point, so the grid would override the case's value; set it in one place")
    count = math.prod(len(v) for v in f.grid.values()) * max(1, len(f.cases)) * len(f.study.seeds)
    if count > MAX_TRIALS and not allow_large:
        raise StudyError(path, "grid", f"{count:,} trials (grid points x cases x seeds) is over {MAX_TRIALS:,}: "
                         "check the grid for a typo, or pass --allow-large-grid")
    points: list[dict[str, Any]] = [{}]
    for key, values in f.grid.items():
        points = [{**p, key: v} for p in points for v in values]
    if f.cases:
        points = [{**case, **p} for case in f.cases for p in points]
        keys = [tuple(sorted(p.items(), key=lambda kv: kv[0])) for p in points]
        if len({repr(k) for k in keys}) != len(keys):
            raise StudyError(path, "cases", "two cases give the same trial")
    return points


def parse_study(text: str, path: str | Path = "<study>", *, allow_large_grid: bool = False) -> Study:
    """Parse and validate a study's TOML text; raise StudyError naming ``path`` and the key. A study of more than
    MAX_TRIALS trials is refused unless ``allow_large_grid``."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(path, "", f"TOML syntax error: {exc}") from None
    bad = _non_finite(raw)
    if bad is not None:
        raise StudyError(path, bad[0], f"{bad[1]} is not a finite number (TOML allows inf and nan; no setting can "
                         "use them)")
    try:
        f = StudyFile.model_validate(raw)
    except ValidationError as exc:
        _raise(path, exc, StudyFile)
    if f.grid and f.search:
        raise StudyError(path, "search", "a study has either a [grid] / [[cases]] or a [search], not both")
    if f.search and f.study.adaptive is not None:
        raise StudyError(path, "study.seeds", "adaptive seeds are for grid studies: a [search] takes a list of seeds")
    base = {"data": f.data, "model": f.model, "pretrain": f.pretrain, "eval": f.eval}
    validate_trial(path, base)  # the base alone must be valid
    if f.search is not None:
        try:
            check_search_table(f.search, base, TrialSpec.model_fields)
        except TableError as exc:
            raise StudyError(path, exc.key, str(exc)) from None
    points = _points(path, f, allow_large_grid)
    # each value alone on the base (combinations are checked when the study is expanded): cheap for large grids
    for key, values in f.grid.items():
        for value in values:
            validate_trial(path, base, {key: value})
    for case in f.cases:
        validate_trial(path, base, case)
    return Study(path=str(path), text=text, study=f.study, base=base, points=points, search=f.search, log=f.log)


def load_study(path: str | Path, *, allow_large_grid: bool = False) -> Study:
    """Read and validate a study file (UTF-8, with or without a byte-order mark)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(path, "", f"cannot read the study file ({exc.__class__.__name__}: {exc})") from None
    return parse_study(text, p, allow_large_grid=allow_large_grid)
