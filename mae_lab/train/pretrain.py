"""One plain MAE pretraining loop (official `main_pretrain.py` / `engine_pretrain.py` recipe).

AdamW betas (0.9, 0.95), weight decay on >= 2-D weights only, lr = base_lr * batch_size * accum_iter / 256 with a
per-step linear warmup then a half-cosine to min_lr, gradient accumulation, optional bf16 autocast and
torch.compile. Every epoch draws its randomness from named streams of (seed, epoch) (`rng.py`), and the checkpoint
written after it holds everything else (weights, optimizer, step), so a resumed run equals an uninterrupted one bit
for bit.

With `world_size` > 1 (a process group already initialised, see `distributed.py`) the model is wrapped in
DistributedDataParallel: each rank takes its share of every global batch of `batch_size * world_size` (the loaders
shard by rank), the lr is scaled by the global batch `batch_size * accum_iter * world_size`, and each rank takes its
rows of the global batch's masks (any sampling: `global_mask_noise`), so the run follows the same batches and masks
as one process with the whole batch. The loss is read back (and averaged over ranks, so all ranks see a divergence
together) after every batch on CPU and every LOSS_SYNC_EVERY batches on CUDA, to keep host-device syncs out of the
inner loop; a divergence still names the first step whose loss was not finite. Only rank 0 writes checkpoints,
probes and calls `on_epoch`, whose exception (e.g. a pruned trial) stops every rank.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mae_lab import rng
from mae_lab.data import DatasetInfo
from mae_lab.study.expand import RunContext, mae_config, pretrain_identity
from mae_lab.study.presets import MAEConfig
from mae_lab.study.spec import TrialSpec
from mae_lab.train.checkpoint import CheckpointError, commit_checkpoint, load_checkpoint, sha256_file, stage_checkpoint
from mae_lab.train.common import (
    LOSS_SYNC_EVERY,
    all_min,
    allow_tf32,
    compile_module,
    lr_at,
    param_groups_weight_decay,
    peak_memory_mib,
    read_losses,
    reset_peak_memory,
    restore_rng,
    rng_state,
    use_bf16,
    use_compile,
)
from mae_lab.train.loaders import pretrain_loader
from mae_lab.train.masking import mask_noise
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.probe import knn_top1
from mae_lab.train.probe_surface import STAGE as SURFACE
from mae_lab.train.probe_surface import probe_surface


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


def pretrain(spec: TrialSpec, info: DatasetInfo, *, device: str, ckpt_path: Path | None, resume: bool = True,
             on_epoch: Callable[[dict], None] | None = None, model: MaskedAutoencoder | None = None,
             rank: int = 0, world_size: int = 1, identity: dict | None = None,
             on_step: Callable[[int], None] | None = None, control_group: Any = None,
             on_log: Callable[[int, dict], None] | None = None, log_every: int = 20) -> PretrainResult:
    """Pretrain an MAE on `info`'s train split as `spec.pretrain` says; checkpoint and report after each epoch.

    With `resume` and an existing `ckpt_path` the run continues from it (its `identity`, ``expand.pretrain_identity``
    under the run's context, must match the one it was written with; CheckpointError names the first key that
    differs); a checkpoint that already has every epoch returns at once. The weights start from the ``init``
    streams (one per parameter name), so arms of a study share every parameter whose name and shape agree;
    `model` replaces them (``pretrain.init``: released or earlier weights). `on_step(step)` follows every
    optimizer step (the runner's heartbeat progress; it may raise to stop the run). `on_log(step, {"loss", "lr",
    "images_per_s"})` follows every `log_every`-th step (live views): the mean loss of rank 0's micro-batches and
    its throughput (all ranks' images) since the last call, read back then (a host-device sync every `log_every`).
    `rank` / `world_size`: this process in a DistributedDataParallel run (module docstring); every rank calls this
    with the same spec and checkpoint path; `control_group` (``distributed.DistContext.control``, a gloo group with a
    long timeout) carries rank 0's end-of-epoch stop flag, so the others wait there while it probes. Raises
    DivergenceError when the loss is not finite.
    """
    t_start = time.perf_counter()
    pt = spec.pretrain
    dev = torch.device(device)
    if identity is None:  # the data as the spec names it, the precision as written
        identity = pretrain_identity(spec, RunContext(world_size=world_size))
    if model is None:
        with rng.seeded(spec.seed, "init", "defaults"):  # what the official init leaves at torch's default
            model = MaskedAutoencoder(mae_config(spec))  # (the patch conv's bias: drawn first, so shared too)
        model.initialize_weights(rng.init_generators(spec.seed))
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
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        mismatch = checkpoint_mismatch(ckpt, config_dump, identity)
        if mismatch:
            raise CheckpointError(f"{ckpt_path}: {mismatch[0]}: {mismatch[1]}; delete it or run without resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, step, loss_history = ckpt["epoch"], ckpt["step"], list(ckpt["loss_history"])
        restore_rng(ckpt["rng"], dev)
        if epoch >= pt.epochs:  # nothing left to train
            return PretrainResult(model, epoch, step, time.perf_counter() - t_start, 0.0,
                                  loss_history[-1] if loss_history else None, loss_history,
                                  sha256_file(ckpt_path))

    def save(epoch_done: int) -> str | None:  # staged: ckpt_path changes only at commit(), after on_epoch recorded it
        if ckpt_path is None or rank != 0:
            return None
        return stage_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_done, "step": step,
            "rng": rng_state(dev),
            "config": config_dump, "spec": spec_dump, "identity": identity, "loss_history": loss_history,
        })

    def commit() -> None:
        if ckpt_path is not None and rank == 0:
            commit_checkpoint(ckpt_path)

    if pt.epochs == 0:  # the random-init baseline
        sha = save(0)
        commit()
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

        # find_unused_parameters costs a graph walk per step: only where a parameter gets no gradient by design
        ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=bool(model.unused_parameters()))
    fwd: Callable[..., Any] = ddp or model
    fwd = compile_module(fwd) if use_compile(pt.compile, dev) else fwd
    amp = use_bf16(pt.amp, dev, model.config.embed_dim)
    allow_tf32(dev)

    sync_every = LOSS_SYNC_EVERY if dev.type == "cuda" else 1  # on CPU reading a loss costs nothing
    reset_peak_memory(dev)
    train_s, images = 0.0, 0
    while epoch < pt.epochs:
        t_epoch = t_log = time.perf_counter()
        # on_log: rank 0's micro-batch losses and all images since the last call or the epoch's start (as a resumed
        # run starts: a logged loss is the same resumed or not)
        window: list[torch.Tensor] = []
        log_images = 0
        mask_gen = rng.generator(spec.seed, "mask", epoch)  # masking (CPU generator): the global batch's masks
        loader = pretrain_loader(spec, info, epoch, rank=rank, world_size=world_size, device=device)
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
            imgs = imgs.to(dev, non_blocking=True)  # (B, C, H, W); uint8 and pinned on CUDA
            if imgs.dtype == torch.uint8:  # normalised here, on the device: a quarter of the bytes copied
                imgs = loader.transform.normalize(imgs)
            noise = step_noise(model.config, imgs.shape[0], mask_gen, dev, rank, world_size)  # (B, L) this rank's
            last_micro = (i + 1) % pt.accum_iter == 0
            with ddp.no_sync() if ddp is not None and not last_micro else nullcontext():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss, _, _ = fwd(imgs, noise=noise)
                pending.append((step, loss.detach()))
                if on_log is not None:
                    window.append(loss.detach())
                    log_images += imgs.shape[0] * world_size
                (loss / pt.accum_iter).backward()
            if last_micro:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if on_step is not None and rank == 0:
                    on_step(step)  # progress for the heartbeat (cheap: no device sync)
                if on_log is not None and rank == 0 and step % log_every == 0:
                    mean_loss = torch.stack(window).float().mean().item()  # (waits for the device)
                    on_log(step, {"loss": mean_loss, "lr": lr,
                                  "images_per_s": log_images / max(time.perf_counter() - t_log, 1e-9)})
                    window.clear()
                    t_log, log_images = time.perf_counter(), 0  # the callback's own time is not training
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
            if spec.eval.linear.blocks:  # the probe surface: top-1 after each listed block
                metrics[SURFACE] = probe_surface(spec, model, info, device)
        sha = save(epoch)
        metrics["ckpt_sha256"] = sha
        metrics["wall_s"] = time.perf_counter() - t_start
        stop: BaseException | None = None
        if on_epoch is not None and rank == 0:
            try:
                on_epoch(metrics)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
                stop = exc
        if stop is None:  # on_epoch recorded the staged checkpoint's sha256 (a stop: settle_checkpoint decides)
            commit()
        if world_size > 1:  # rank 0 tells the others whether to go on
            flag = torch.tensor([int(stop is not None)],  # the control group is gloo (CPU); else the default group's
                                device="cpu" if control_group is not None else reduce_dev)
            dist.broadcast(flag, 0, group=control_group)
            if flag.item() and stop is None:
                break
        if stop is not None:
            raise stop

    return PretrainResult(model, epoch, step, time.perf_counter() - t_start, images / max(train_s, 1e-9),
                          loss_history[-1], loss_history, sha, peak_memory_mib(dev))


def global_mask_noise(config: MAEConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Noise (batch, L) whose official argsort masking gives exactly the masks ``config.mask_sampling`` draws for
    ``batch`` samples from ``generator`` (``masking.mask_noise``): each rank takes its rows of the global batch's, so
    the masks do not depend on the process count."""
    g = config.grid_size
    return mask_noise(config.mask_sampling, batch, g, g, config.mask_ratio, generator)  # (B, L)


def step_noise(config: MAEConfig, batch: int, generator: torch.Generator, dev: torch.device, rank: int = 0,
               world_size: int = 1) -> torch.Tensor:
    """This rank's rows (B, L) of the global batch's mask noise, on `dev`: drawn on the CPU (outside any compiled
    graph), pinned and copied once without blocking. Rank r holds samples r, r + W, ... of the global batch."""
    noise = global_mask_noise(config, batch * world_size, generator)[rank::world_size].contiguous()  # (B, L)
    if dev.type == "cuda":
        noise = noise.pin_memory()
    return noise.to(dev, non_blocking=True)


def checkpoint_mismatch(ckpt: dict, config_dump: dict, identity: dict | None) -> tuple[str, str] | None:
    """(the first key that differs, why) when a checkpoint cannot continue this pretraining, else None.

    A checkpoint stores the pretraining identity it was written for (``expand.pretrain_identity``); one written
    before identities were stored is checked by its model config alone."""
    theirs_config = ckpt.get("config") or {}
    for key in sorted(set(config_dump) | set(theirs_config)):
        if theirs_config.get(key) != config_dump.get(key):
            return f"model.{key}", f"the checkpoint was written for {theirs_config.get(key)!r}, this trial has " \
                                   f"{config_dump.get(key)!r}"
    theirs = ckpt.get("identity")
    if identity is None or theirs is None:
        return None
    for key in sorted(set(identity) | set(theirs)):
        if theirs.get(key) != identity.get(key):
            return key, f"the checkpoint was written for {theirs.get(key)!r}, this trial has {identity.get(key)!r}"
    return None
