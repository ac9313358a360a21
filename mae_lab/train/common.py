"""Training helpers shared by the pretraining, probing and fine-tuning loops: the lr schedule, global seeding,
bf16 resolution, AdamW parameter groups, batched loss read-back with divergence detection, and peak memory."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_lab.study.precision import resolve_bf16


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, stage: str = "pretraining"):
        self.step, self.loss = step, loss
        super().__init__(f"{stage} diverged at step {step}: loss is {loss} "
                         "(lower base_lr, raise warmup_epochs, or use amp='none')")


def reset_peak_memory(dev: torch.device) -> None:
    """Start a new peak-memory window (CUDA: the allocator's peak; Linux CPU: the process's peak RSS)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass  # not Linux: peak_memory_mib then reports the process's lifetime peak


def synchronize(dev: torch.device) -> None:
    """Wait for the work queued on `dev` (CUDA; elsewhere nothing is queued), so a timer reads the work done."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_memory_mib(dev: torch.device) -> float | None:
    """MiB since reset_peak_memory: CUDA max_memory_allocated, else the process's peak RSS."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    except ImportError:
        return None


LOSS_SYNC_EVERY = 50  # CUDA: micro-batches between reads of the loss (and the divergence check)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_lr: float) -> float:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then a half-cosine from `peak` to `min_lr`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def use_bf16(amp: str, device: torch.device, embed_dim: int) -> bool:
    """Resolve ``pretrain.amp`` on ``device`` (`precision.resolve_bf16`, which says when bf16 pays)."""
    return resolve_bf16(amp, device.type, embed_dim)


def use_compile(compile: bool | str, device: torch.device) -> bool:
    """Resolve ``pretrain.compile``: true or false as given; auto compiles on CUDA only."""
    return compile is True or (compile == "auto" and device.type == "cuda")


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on >= 2-D weights; none on 1-D params (norms) and biases (timm / official MAE)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def read_losses(pending: list[tuple[int, torch.Tensor]], world_size: int = 1, device: torch.device | None = None,
                stage: str = "pretraining") -> float:
    """Sum of the pending micro-batch losses (each the mean over ranks) in one host-device transfer; empties
    `pending`. Raises DivergenceError naming the first step whose loss is not finite."""
    if not pending:
        return 0.0
    t = torch.stack([loss.float() for _, loss in pending]).to(device or "cpu", torch.float64)  # (P,)
    if world_size > 1:
        dist.all_reduce(t)
        t /= world_size
    values = t.tolist()
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise DivergenceError(step, value, stage)
    pending.clear()
    return sum(values)


def allow_tf32(dev: torch.device) -> None:
    """On CUDA, let the fp32 matmuls and convolutions (the parts bf16 autocast leaves in fp32, and amp = "none")
    use TF32 tensor cores: torch's "high" precision, the setting timm's and the official MAE's training use."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def rng_state(dev: torch.device) -> dict:
    """The checkpoint's RNG states: torch's CPU state, and the CUDA state of ``dev`` alone (None off CUDA), so a
    checkpoint resumes on a machine with fewer GPUs, or none."""
    cuda = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict, dev: torch.device) -> None:
    """Set what ``rng_state`` saved. The CUDA state goes to ``dev`` when there is one on both sides; an older
    checkpoint's list (one state per GPU it saw) gives its first; a checkpoint without one (written on the CPU)
    leaves the CUDA generator as it is (every draw of a trial comes from the CPU streams)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):
        cuda = cuda[0] if cuda else None
    if cuda is not None and dev.type == "cuda":
        torch.cuda.set_rng_state(cuda, dev)


def compile_module(module: nn.Module, **kwargs) -> Callable[..., Any]:
    """``torch.compile(module)`` after ``torch._dynamo.reset()``: Dynamo keeps the graphs of every earlier model on
    the shared ``forward`` code and, past its recompile limit (8), silently runs later ones eagerly, as a search
    or study of many trials in one process would. The caller passes the masks' noise in (``pretrain.step_noise``),
    so the compiled graph holds no sampler and has no break."""
    torch._dynamo.reset()
    return torch.compile(module, **kwargs)


def all_min(n: int, world_size: int, device: torch.device) -> int:
    if world_size == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
