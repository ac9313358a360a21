"""One plain MAE pretraining loop (official `main_pretrain.py` / `engine_pretrain.py` recipe).

AdamW betas (0.9, 0.95), weight decay on >= 2-D weights only, lr = base_lr * batch_size * accum_iter / 256 with a
per-step linear warmup then a half-cosine to min_lr, gradient accumulation, optional bf16 autocast and
torch.compile. Every epoch reseeds all the randomness it uses from (seed, epoch), and the checkpoint written after
it holds everything else (weights, optimizer, step), so a resumed run equals an uninterrupted one bit for bit.

With `world_size` > 1 (a process group already initialised, see `distributed.py`) the model is wrapped in
DistributedDataParallel: each rank takes its share of every global batch of `batch_size * world_size` (the loaders
shard by rank), the lr is scaled by the global batch `batch_size * accum_iter * world_size`, and with random masking
each rank takes its rows of the global batch's mask noise, so the run follows the same batches and masks as one
process with the whole batch. The loss is read back (and averaged over ranks, so all ranks see a divergence
together) after every batch on CPU and every LOSS_SYNC_EVERY batches on CUDA, to keep host-device syncs out of the
inner loop; a divergence still names the first step whose loss was not finite. Only rank 0 writes checkpoints, probes and calls `on_epoch`, whose exception (e.g. a pruned trial) stops every rank.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mae_lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from mae_lab.data import DatasetInfo
from mae_lab.expand import mae_config
from mae_lab.loaders import pretrain_loader
from mae_lab.model import MaskedAutoencoder
from mae_lab.probe import knn_top1
from mae_lab.probe_surface import STAGE as SURFACE
from mae_lab.probe_surface import probe_surface
from mae_lab.spec import TrialSpec
from mae_lab.train_utils import (
    LOSS_SYNC_EVERY,
    all_min,
    lr_at,
    param_groups_weight_decay,
    peak_memory_mib,
    read_losses,
    reset_peak_memory,
    seed_all,
    use_bf16,
)


@dataclass
class PretrainResult:
    model: MaskedAutoencoder
    epochs: int  # epochs completed (including those restored from the checkpoint)
    steps: int  # optimizer steps completed
    wall_s: float  # wall time of this call
    images_per_s: float  # training throughput of this call (0.0 when nothing was trained)
    final_loss: float | None  # mean loss of the last epoch
    loss_history: list[float]  # mean loss of every completed epoch
    ckpt_sha256: str | None  # sha256 of the checkpoint file written last (or found complete)
    peak_mem_mib: float | None = None  # peak memory while training (CUDA: allocated; CPU: process RSS); None: none


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for one (seed, epoch, stream): independent streams, a pure function of its arguments."""
    return int(np.random.SeedSequence((seed, epoch, stream)).generate_state(1, dtype=np.uint64)[0] >> 1)


def pretrain(spec: TrialSpec, info: DatasetInfo, *, device: str, ckpt_path: Path | None, resume: bool = True,
             on_epoch: Callable[[dict], None] | None = None, model: MaskedAutoencoder | None = None,
             ckpt_sha256: str | None = None, rank: int = 0, world_size: int = 1) -> PretrainResult:
    """Pretrain an MAE on `info`'s train split as `spec.pretrain` says; checkpoint and report after each epoch.

    With `resume` and an existing `ckpt_path` the run continues from it (its sha256 is checked when `ckpt_sha256`
    is given, and its config and spec must match); a checkpoint that already has every epoch returns at once.
    `model` replaces the freshly built MaskedAutoencoder (e.g. to continue from imported weights).
    `rank` / `world_size`: this process in a DistributedDataParallel run (module docstring); every rank calls this
    with the same spec and checkpoint path. Raises DivergenceError when the loss is not finite.
    """
    t_start = time.perf_counter()
    pt = spec.pretrain
    dev = torch.device(device)
    torch.manual_seed(spec.seed)
    if model is None:
        model = MaskedAutoencoder(mae_config(spec))
    model.to(dev)

    eff_batch = pt.batch_size * pt.accum_iter * world_size  # the global batch of one optimizer step
    peak_lr = pt.base_lr * eff_batch / 256
    # fused: one kernel per step instead of ~10 ops per parameter (the same update; benchmarks/pretrain_step.py)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, pt.weight_decay), lr=peak_lr, betas=(0.9, 0.95),
                                  fused=dev.type in ("cpu", "cuda"))
    spec_dump = spec.model_dump(mode="json")
    config_dump = dataclasses.asdict(model.config)

    epoch, step, loss_history, sha = 0, 0, [], None
    ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
    if ckpt_path is not None and resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, sha256=ckpt_sha256, map_location="cpu")
        if ckpt.get("config") != config_dump or _pretrain_part(ckpt.get("spec")) != _pretrain_part(spec_dump):
            raise CheckpointError(f"{ckpt_path}: was written for another model config or pretraining spec; "
                                  "delete it or run without resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, loss_history = ckpt["epoch"], ckpt["step"], list(ckpt["loss_history"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if epoch >= pt.epochs:  # nothing left to train
            return PretrainResult(model, epoch, step, time.perf_counter() - t_start, 0.0,
                                  loss_history[-1] if loss_history else None, loss_history,
                                  ckpt_sha256 or sha256_file(ckpt_path))

    def save(epoch_done: int) -> str | None:
        if ckpt_path is None or rank != 0:
            return None
        return save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_done, "step": step,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": config_dump, "spec": spec_dump, "loss_history": loss_history,
        })

    if pt.epochs == 0:  # the random-init baseline
        sha = save(0)
        return PretrainResult(model, 0, 0, time.perf_counter() - t_start, 0.0, None, [], sha)

    reduce_dev = dev if world_size > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    micro_per_epoch = all_min(len(pretrain_loader(spec, info, 0, rank=rank, world_size=world_size)), world_size,
                               reduce_dev)  # every rank takes the same number of steps
    steps_per_epoch = micro_per_epoch // pt.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"pretraining has no full step per epoch: {micro_per_epoch} batches of {pt.batch_size} "
                         f"with accum_iter {pt.accum_iter}; lower pretrain.batch_size")
    total_steps = steps_per_epoch * pt.epochs
    warmup_steps = round(pt.warmup_epochs * steps_per_epoch)
    ddp = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    fwd = ddp or model
    fwd = torch.compile(fwd) if pt.compile else fwd
    amp = use_bf16(pt.amp, dev, model.config.embed_dim)
    global_noise = world_size > 1 and model.config.mask_sampling == "random"

    sync_every = LOSS_SYNC_EVERY if dev.type == "cuda" else 1  # on CPU reading a loss costs nothing
    reset_peak_memory(dev)
    train_s, images = 0.0, 0
    while epoch < pt.epochs:
        t_epoch = time.perf_counter()
        seed_all(epoch_seed(spec.seed, epoch, 0))  # augmentation and anything else on the global RNGs
        mask_gen = torch.Generator().manual_seed(epoch_seed(spec.seed, epoch, 1))  # masking (CPU generator)
        if world_size > 1 and not global_noise:  # block / grid masking: a stream per rank
            mask_gen = torch.Generator().manual_seed(epoch_seed(spec.seed, epoch, 2 + rank))
        loader = pretrain_loader(spec, info, epoch, rank=rank, world_size=world_size)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, n_micro, n_images, lr = 0.0, 0, 0, 0.0
        pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet read back from the device
        for i, (imgs, _) in enumerate(loader):
            if i >= steps_per_epoch * pt.accum_iter:
                break  # drop the micro-batches of an incomplete accumulation
            if i % pt.accum_iter == 0:  # per-step lr, a pure function of the step
                lr = lr_at(step, total_steps, warmup_steps, peak_lr, pt.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
            imgs = imgs.to(dev, non_blocking=True)  # (B, C, H, W)
            if global_noise:  # this rank's rows of the global batch's noise: rank r holds samples r, r + W, ...
                B = imgs.shape[0]
                noise = torch.rand(B * world_size, model.config.num_patches, generator=mask_gen)  # (B*W, L)
                mask_kwargs = {"noise": noise[rank::world_size].to(dev)}  # (B, L)
            else:
                mask_kwargs = {"generator": mask_gen}
            last_micro = (i + 1) % pt.accum_iter == 0
            with ddp.no_sync() if ddp is not None and not last_micro else nullcontext():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss, _, _ = fwd(imgs, **mask_kwargs)
                pending.append((step, loss.detach()))
                (loss / pt.accum_iter).backward()
            if last_micro:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            if len(pending) >= sync_every:  # the loss is read (a host-device sync) only every sync_every batches
                loss_sum += read_losses(pending, world_size, reduce_dev)
            n_micro += 1
            n_images += imgs.shape[0] * world_size
        loss_sum += read_losses(pending, world_size, reduce_dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        epoch_s = time.perf_counter() - t_epoch
        train_s += epoch_s
        images += n_images
        epoch += 1
        loss_history.append(loss_sum / max(1, n_micro))
        metrics = {"epoch": epoch, "loss": loss_history[-1], "lr": lr,
                   "images_per_s": n_images / epoch_s, "peak_mem_mib": peak_memory_mib(dev)}
        if pt.probe_every and epoch % pt.probe_every == 0 and rank == 0:
            metrics["knn_top1"] = knn_top1(model, info, spec, device)
            metrics[SURFACE] = probe_surface(spec, model, info, device)  # {} without eval.linear.blocks
        sha = save(epoch)
        metrics["ckpt_sha256"] = sha
        metrics["wall_s"] = time.perf_counter() - t_start
        stop: BaseException | None = None
        if on_epoch is not None and rank == 0:
            try:
                on_epoch(metrics)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
                stop = exc
        if world_size > 1:  # rank 0 tells the others whether to go on
            flag = torch.tensor([int(stop is not None)], device=reduce_dev)
            dist.broadcast(flag, 0)
            if flag.item() and stop is None:
                break
        if stop is not None:
            raise stop

    return PretrainResult(model, epoch, step, time.perf_counter() - t_start, images / max(train_s, 1e-9),
                          loss_history[-1], loss_history, sha, peak_memory_mib(dev))


def _pretrain_part(spec_dump: dict | None) -> dict | None:
    """The parts of a dumped spec that determine pretraining (as in expand.pretrain_hash)."""
    if spec_dump is None:
        return None
    return {k: spec_dump.get(k) for k in ("seed", "data", "model", "pretrain")}
