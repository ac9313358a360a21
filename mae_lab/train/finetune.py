"""Fine-tuning (official `main_finetune.py` recipe): timm ViT from the MAE encoder, layer-wise lr decay, AdamW.

`last_k_blocks = k` tunes only the last k blocks plus the final norm / fc_norm / head (paper Fig. 9; k = 0 trains
the head alone).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer

from mae_lab import rng
from mae_lab.data import DatasetInfo
from mae_lab.study.init_check import at_finetune_size
from mae_lab.study.spec import TrialSpec
from mae_lab.train.common import LOSS_SYNC_EVERY, lr_at, read_losses, synchronize, use_bf16
from mae_lab.train.loaders import eval_loader, finetune_loader
from mae_lab.train.model import MaskedAutoencoder, build_timm_vit
from mae_lab.train.probe import has_test_split
from mae_lab.train.weights import resize_pos_embed

HEAD_KEYS = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}  # new in the classifier
DROPPED_KEYS = {"norm.weight", "norm.bias"}  # the encoder's final norm, replaced by fc_norm with global_pool "avg"


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Official `get_layer_id_for_vit`: cls_token, pos_embed, patch_embed -> 0; blocks.i -> i+1; rest -> num_layers."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: VisionTransformer, weight_decay: float, no_weight_decay_list: set[str],
                     layer_decay: float) -> list[dict]:
    """Official `param_groups_lrd`: a group per (layer, decay / no decay) with lr_scale = decay^(depth+1 - layer).

    No weight decay on 1-D parameters (norms, biases) and on `no_weight_decay_list` (pos_embed, cls_token).
    Frozen parameters are left out.
    """
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in no_weight_decay_list
        layer = layer_id_for_vit(n, num_layers)
        name = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if name not in groups:
            groups[name] = {"lr_scale": layer_scales[layer], "weight_decay": 0.0 if no_decay else weight_decay,
                            "params": [], "names": []}
        groups[name]["params"].append(p)
        groups[name]["names"].append(n)
    return list(groups.values())


def build_classifier(spec: TrialSpec, model: MaskedAutoencoder, num_classes: int) -> VisionTransformer:
    """timm ViT carrying the MAE encoder's weights, a fresh head (std 2e-5) and the `last_k_blocks` freezing."""
    ft = spec.eval.finetune
    config = dataclasses.replace(model.config, img_size=ft.img_size or model.config.img_size)
    vit = build_timm_vit(config, num_classes, global_pool=ft.global_pool, drop_path_rate=ft.drop_path)
    encoder = model.encoder_state_dict()
    encoder["pos_embed"] = resize_pos_embed(encoder["pos_embed"], config.grid_size)  # eval.finetune.img_size
    msg = vit.load_state_dict(encoder, strict=False)
    odd = set(msg.missing_keys) - HEAD_KEYS | set(msg.unexpected_keys) - DROPPED_KEYS
    assert not odd, f"encoder weights do not fit the timm ViT: {sorted(odd)}"
    head = vit.head  # (timm types it nn.Module; here always the classifier's Linear)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the timm ViT's head is {type(head).__name__}, not a Linear")
    nn.init.trunc_normal_(head.weight, std=2e-5, generator=rng.generator(spec.seed, "finetune", "head"))
    nn.init.zeros_(head.bias)
    if ft.last_k_blocks is not None:
        first_tuned = len(vit.blocks) - ft.last_k_blocks
        for n, p in vit.named_parameters():
            top = n.split(".")[0]
            tuned = top in ("norm", "fc_norm", "head") or (top == "blocks" and int(n.split(".")[1]) >= first_tuned)
            p.requires_grad_(tuned)
    return vit


def finetune(spec: TrialSpec, model: MaskedAutoencoder, info: DatasetInfo, *, device: str,
             on_epoch: Callable[[dict], None] | None = None, on_progress: Callable[[str], None] | None = None
             ) -> dict:
    """Fine-tune a copy of `model`'s encoder as `spec.eval.finetune` says; top-1 on the val and test splits.

    `model` itself is not changed. Returns {"top1" (validation), "test_top1" (None without a test split), "wall_s",
    "images_per_s" (training), "epochs", "model" (the fine-tuned timm ViT)}; `on_epoch` gets {"epoch", "loss", "lr",
    "images_per_s"} after every epoch; `on_progress` a note per optimizer step ("finetune step 120").
    """
    t_start = time.perf_counter()
    ft = spec.eval.finetune
    spec = at_finetune_size(spec)  # the loaders make eval.finetune.img_size images
    dev = torch.device(device)
    amp = use_bf16(spec.pretrain.amp, dev, model.config.embed_dim)
    rng.seed_globals(spec.seed, "finetune", "build")  # timm's own init, overwritten by the encoder and head
    vit = build_classifier(spec, model, info.num_classes).to(dev)

    groups = param_groups_lrd(vit, ft.weight_decay, set(vit.no_weight_decay()), ft.layer_decay)
    peak_lr = ft.base_lr * ft.batch_size / 256
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.999), fused=dev.type in ("cpu", "cuda"))
    mixup = None
    if ft.mixup > 0 or ft.cutmix > 0:
        if ft.batch_size % 2:
            raise ValueError(f"mixup / cutmix need an even eval.finetune.batch_size; got {ft.batch_size}")
        mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                      num_classes=info.num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif ft.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=ft.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    steps_per_epoch = len(finetune_loader(spec, info, 0))
    if steps_per_epoch == 0:
        raise ValueError(f"fine-tuning has no full batch of {ft.batch_size}; lower eval.finetune.batch_size")
    total_steps = steps_per_epoch * ft.epochs
    warmup_steps = round(ft.warmup_epochs * steps_per_epoch)

    sync_every = LOSS_SYNC_EVERY if dev.type == "cuda" else 1  # reads of the loss: host-device syncs on CUDA
    step, train_s, images = 0, 0.0, 0
    for epoch in range(ft.epochs):
        t_epoch = time.perf_counter()
        rng.seed_globals(spec.seed, "finetune", epoch)  # mixup and drop path (augmentation: the loader's stream)
        vit.train()
        loss_sum, n_images, lr = 0.0, 0, 0.0
        pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read back from the device
        for imgs, labels in finetune_loader(spec, info, epoch):
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, 0.0)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            imgs, labels = imgs.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)  # (B, C, H, W), (B,)
            if mixup is not None:
                imgs, labels = mixup(imgs, labels)  # labels: (B, num_classes) soft targets
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = vit(imgs)  # (B, num_classes)
            loss = criterion(logits.float(), labels)
            pending.append((step, loss.detach()))
            if len(pending) >= sync_every:
                loss_sum += read_losses(pending, stage="fine-tuning")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n_images += imgs.shape[0]
            if on_progress is not None:
                on_progress(f"finetune step {step}")
        loss_sum += read_losses(pending, stage="fine-tuning")
        synchronize(dev)
        epoch_s = time.perf_counter() - t_epoch
        train_s += epoch_s
        images += n_images
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "lr": lr,
                      "images_per_s": n_images / epoch_s})

    top1 = evaluate(vit, spec, info, "val", dev, amp)
    test_top1 = evaluate(vit, spec, info, "test", dev, amp) if has_test_split(info) else None
    return {"top1": top1, "test_top1": test_top1, "wall_s": time.perf_counter() - t_start,
            "images_per_s": images / max(train_s, 1e-9), "epochs": ft.epochs, "model": vit}


@torch.no_grad()
def evaluate(vit: VisionTransformer, spec: TrialSpec, info: DatasetInfo, split: str, dev: torch.device,
             amp: bool) -> float:
    """Top-1 of the fine-tuned classifier on one split ("val" or "test")."""
    vit.eval()
    correct, total = torch.zeros((), dtype=torch.int64, device=dev), 0  # read once, after the loop
    for imgs, labels in eval_loader(spec, info, split, spec.eval.finetune.batch_size):
        imgs, labels = imgs.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)  # (B, C, H, W), (B,)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = vit(imgs)  # (B, num_classes)
        correct += (logits.argmax(dim=1) == labels).sum()
        total += labels.numel()
    return correct.item() / max(1, total)
