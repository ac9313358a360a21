"""Probe surfaces: linear-probe top-1 after each listed block (``eval.linear.blocks``) and the last, per epoch.

One unmasked forward pass per batch collects every listed block's tokens (each passed through the encoder's final
norm, as ``forward_features`` does for the last, then pooled as ``eval.linear.pool`` says); a head per block then
trains on the cached features with the linear probe's recipe (``probe.LinearHead``), so block ``depth`` gives the
same number as the linear probe itself.

Pretraining keeps one checkpoint, overwritten each epoch, not one per epoch: so the surface's earlier epochs are
probed while pretraining runs, every ``pretrain.probe_every`` epochs (and once more when it ends), and recorded as
metrics of stage ``probe_surface``, name ``block{b}``, at that epoch.
"""
from __future__ import annotations

import torch

from mae_lab.data import DatasetInfo
from mae_lab.study.spec import TrialSpec
from mae_lab.train.common import use_bf16
from mae_lab.train.loaders import eval_loader
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.probe import LinearHead

STAGE = "probe_surface"


def surface_blocks(spec: TrialSpec) -> list[int]:
    """The probed blocks, 1-based and sorted: ``eval.linear.blocks`` plus the last; [] when none are listed."""
    blocks = spec.eval.linear.blocks
    return sorted(set(blocks) | {spec.model.depth}) if blocks else []


@torch.no_grad()
def block_features(model: MaskedAutoencoder, loader, device: str, blocks: list[int], pool: str = "cls",
                   amp: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({block: feats (N, D) float32}, labels (N,)) from one eval-mode forward pass per batch; mode restored."""
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    feats: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    labels = []
    for imgs, y in loader:
        imgs = imgs.to(dev, non_blocking=True)  # (B, C, H, W)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]  # (B, L, D), as forward_features
            cls_token = model.cls_token + model.pos_embed[:, :1, :]  # (1, 1, D)
            x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+L, D)
            for i, blk in enumerate(model.blocks, start=1):
                x = blk(x)
                if i in feats:
                    h = model.norm(x)  # (B, 1+L, D)
                    feats[i].append((h[:, 0] if pool == "cls" else h[:, 1:].mean(dim=1)).float())  # (B, D)
        labels.append(y.to(dev, non_blocking=True))
    model.train(was_training)
    return {b: torch.cat(f) for b, f in feats.items()}, torch.cat(labels)


def probe_surface(spec: TrialSpec, model: MaskedAutoencoder, info: DatasetInfo, device: str) -> dict[str, float]:
    """{"block{b}": val top-1} of a linear probe (``eval.linear``'s recipe) per surface block; {} without blocks."""
    blocks = surface_blocks(spec)
    if not blocks:
        return {}
    lin = spec.eval.linear
    dev = torch.device(device)
    model.to(dev)
    amp = use_bf16(spec.pretrain.amp, dev, model.config.embed_dim)
    train, train_y = block_features(model, eval_loader(spec, info, "train", lin.batch_size), device, blocks, lin.pool,
                                    amp)  # {b: (N, D)}, (N,)
    val, val_y = block_features(model, eval_loader(spec, info, "val", lin.batch_size), device, blocks, lin.pool, amp)
    out = {}
    for b in blocks:
        head = LinearHead(lin, train[b].shape[1], info.num_classes, len(train_y), dev, spec.seed)
        for _ in range(lin.epochs):
            head.train_epoch(train[b], train_y)
        out[f"block{b}"] = head.top1(val[b], val_y)
    return out
