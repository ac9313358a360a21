"""Frozen-encoder evaluation: linear probing (official `main_linprobe.py` recipe) and a kNN monitor (DINO).

The probe uses no augmentation, so the frozen encoder (in eval mode) encodes train and val once and the head
trains on the cached features: the same numbers as the official loop, at a fraction of its cost.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_lab.data import DatasetInfo
from mae_lab.loaders import eval_loader
from mae_lab.model import MaskedAutoencoder
from mae_lab.pretrain import lr_at, use_bf16
from mae_lab.spec import TrialSpec


class LARS(torch.optim.Optimizer):
    """LARS as in the official `util/lars.py`: no rate scaling or weight decay for parameters <= 1-D."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:  # not a norm's gamma / beta nor a bias
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm,
                                                one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


@torch.no_grad()
def extract_features(model: MaskedAutoencoder, loader, device: str, pool: str = "cls",
                     amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of `loader` with the unmasked encoder in eval mode: (feats (N, D) float32, labels (N,)).

    pool "cls" takes the cls token after the final norm (official probe); "mean" averages the patch tokens.
    The model's train/eval mode is restored afterwards. Features stay on `device`.
    """
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for imgs, y in loader:
        imgs = imgs.to(dev, non_blocking=True)  # (B, C, H, W)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            x = model.forward_features(imgs)  # (B, 1+L, D)
        x = x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        feats.append(x.float())
        labels.append(y.to(dev, non_blocking=True))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(spec: TrialSpec, model: MaskedAutoencoder, info: DatasetInfo, *, device: str,
                 on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train BatchNorm1d(affine=False) + Linear on frozen features as `spec.eval.linear` says; top-1 on val.

    Returns {"top1", "wall_s", "images_per_s" (images encoded per second), "epochs"}. `on_epoch` gets
    {"epoch", "loss", "lr", "top1"} after every epoch (val top-1 on the cached features costs next to nothing).
    """
    t_start = time.perf_counter()
    lin = spec.eval.linear
    dev = torch.device(device)
    amp = use_bf16(spec.pretrain.amp, dev, model.config.embed_dim)
    model.to(dev)
    train_x, train_y = extract_features(model, eval_loader(spec, info, "train", lin.batch_size), device, lin.pool,
                                        amp)  # (N, D), (N,)
    val_x, val_y = extract_features(model, eval_loader(spec, info, "val", lin.batch_size), device, lin.pool, amp)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    encode_s = time.perf_counter() - t_start

    torch.manual_seed(spec.seed)
    N, D = train_x.shape
    head = nn.Sequential(nn.BatchNorm1d(D, affine=False, eps=1e-6), nn.Linear(D, info.num_classes)).to(dev)
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)

    batch = min(lin.batch_size, N)
    steps_per_epoch = N // batch  # drop_last, as the official probe's loader
    total_steps = steps_per_epoch * lin.epochs
    warmup_steps = round(lin.warmup_epochs * steps_per_epoch)
    peak_lr = lin.base_lr * lin.batch_size / 256
    if lin.optimizer == "lars":
        optimizer = LARS(head.parameters(), lr=peak_lr, weight_decay=lin.weight_decay, momentum=lin.momentum)
    else:
        optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=lin.momentum,
                                    weight_decay=lin.weight_decay)
    perm_gen = torch.Generator().manual_seed(spec.seed)

    step, top1 = 0, 0.0
    for epoch in range(lin.epochs):
        head.train()
        order = torch.randperm(N, generator=perm_gen).to(dev)  # (N,)
        loss_sum, lr = 0.0, 0.0
        for i in range(steps_per_epoch):
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, 0.0)
            for g in optimizer.param_groups:
                g["lr"] = lr
            idx = order[i * batch:(i + 1) * batch]  # (B,)
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            step += 1
        head.eval()
        with torch.no_grad():
            top1 = (head(val_x).argmax(dim=1) == val_y).float().mean().item()
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "loss": loss_sum / max(1, steps_per_epoch), "lr": lr, "top1": top1})

    return {"top1": top1, "wall_s": time.perf_counter() - t_start,
            "images_per_s": (len(train_y) + len(val_y)) / max(encode_s, 1e-9), "epochs": lin.epochs}


@torch.no_grad()
def knn_top1(model: MaskedAutoencoder, info: DatasetInfo, spec: TrialSpec, device: str, k: int = 20,
             temperature: float = 0.07, max_train: int = 10_000) -> float:
    """Weighted kNN top-1 on val (DINO): cosine similarity to at most `max_train` train features, votes exp(s/T)."""
    pool = spec.eval.linear.pool
    amp = use_bf16(spec.pretrain.amp, torch.device(device), model.config.embed_dim)
    bs = spec.eval.linear.batch_size
    train_x, train_y = extract_features(model, eval_loader(spec, info, "train", bs, max_samples=max_train),
                                        device, pool, amp)  # (Nt, D)
    val_x, val_y = extract_features(model, eval_loader(spec, info, "val", bs), device, pool, amp)  # (Nv, D)
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, len(train_y))
    correct = 0
    for i in range(0, len(val_y), 1024):
        sim = val_x[i:i + 1024] @ train_x.T  # (b, Nt) cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], info.num_classes, device=sim.device)  # (b, C)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(dim=1) == val_y[i:i + 1024]).sum().item()
    return correct / len(val_y)
