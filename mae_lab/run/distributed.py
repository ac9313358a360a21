"""Several processes for one trial: torchrun starts them, DistributedDataParallel trains, rank 0 alone records.

``mae-lab run STUDY --nproc N`` runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m cli run
STUDY ...``; under torchrun (``WORLD_SIZE`` > 1) the ``run`` command calls ``run_study_ddp``, and the same module
entry works with any torchrun, multi-node included. The process group is NCCL on GPUs (one per local rank) and gloo
on CPU. Rank 0 runs the ordinary study loop (claim, pretrain, evaluate, record, checkpoint: the database and the
checkpoint folder are touched by rank 0 only). Before each trial's pretraining it broadcasts the trial (spec,
dataset, checkpoint path) to the other ranks, which pretrain alongside it as their rank and then wait for the next
trial while rank 0 evaluates; an empty message ends them. Ranks read the checkpoint to resume from, so on several
machines the checkpoint folder must be shared.

The messages (and the end-of-epoch stop flag) travel on a gloo group of their own with a long timeout
(``MAE_LAB_DDP_CONTROL_TIMEOUT_S``, default 7 days): the other ranks wait there, on the CPU, while rank 0 probes and
fine-tunes for as long as it takes, and a rank that dies closes its sockets, so the waiting ranks fail at once
instead of sitting out an NCCL watchdog. Training's collectives keep ``MAE_LAB_DDP_TIMEOUT_S`` (default 7200 s).
A trial that fails on any rank under DDP (a CUDA OOM included) ends that rank's process; torchrun then stops the
others, which may be inside a collective of the failed step that no message could reach.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mae_lab.errors import BadInput
from mae_lab.run.runner import RunSummary, run_study
from mae_lab.study.planning import parse_data_override, validate_study
from mae_lab.study.spec import TrialSpec
from mae_lab.train.common import DivergenceError
from mae_lab.train.pretrain import pretrain

CONTROL_TIMEOUT_S = 7 * 24 * 3600.0  # how long the other ranks wait on the control group for rank 0


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: str  # cuda:LOCAL_RANK or cpu
    control: Any = None  # the gloo process group of the messages and stop flags (None: the default group)

    def announce(self, message: dict[str, Any] | None) -> None:
        """Rank 0: the next trial to pretrain together (None: no more)."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> dict[str, Any] | None:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def check_nproc(nproc: int, device: str) -> None:
    """ValueError when ``--nproc`` asks for more processes than there are visible GPUs on a CUDA run (one GPU per
    process; ``auto`` means CUDA when there is one)."""
    if nproc <= 1 or device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if nproc > visible:
        where = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise BadInput(f"--nproc {nproc} --device {device}: {visible} GPU(s) visible"
                       + (f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else "")
                         + "; one process per GPU: lower --nproc or use --device cpu")


def init(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment: NCCL with one GPU per local rank when CUDA is
    asked for (or 'auto' finds it), else gloo on CPU. ``MAE_LAB_DDP_TIMEOUT_S`` (default 7200) bounds how long the
    other ranks wait for rank 0, e.g. while it evaluates a trial."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    device_id = None
    if use_cuda:
        if not torch.cuda.is_available():
            raise BadInput(f"--device {device}: no CUDA device is available here (use cpu or auto)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        device_id = torch.device(device)  # binds NCCL's communicator to this rank's GPU at once
    else:
        device = "cpu"
    timeout = timedelta(seconds=float(os.environ.get("MAE_LAB_DDP_TIMEOUT_S", "7200")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, device_id=device_id)
    control_timeout = float(os.environ.get("MAE_LAB_DDP_CONTROL_TIMEOUT_S", CONTROL_TIMEOUT_S))
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout))  # every rank, same order
    return DistContext(dist.get_rank(), dist.get_world_size(), device, control)


def follow(ctx: DistContext) -> int:
    """Ranks > 0: pretrain each trial rank 0 announces, as this rank, until it announces None. Writes nothing:
    no database, no checkpoint. Returns the number of trials taken part in."""
    n = 0
    while (message := ctx.receive()) is not None:
        spec = TrialSpec.model_validate_json(message["spec_json"])
        ckpt = Path(message["ckpt"]) if message["ckpt"] else None
        try:
            pretrain(spec, message["info"], device=ctx.device, ckpt_path=ckpt, resume=True, rank=ctx.rank,
                     world_size=ctx.world_size, identity=message.get("identity"), control_group=ctx.control)
        except DivergenceError:
            pass  # every rank saw it (the loss is averaged over ranks); rank 0 records it
        n += 1
    return n


def run_study_ddp(path: str | Path, *, device: str = "auto", **kwargs: Any):
    """``runner.run_study`` on rank 0 with the other ranks following; returns its RunSummary on rank 0 and None
    elsewhere. The process group is torn down at the end."""
    ctx = init(device)
    if ctx.rank != 0:
        follow(ctx)
        summary = None
    else:
        # an exception here ends rank 0 without the closing message: torchrun then stops the other ranks, which may
        # be inside a collective of the failed pretraining that no message could reach
        summary = run_study(path, device=ctx.device, dist_ctx=ctx, **kwargs)
        ctx.announce(None)
    dist.destroy_process_group()
    return summary


def launch(nproc: int, args: list[str], command: str = "run", device: str = "auto") -> int:
    """Run ``cli COMMAND ARGS`` (run or worker) in ``nproc`` processes on this machine through torchrun; its exit
    code. ValueError (``check_nproc``) before anything starts when a CUDA run has fewer GPUs than processes."""
    check_nproc(nproc, device)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cli", command, *args]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM here: torchrun passes SIGTERM on, each process marks its trial
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise


def launch_study(nproc: int, args: list[str], study: Path, data: str | None, data_root: str | None,
                 allow_pipe: bool, allow_large_grid: bool, device: str) -> int:
    """Check the study and its data here (bad input ends before any process starts), then ``launch``."""
    validate_study(study, data_root, allow_pipe, allow_large_grid, parse_data_override(data))
    return launch(nproc, args, device=device)


def run_here(path: Path, *, data: str | None, **kwargs: Any) -> RunSummary | None:
    """Run a study in this process: as one rank of a torchrun (``WORLD_SIZE`` > 1; None on ranks > 0) or alone."""
    override = parse_data_override(data)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return run_study_ddp(path, data_override=override, **kwargs)
    return run_study(path, data_override=override, **kwargs)
