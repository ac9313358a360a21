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

from mae_lab import rng
from mae_lab.data import DatasetInfo
from mae_lab.study.spec import LinearSpec, TrialSpec
from mae_lab.train.common import lr_at, synchronize, use_bf16
from mae_lab.train.loaders import eval_loader
from mae_lab.train.model import MaskedAutoencoder


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
def extract_features(model: MaskedAutoencoder, loader, device: str, pool: str = "cls", amp: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of `loader` with the unmasked encoder in eval mode: (feats (N, D) float32, labels (N,)).

    pool "cls" takes the cls token after the final norm (official probe); "mean" averages the patch tokens.
    The model's train/eval mode is restored afterwards. Features stay on `device`. `on_batch(i)` follows every
    batch (the runner's heartbeat progress).
    """
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for i, (imgs, y) in enumerate(loader):
        if on_batch is not None:
            on_batch(i)
        imgs = imgs.to(dev, non_blocking=True)  # (B, C, H, W)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            x = model.forward_features(imgs)  # (B, 1+L, D)
        x = x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
        feats.append(x.float())
        labels.append(y.to(dev, non_blocking=True))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(spec: TrialSpec, model: MaskedAutoencoder, info: DatasetInfo, *, device: str,
                 on_epoch: Callable[[dict], None] | None = None, on_progress: Callable[[str], None] | None = None
                 ) -> dict:
    """Train BatchNorm1d(affine=False) + Linear on frozen features as `spec.eval.linear` says.

    Returns {"top1" (the validation split), "test_top1" (the test split; None without one), "wall_s",
    "images_per_s" (images encoded per second), "epochs"}. `on_epoch` gets {"epoch", "loss", "lr", "top1"} after
    every epoch: validation top-1 on the cached features, which costs next to nothing (the test split is read
    once, after the last epoch, and never seen by anything that selects). `on_progress` gets a note per batch
    encoded ("linear encode val 12").
    """
    t_start = time.perf_counter()
    lin = spec.eval.linear
    dev = torch.device(device)
    amp = use_bf16(spec.pretrain.amp, dev, model.config.embed_dim)
    model.to(dev)
    def encode(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        note = None if on_progress is None else (lambda i: on_progress(f"linear encode {split} {i}"))
        return extract_features(model, eval_loader(spec, info, split, lin.batch_size), device, lin.pool, amp, note)

    train_x, train_y = encode("train")  # (N, D), (N,)
    val_x, val_y = encode("val")
    synchronize(dev)
    encode_s = time.perf_counter() - t_start

    probe = LinearHead(lin, train_x.shape[1], info.num_classes, len(train_y), dev, spec.seed)
    top1 = 0.0
    for epoch in range(lin.epochs):
        loss, lr = probe.train_epoch(train_x, train_y)
        top1 = probe.top1(val_x, val_y)
        if on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "loss": loss, "lr": lr, "top1": top1})
    test_top1 = None
    if has_test_split(info):
        test_x, test_y = encode("test")  # (Nt, D), (Nt,)
        test_top1 = probe.top1(test_x, test_y)

    return {"top1": top1, "test_top1": test_top1, "wall_s": time.perf_counter() - t_start,
            "images_per_s": (len(train_y) + len(val_y)) / max(encode_s, 1e-9), "epochs": lin.epochs}


def has_test_split(info: DatasetInfo) -> bool:
    """Whether the dataset keeps a test split apart from train and val."""
    return info.test is not None


class LinearHead:
    """The probe's head, BatchNorm1d(affine=False) + Linear (official init), with its optimizer (SGD or LARS),
    per-step warmup + cosine schedule and seeded batch order (drop_last, as the official probe's loader)."""

    def __init__(self, lin: LinearSpec, dim: int, num_classes: int, num_train: int, dev: torch.device, seed: int):
        linear = nn.Linear(dim, num_classes)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)
        # init on the CPU, where the stream's generator lives (a CUDA tensor refuses a CPU generator), then move
        nn.init.trunc_normal_(linear.weight, std=0.01, generator=rng.generator(seed, "probe", "head"))
        nn.init.zeros_(linear.bias)
        self.head.to(dev)
        self.n, self.dev = num_train, dev
        self.batch = min(lin.batch_size, num_train)
        self.steps_per_epoch = num_train // self.batch
        self.total_steps = self.steps_per_epoch * lin.epochs
        self.warmup_steps = round(lin.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = lin.base_lr * lin.batch_size / 256
        self.optimizer: torch.optim.Optimizer
        if lin.optimizer == "lars":
            self.optimizer = LARS(self.head.parameters(), lr=self.peak_lr, weight_decay=lin.weight_decay,
                                  momentum=lin.momentum)
        else:
            self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.peak_lr, momentum=lin.momentum,
                                             weight_decay=lin.weight_decay)
        self.perm_gen = rng.generator(seed, "probe", "order")
        self.step = 0

    def train_epoch(self, train_x: torch.Tensor, train_y: torch.Tensor) -> tuple[float, float]:
        """One epoch over features (N, D) and labels (N,); returns (mean loss, last lr)."""
        self.head.train()
        order = torch.randperm(self.n, generator=self.perm_gen).to(self.dev)  # (N,)
        loss_sum, lr = torch.zeros((), dtype=torch.float64, device=self.dev), 0.0  # read once, after the epoch
        for i in range(self.steps_per_epoch):
            lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr, 0.0)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            idx = order[i * self.batch:(i + 1) * self.batch]  # (B,)
            loss = F.cross_entropy(self.head(train_x[idx]), train_y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double()  # no host-device sync per step
            self.step += 1
        return loss_sum.item() / max(1, self.steps_per_epoch), lr

    @torch.no_grad()
    def top1(self, val_x: torch.Tensor, val_y: torch.Tensor) -> float:
        self.head.eval()
        return (self.head(val_x).argmax(dim=1) == val_y).float().mean().item()


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
    correct = torch.zeros((), dtype=torch.int64, device=val_y.device)  # read once, after the loop
    for i in range(0, len(val_y), 1024):
        sim = val_x[i:i + 1024] @ train_x.T  # (b, Nt) cosine similarity
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sim.shape[0], info.num_classes, device=sim.device)  # (b, C)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(dim=1) == val_y[i:i + 1024]).sum()
    return correct.item() / len(val_y)
