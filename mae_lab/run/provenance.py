"""How a trial ran: the code, versions, host, device and threads recorded beside its result (none of it is part
of the trial's identity)."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import timm
import torch

from mae_lab.store.tables import RUN_PROVENANCE
from mae_lab.study.identity import RunContext


@functools.lru_cache(maxsize=1)
def code_version() -> tuple[str | None, bool | None]:
    """(git commit, dirty) of the mae-lab source tree, or (None, None) outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                     ".", ":(exclude)db", ":(exclude)docs/results"],  # results, not code
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU features that make bf16 (and the studies) several times faster


def device_name(device: str) -> str:
    """The accelerator's name (CUDA), else the CPU model with what sets its speed: torch's CPU kernel level and
    the bf16 features it has, e.g. "Intel(R) Xeon(R) Processor (AVX512, avx512_bf16 amx_bf16)"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = " ".join(f for f in BF16_FLAGS if f in flags) or "no bf16 features"
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, {bf16})"


def slurm_job() -> str | None:
    """The SLURM job this process runs in: ``ARRAYJOB_TASK`` for an array task, else the job ID (None outside)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def provenance(device: str, ctx: RunContext, data_root: str | None, mlflow_run_id: str | None = None
               ) -> dict[str, Any]:
    """How a trial ran (TrialRow's provenance columns): none of it is part of its identity. ``mlflow_run_id``: its
    run in MLflow (``run.tracking``), if it is logged there."""
    commit, dirty = code_version()
    try:
        version = importlib.metadata.version("mae-lab")
    except importlib.metadata.PackageNotFoundError:
        version = None
    ran = dict(host=socket.gethostname(), git_commit=commit, git_dirty=dirty, torch_version=torch.__version__,
               timm_version=timm.__version__, mae_lab_version=version, device=device,
               device_name=device_name(device), world_size=ctx.world_size, cpu_threads=torch.get_num_threads(),
               resolved_precision=ctx.precision, data_root=data_root, data_fingerprint=ctx.fingerprint,
               slurm_job=slurm_job(), mlflow_run_id=mlflow_run_id)
    return {k: ran[k] for k in RUN_PROVENANCE}  # a column without a value here fails every trial, loudly
