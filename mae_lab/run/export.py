"""A trial's pretrained encoder, out of the lab: safetensors plus the config timm or Hugging Face needs.

- timm: the folder ``timm.models.save_for_hf`` writes (``config.json`` + ``model.safetensors``), which
  ``timm.create_model("local-dir:OUT", pretrained=True, num_classes=0)`` loads. timm builds the ViT from the
  recorded ``model_args`` of a ``create_model`` call, so the export goes through timm's own factory and writer.
- hf: a ``ViTModel`` folder (``config.json`` + ``model.safetensors``, the key names of the Hub's ViT checkpoints),
  which ``transformers.ViTModel.from_pretrained(OUT)`` loads; its ``last_hidden_state`` equals
  ``MaskedAutoencoder.forward_features``. Written with safetensors alone: transformers has no converter from timm
  names, and exporting should not need it installed (loading does).

The output folder appears whole or not at all (written to a temp folder beside it, then renamed); the database is
only read.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import torch
from sqlalchemy.engine import Engine
from timm.models import save_for_hf

from mae_lab.errors import BadInput
from mae_lab.run.inits import trial_checkpoint
from mae_lab.store.tables import TrialRow
from mae_lab.study.presets import MAEConfig
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.weights import InitError

FORMATS = ("timm", "hf")
TIMM_ARCH = "vit_base_patch16_224"  # any registered ViT: the export's model_args set every size


class ExportError(BadInput, ValueError):
    """The export cannot be made; ``str()`` is one line naming the trial, file or option."""


def trial_encoder(engine: Engine, ref: str) -> tuple[TrialRow, MaskedAutoencoder]:
    """The done trial ``ref`` (id or hash prefix) and its MAE, loaded from its sha256-checked checkpoint."""
    try:
        row, state = trial_checkpoint(engine, ref)
    except InitError as exc:
        raise ExportError(str(exc)) from None
    model = MaskedAutoencoder(MAEConfig(**state["config"]))
    model.load_state_dict(state["model"])
    return row, model.eval()


def timm_encoder(config: MAEConfig) -> torch.nn.Module:
    """A headless timm VisionTransformer shaped like the MAE encoder, built by timm's factory (so it records the
    model_args that ``save_for_hf`` writes and ``local-dir:`` rebuilds from)."""
    return timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=config.img_size,
                             patch_size=config.patch_size, in_chans=config.in_chans, embed_dim=config.embed_dim,
                             depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                             qkv_bias=True, class_token=True, global_pool="token")


def hf_config(config: MAEConfig) -> dict:
    """The ``config.json`` of a transformers ViTModel equal to the encoder (exact GELU, LayerNorm eps 1e-6)."""
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": config.embed_dim,
            "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
            "intermediate_size": int(config.embed_dim * config.mlp_ratio), "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "layer_norm_eps": 1e-6, "image_size": config.img_size, "patch_size": config.patch_size,
            "num_channels": config.in_chans, "qkv_bias": True, "encoder_stride": config.patch_size}


def hf_state_dict(encoder: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm / official encoder names -> the Hub's ViTModel names (the fused qkv split into query, key, value)."""
    out = {"embeddings.cls_token": encoder["cls_token"],
           "embeddings.position_embeddings": encoder["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": encoder["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": encoder["patch_embed.proj.bias"],
           "layernorm.weight": encoder["norm.weight"], "layernorm.bias": encoder["norm.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = encoder[f"{src}attn.qkv.{part}"].chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...), q k v order
            out[f"{dst}attention.attention.query.{part}"] = q
            out[f"{dst}attention.attention.key.{part}"] = k
            out[f"{dst}attention.attention.value.{part}"] = v
            out[f"{dst}attention.output.dense.{part}"] = encoder[f"{src}attn.proj.{part}"]
            out[f"{dst}layernorm_before.{part}"] = encoder[f"{src}norm1.{part}"]
            out[f"{dst}layernorm_after.{part}"] = encoder[f"{src}norm2.{part}"]
            out[f"{dst}intermediate.dense.{part}"] = encoder[f"{src}mlp.fc1.{part}"]
            out[f"{dst}output.dense.{part}"] = encoder[f"{src}mlp.fc2.{part}"]
    return {k: v.contiguous().clone() for k, v in out.items()}  # safetensors refuses shared / strided storage


def write_export(model: MaskedAutoencoder, fmt: str, folder: Path) -> None:
    """Write ``model``'s encoder in ``fmt`` into the existing empty ``folder``."""
    encoder = model.encoder_state_dict()
    if fmt == "timm":
        vit = timm_encoder(model.config)
        vit.load_state_dict(encoder, strict=True)  # every key, no head: the encoder exactly
        save_for_hf(vit, str(folder), safe_serialization=True)
    else:
        safetensors.torch.save_file(hf_state_dict(encoder, model.config.depth), folder / "model.safetensors",
                                    metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")


def export_trial(engine: Engine, ref: str, fmt: str, out: str | Path) -> Path:
    """Export trial ``ref``'s pretrained encoder to the folder ``out`` (which must not exist or be empty)."""
    if fmt not in FORMATS:
        raise ExportError(f"--to {fmt!r}: unknown format (valid: {', '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; give a new one")
    _, model = trial_encoder(engine, ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_export(model, fmt, tmp)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
