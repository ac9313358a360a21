"""Start a trial from released or earlier weights: format detection, key and shape checks, pos-embed resizing.

``pretrain.init`` accepts
- an official MAE checkpoint: the encoder-only ``mae_pretrain_vit_*.pth`` or the full ``mae_visualize_vit_*.pth``
  (``{"model": state_dict}``, official names; mae-lab's own checkpoints are a superset);
- a timm ViT state dict (``.pth`` or ``.safetensors``; ``head.*`` / ``fc_norm.*`` are dropped);
- a done trial's hash (its pretraining checkpoint, sha256-checked).

Files are read with ``weights_only=True``: a file that pickles Python objects is refused, not executed. The position
embeddings are resized to the study's patch grid (bicubic over the grid, the cls token kept, as the official
``interpolate_pos_embed``; timm's ``resample_abs_pos_embed`` does the work). The encoder must fit the model exactly
(every key, every width); the decoder of a full checkpoint is loaded when all of its shapes fit, else the model
keeps its fresh decoder.
"""
from __future__ import annotations

import math
from pathlib import Path

import safetensors.torch
import torch
from sqlalchemy.engine import Engine
from timm.layers import resample_abs_pos_embed

from mae_lab.store.engine import DbError, connect
from mae_lab.store.reads import find_trial, trial_details
from mae_lab.store.tables import TrialRow
from mae_lab.study.expand import Trial, mae_config
from mae_lab.study.init_check import file_sha256, is_trial_ref
from mae_lab.study.presets import MAEConfig
from mae_lab.study.spec import Study, StudyError, TrialSpec
from mae_lab.train.checkpoint import CheckpointError, load_checkpoint
from mae_lab.train.model import MaskedAutoencoder

DROPPED = ("head.", "fc_norm.")  # a timm classifier's head: not part of the encoder
POS_KEYS = ("pos_embed", "decoder_pos_embed")


class InitError(ValueError):
    """An init that cannot be used; ``str()`` is one line naming the file (or trial) and the key."""


def trial_checkpoint(engine: Engine, ref: str) -> tuple[TrialRow, dict]:
    """The done trial ``ref`` (id or hash prefix) and its pretraining checkpoint, sha256-checked (InitError)."""
    row = find_trial(engine, ref)
    if row is None:
        raise InitError(f"trial {ref!r}: no single trial matches (give the id or a longer hash prefix)")
    if row.status != "done":
        raise InitError(f"trial {row.hash}: status is {row.status!r}, not 'done'; run its study first")
    _, _, arts = trial_details(engine, row.id)
    ckpt = next((a for a in arts if a.kind == "checkpoint"), None)
    if ckpt is None:
        raise InitError(f"trial {row.hash}: has no pretraining checkpoint (pretrain.epochs = 0?)")
    try:
        return row, load_checkpoint(ckpt.path, sha256=ckpt.sha256)
    except CheckpointError as exc:
        raise InitError(str(exc)) from None


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a torch file holding a state dict, ``{"model": ...}`` or
    ``{"state_dict": ...}``; a DDP ``module.`` prefix is dropped. InitError when it is none of these.

    The format is told by the first bytes: a torch zip (``PK``), a legacy torch pickle (``0x80``), or safetensors
    (an 8-byte header length, then ``{``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise InitError(f"{path}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    if head[8:9] == b"{":
        try:
            return safetensors.torch.load_file(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InitError(f"{path}: not a safetensors checkpoint ({exc.__class__.__name__}: {exc})") from None
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise InitError(f"{path}: not a checkpoint (neither a torch file nor safetensors)")
    try:
        obj = load_checkpoint(path)
    except CheckpointError as exc:
        raise InitError(str(exc)) from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InitError(f"{path}: not a checkpoint (no state dict of tensors, nor one under 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def checkpoint_kind(state: dict[str, torch.Tensor]) -> str:
    """"mae-full" (encoder + decoder), "timm" (a classifier's keys) or "mae-encoder" (encoder keys only)."""
    if any(k.startswith("decoder_") or k == "mask_token" for k in state):
        return "mae-full"
    if any(k.startswith(DROPPED) for k in state):
        return "timm"
    return "mae-encoder"


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1+g*g, D) -> (1, 1+grid*grid, D): bicubic over the patch grid, the cls row kept as it is."""
    old = math.isqrt(pos.shape[1] - 1)
    if old * old != pos.shape[1] - 1:
        raise ValueError(f"a pos_embed of {pos.shape[1]} tokens is not a cls token plus a square grid")
    if old == grid:
        return pos
    return resample_abs_pos_embed(pos.float(), [grid, grid], [old, old], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False).to(pos.dtype)  # official: no antialias


def fit_state(state: dict[str, torch.Tensor], config: MAEConfig, source: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` to load into a MaskedAutoencoder of ``config`` (strict=False), pos-embeds resized.

    InitError naming ``source`` and the key when an encoder key is missing, a key is unknown, or a shape (a width,
    the patch size, the depth) does not match."""
    with torch.device("meta"):
        own = {k: v.shape for k, v in MaskedAutoencoder(config).state_dict().items()}
        encoder = set(MaskedAutoencoder(config).encoder_state_dict())
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    for k in POS_KEYS:
        if k in state and state[k].ndim == 3 and state[k].shape[1] != own[k][1]:
            try:
                state[k] = resize_pos_embed(state[k], config.grid_size)
            except ValueError as exc:
                raise InitError(f"{source}: key {k}: {exc}") from None
    unknown = next((k for k in state if k not in own), None)
    if unknown is not None:
        raise InitError(f"{source}: key {unknown} is not in the model (depth {config.depth}, decoder depth "
                        f"{config.decoder_depth})")
    missing = next((k for k in sorted(encoder) if k not in state), None)
    if missing is not None:
        raise InitError(f"{source}: lacks the encoder key {missing}")
    for k in sorted(encoder):
        if state[k].shape != own[k]:
            raise InitError(f"{source}: key {k} has shape {tuple(state[k].shape)}, the model needs {tuple(own[k])} "
                            f"(embed_dim {config.embed_dim}, patch_size {config.patch_size})")
    decoder = {k: v for k, v in state.items() if k not in encoder}
    if any(v.shape != own[k] for k, v in decoder.items()):
        decoder = {}  # another decoder: the model keeps its fresh one
    return {**{k: state[k] for k in encoder}, **decoder}


def init_state(spec: TrialSpec, engine: Engine | None) -> tuple[str, dict[str, torch.Tensor]]:
    """(source, state) of ``spec.pretrain.init``: a trial's checkpoint (needs ``engine``) or a file, whose sha256
    must be ``pretrain.init_sha256`` when that is set (InitError)."""
    init = spec.pretrain.init
    if is_trial_ref(init):
        if engine is None:
            raise InitError(f"trial {init}: a trial init needs the database")
        row, ckpt = trial_checkpoint(engine, init)
        return f"trial {row.hash}", ckpt["model"]
    if spec.pretrain.init_sha256 is not None:
        if not Path(init).is_file() or file_sha256(init) != spec.pretrain.init_sha256:
            raise InitError(f"{init}: missing or changed since the study was expanded (sha256 differs)")
    return init, read_state(init)


def init_model(spec: TrialSpec, engine: Engine | None) -> MaskedAutoencoder:
    """A MaskedAutoencoder for ``spec`` (seeded as pretraining seeds it) carrying ``spec.pretrain.init``'s weights."""
    config = mae_config(spec)
    source, state = init_state(spec, engine)
    fitted = fit_state(state, config, source)
    torch.manual_seed(spec.seed)
    model = MaskedAutoencoder(config)
    model.load_state_dict(fitted, strict=False)
    return model


def check_inits(study: Study, trials: list[Trial], db_url: str | None) -> None:
    """Every distinct init of the trials can be read and fits its model; StudyError (``pretrain.init``) otherwise.

    Run before anything is written: a bad init leaves the database as it was (and file inits never open it; a
    trial-hash init opens the existing database ``db_url`` read-only)."""
    engine: Engine | None = None
    seen: set[tuple[str, str]] = set()
    for t in trials:
        spec = t.spec
        if spec.pretrain.init is None:
            continue
        config = mae_config(spec)
        key = (spec.pretrain.init, repr(config))
        if key in seen:
            continue
        seen.add(key)
        try:
            if engine is None and is_trial_ref(spec.pretrain.init):
                engine = connect(db_url, create=False)
            source, state = init_state(spec, engine)
            fit_state(state, config, source)
        except InitError as exc:
            raise StudyError(study.path, "pretrain.init", str(exc)) from None
        except DbError as exc:
            raise StudyError(study.path, "pretrain.init", f"trial {spec.pretrain.init}: {exc}") from None
