"""Start a trial from released or earlier weights: format detection, key and shape checks, pos-embed resizing.

``pretrain.init`` accepts
- an official MAE checkpoint: the encoder-only ``mae_pretrain_vit_*.pth`` or the full ``mae_visualize_vit_*.pth``
  (``{"model": state_dict}``, official names; mae-lab's own checkpoints are a superset);
- a timm ViT state dict (``.pth`` or ``.safetensors``; ``head.*`` / ``fc_norm.*`` are dropped);
- a done trial's hash (its pretraining checkpoint, sha256-checked; run.inits finds it in the database, so no
  training stage touches the database).

Files are read with ``weights_only=True``: a file that pickles Python objects is refused, not executed. The position
embeddings are resized to the study's patch grid (bicubic over the grid, the cls token kept, as the official
``interpolate_pos_embed``; timm's ``resample_abs_pos_embed`` does the work). The encoder must fit the model exactly
(every key, every width); the decoder of a full checkpoint is loaded when all of its shapes fit, else the model
keeps its fresh decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed

from mae_lab.study.expand import mae_config
from mae_lab.study.init_check import file_sha256
from mae_lab.study.presets import MAEConfig
from mae_lab.study.spec import TrialSpec
from mae_lab.train.checkpoint import CheckpointError, load_checkpoint
from mae_lab.train.model import MaskedAutoencoder

DROPPED = ("head.", "fc_norm.")  # a timm classifier's head: not part of the encoder
POS_KEYS = ("pos_embed", "decoder_pos_embed")


class InitError(ValueError):
    """An init that cannot be used; ``str()`` is one line naming the file (or trial) and the key."""


@dataclass(frozen=True)
class InitSource:
    """Where ``pretrain.init``'s weights are: a weights file, or a done trial's pretraining checkpoint (``trial``;
    run.inits finds it in the database). ``sha256``: what the file must hash to (None: unchecked); ``label`` names it
    in messages."""

    label: str
    path: str
    sha256: str | None = None
    trial: bool = False


def file_source(spec: TrialSpec) -> InitSource:
    """The source of a file init (``pretrain.init`` a path, checked against ``pretrain.init_sha256`` when set)."""
    init = spec.pretrain.init
    if init is None:
        raise ValueError("the spec has no pretrain.init")  # callers ask only when it is set
    return InitSource(init, init, spec.pretrain.init_sha256)


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


def init_state(source: InitSource) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` (InitError when they cannot be read, or the file changed: sha256 differs)."""
    if source.trial:
        try:
            return load_checkpoint(source.path, sha256=source.sha256)["model"]
        except CheckpointError as exc:
            raise InitError(str(exc)) from None
    if source.sha256 is not None:
        if not Path(source.path).is_file() or file_sha256(source.path) != source.sha256:
            raise InitError(f"{source.path}: missing or changed since the study was expanded (sha256 differs)")
    return read_state(source.path)


def init_model(spec: TrialSpec, source: InitSource) -> MaskedAutoencoder:
    """A MaskedAutoencoder for ``spec`` (seeded as pretraining seeds it) carrying the weights of ``source``."""
    config = mae_config(spec)
    fitted = fit_state(init_state(source), config, source.label)
    torch.manual_seed(spec.seed)
    model = MaskedAutoencoder(config)
    model.load_state_dict(fitted, strict=False)
    return model
