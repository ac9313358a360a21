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
from mae_lab.study.expand import mae_config
from mae_lab.study.identity import RunContext, pretrain_identity
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
    synchronize,
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

    With `resume` and an existing `ckpt_path` the run continues from it (its `identity`, ``identity.pretrain_identity``
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
    model = model if model is not None else initial_model(spec)
    model.to(dev)

    eff_batch = pt.batch_size * pt.accum_iter * world_size  # the global batch of one optimizer step
    peak_lr = pt.base_lr * eff_batch / 256
    # fused: one kernel per step instead of ~10 ops per parameter (the same update; benchmarks/pretrain_step.py)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, pt.weight_decay), lr=peak_lr, betas=(0.9, 0.95),
                                  fused=dev.type in ("cpu", "cuda"))
    ckpt = _Checkpoints(Path(ckpt_path) if ckpt_path is not None else None, rank, model, optimizer, dev,
                        spec.model_dump(mode="json"), identity)

    epoch, step, sha = 0, 0, None
    loss_history: list[float] = []
    if ckpt.path is not None and resume and ckpt.path.exists():
        epoch, step, loss_history = ckpt.restore()
        if epoch >= pt.epochs:  # nothing left to train
            return PretrainResult(model, epoch, step, time.perf_counter() - t_start, 0.0,
                                  loss_history[-1] if loss_history else None, loss_history,
                                  sha256_file(ckpt.path))

    if pt.epochs == 0:  # the random-init baseline
        sha = ckpt.save(0, 0, [])
        ckpt.commit()
        return PretrainResult(model, 0, 0, time.perf_counter() - t_start, 0.0, None, [], sha)

    reduce_dev = dev if world_size > 1 and dist.get_backend() == "nccl" else torch.device("cpu")
    steps_per_epoch = _steps_per_epoch(spec, info, rank, world_size, reduce_dev)
    total_steps = steps_per_epoch * pt.epochs
    warmup_steps = round(pt.warmup_epochs * steps_per_epoch)
    ddp = _distributed(model, dev) if world_size > 1 else None
    module: torch.nn.Module = ddp if ddp is not None else model
    fwd: Callable[..., Any] = compile_module(module) if use_compile(pt.compile, dev) else module
    amp = use_bf16(pt.amp, dev, model.config.embed_dim)
    allow_tf32(dev)

    sync_every = LOSS_SYNC_EVERY if dev.type == "cuda" else 1  # on CPU reading a loss costs nothing
    reset_peak_memory(dev)
    train_s, images = 0.0, 0
    while epoch < pt.epochs:
        t_epoch = time.perf_counter()
        log = _LossLog(on_log if rank == 0 else None, log_every, world_size)
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
                lr = set_lr(optimizer, lr_at(step, total_steps, warmup_steps, peak_lr, pt.min_lr))
            imgs = imgs.to(dev, non_blocking=True)  # (B, C, H, W); uint8 and pinned on CUDA
            if imgs.dtype == torch.uint8:  # normalised here, on the device: a quarter of the bytes copied
                imgs = loader.transform.normalize(imgs)
            noise = step_noise(model.config, imgs.shape[0], mask_gen, dev, rank, world_size)  # (B, L) this rank's
            last_micro = (i + 1) % pt.accum_iter == 0
            with ddp.no_sync() if ddp is not None and not last_micro else nullcontext():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    loss, _, _ = fwd(imgs, noise=noise)
                pending.append((step, loss.detach()))
                log.add(loss, imgs.shape[0])
                (loss / pt.accum_iter).backward()
            if last_micro:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if on_step is not None and rank == 0:
                    on_step(step)  # progress for the heartbeat (cheap: no device sync)
                log.after_step(step, lr)
            if len(pending) >= sync_every:  # the loss is read (a host-device sync) only every sync_every batches
                loss_sum += read_losses(pending, world_size, reduce_dev)
            n_micro += 1
            n_images += imgs.shape[0] * world_size
        loss_sum += read_losses(pending, world_size, reduce_dev)
        synchronize(dev)
        epoch_s = time.perf_counter() - t_epoch
        train_s += epoch_s
        images += n_images
        epoch += 1
        loss_history.append(loss_sum / max(1, n_micro))

        # the epoch's bookkeeping: probes, the staged checkpoint, on_epoch, then commit (or stop every rank)
        metrics: dict[str, Any] = {"epoch": epoch, "loss": loss_history[-1], "lr": lr,
                   "images_per_s": n_images / epoch_s, "peak_mem_mib": peak_memory_mib(dev)}
        if rank == 0:
            metrics.update(epoch_probes(spec, model, info, device, epoch))
        sha = ckpt.save(epoch, step, loss_history)
        metrics["ckpt_sha256"] = sha
        metrics["wall_s"] = time.perf_counter() - t_start
        if _close_epoch(on_epoch if rank == 0 else None, metrics, ckpt, world_size, control_group, reduce_dev):
            break  # rank 0 stopped (and raised there)

    return PretrainResult(model, epoch, step, time.perf_counter() - t_start, images / max(train_s, 1e-9),
                          loss_history[-1], loss_history, sha, peak_memory_mib(dev))


def initial_model(spec: TrialSpec) -> MaskedAutoencoder:
    """The MAE `spec` describes, its weights drawn from the ``init`` streams (one per parameter name)."""
    with rng.seeded(spec.seed, "init", "defaults"):  # what the official init leaves at torch's default
        model = MaskedAutoencoder(mae_config(spec))  # (the patch conv's bias: drawn first, so shared too)
    model.initialize_weights(rng.init_generators(spec.seed))
    return model


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's lr to `lr`; returns it."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def epoch_probes(spec: TrialSpec, model: MaskedAutoencoder, info: DatasetInfo, device: str,
                 epoch: int) -> dict[str, Any]:
    """The probes due after `epoch` (``pretrain.probe_every``): k-NN top-1, and the probe surface when
    ``eval.linear.blocks`` lists blocks; {} when none is due."""
    pt = spec.pretrain
    if not pt.probe_every or epoch % pt.probe_every != 0:
        return {}
    metrics: dict[str, Any] = {"knn_top1": knn_top1(model, info, spec, device)}
    if spec.eval.linear.blocks:  # the probe surface: top-1 after each listed block
        metrics[SURFACE] = probe_surface(spec, model, info, device)
    return metrics


@dataclass
class _Checkpoints:
    """The checkpoint at `path` (None: none): restore, stage after each epoch, commit. Only rank 0 writes."""
    path: Path | None
    rank: int
    model: MaskedAutoencoder
    optimizer: torch.optim.Optimizer
    dev: torch.device
    spec_dump: dict
    identity: dict

    def restore(self) -> tuple[int, int, list[float]]:
        """Load weights, optimizer and RNG state from `path`; returns (epoch, step, loss_history)."""
        assert self.path is not None
        ckpt = load_checkpoint(self.path, map_location="cpu")
        mismatch = checkpoint_mismatch(ckpt, dataclasses.asdict(self.model.config), self.identity)
        if mismatch:
            raise CheckpointError(f"{self.path}: {mismatch[0]}: {mismatch[1]}; delete it or run without resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"], self.dev)
        return ckpt["epoch"], ckpt["step"], list(ckpt["loss_history"])

    def save(self, epoch_done: int, step: int, loss_history: list[float]) -> str | None:
        """Stage the state after `epoch_done` epochs; `path` changes only at commit(), after on_epoch recorded it."""
        if self.path is None or self.rank != 0:
            return None
        return stage_checkpoint(self.path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch_done,
            "step": step, "rng": rng_state(self.dev),
            "config": dataclasses.asdict(self.model.config), "spec": self.spec_dump, "identity": self.identity,
            "loss_history": loss_history,
        })

    def commit(self) -> None:
        if self.path is not None and self.rank == 0:
            commit_checkpoint(self.path)


class _LossLog:
    """`on_log`'s window: rank 0's micro-batch losses and all ranks' images since the last call or the epoch's
    start (as a resumed run starts, so a logged loss is the same resumed or not). `on_log` None: does nothing."""

    def __init__(self, on_log: Callable[[int, dict], None] | None, every: int, world_size: int):
        self.on_log, self.every, self.world_size = on_log, every, world_size
        self.losses: list[torch.Tensor] = []
        self.images, self.t = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, batch: int) -> None:
        if self.on_log is not None:
            self.losses.append(loss.detach())
            self.images += batch * self.world_size

    def after_step(self, step: int, lr: float) -> None:
        if self.on_log is None or step % self.every != 0:
            return
        mean_loss = torch.stack(self.losses).float().mean().item()  # (waits for the device)
        self.on_log(step, {"loss": mean_loss, "lr": lr,
                           "images_per_s": self.images / max(time.perf_counter() - self.t, 1e-9)})
        self.losses.clear()
        self.t, self.images = time.perf_counter(), 0  # the callback's own time is not training


def _steps_per_epoch(spec: TrialSpec, info: DatasetInfo, rank: int, world_size: int,
                     reduce_dev: torch.device) -> int:
    """Optimizer steps per epoch, the same on every rank (the fewest any rank's loader allows)."""
    pt = spec.pretrain
    micro_per_epoch = all_min(len(pretrain_loader(spec, info, 0, rank=rank, world_size=world_size)), world_size,
                              reduce_dev)
    if micro_per_epoch // pt.accum_iter == 0:
        raise ValueError(f"pretraining has no full step per epoch: {micro_per_epoch} batches of {pt.batch_size} "
                         f"with accum_iter {pt.accum_iter}; lower pretrain.batch_size")
    return micro_per_epoch // pt.accum_iter


def _distributed(model: MaskedAutoencoder, dev: torch.device) -> Any:
    """`model` wrapped in DistributedDataParallel (a process group already initialised)."""
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters costs a graph walk per step: only where a parameter gets no gradient by design
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=bool(model.unused_parameters()))


def _close_epoch(on_epoch: Callable[[dict], None] | None, metrics: dict, ckpt: _Checkpoints, world_size: int,
                 control_group: Any, reduce_dev: torch.device) -> bool:
    """Hand `metrics` to `on_epoch` (rank 0's; None on the others), then commit the staged checkpoint whose sha256
    it recorded. Returns whether rank 0 stopped; on rank 0, what `on_epoch` raised (e.g. a pruned trial) is raised
    again here once every rank knows (a stop leaves the checkpoint staged: settle_checkpoint decides)."""
    stop = _report_epoch(on_epoch, metrics)
    if stop is None:
        ckpt.commit()
    stopping = _stop_flag(stop is not None, world_size, control_group, reduce_dev)
    if stop is not None:
        raise stop
    return stopping


def _report_epoch(on_epoch: Callable[[dict], None] | None, metrics: dict) -> BaseException | None:
    """Call `on_epoch(metrics)`; returns what it raised (e.g. a pruned trial), to re-raise once every rank knows."""
    if on_epoch is None:
        return None
    try:
        on_epoch(metrics)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller, after the other ranks know
        return exc
    return None


def _stop_flag(stop: bool, world_size: int, control_group: Any, reduce_dev: torch.device) -> bool:
    """Rank 0's `stop`, broadcast to every rank (the control group is gloo (CPU); else the default group's)."""
    if world_size == 1:
        return stop
    flag = torch.tensor([int(stop)], device="cpu" if control_group is not None else reduce_dev)
    dist.broadcast(flag, 0, group=control_group)
    return bool(flag.item())


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

    A checkpoint stores the pretraining identity it was written for (``identity.pretrain_identity``); one written
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
