"""Which device and precision a run resolves to, asking torch only where the answer depends on the machine.

`mae-lab run --dry-run` prints the hashes `run` records, and a trial's identity holds its resolved precision. Most
answers need no torch: ``pretrain.amp`` set to "bf16" or "none", a CPU encoder narrower than 192, or a machine with
no GPU driver (torch cannot see a GPU there). Only the rest imports torch, here inside the functions, so that a dry
run of a study that needs no such answer stays as light as ``validate``.
"""
from __future__ import annotations

import os

from mae_lab.errors import BadInput

BF16_MIN_CPU_WIDTH = 192  # narrower encoders stay fp32 on CPU: the casts cost more than bf16 gains (use_bf16)
GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """False where no NVIDIA, ROCm or WSL GPU driver is installed (then torch.cuda.is_available() is False too)."""
    return any(os.path.exists(p) for p in GPU_DRIVER_PATHS)


def cuda_available() -> bool:
    if not gpu_driver_present():
        return False
    import torch  # a GPU driver is here: only torch can say whether it serves this build

    return torch.cuda.is_available()


def pick_device(device: str) -> str:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if device == "cpu":
        return device
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        raise BadInput(f"--device {device}: no CUDA device is available here (use cpu or auto)")
    if not device.startswith("cuda"):
        raise BadInput(f"--device {device}: expected cpu, cuda or auto")
    return device


def resolve_bf16(amp: str, device_type: str, embed_dim: int) -> bool:
    """Resolve ``pretrain.amp``. "auto" picks bf16 autocast where it pays: on CUDA cards with bf16, and on CPUs
    with native bf16 (AVX512-BF16 / AMX) for encoders at least 192 wide. Measured on a Zen 5 core (MAE step, batch
    128): bf16/fp32 = 0.86x at width 64, 1.11x at 128, 2.08x at 192, so narrower models stay fp32."""
    if amp != "auto":
        return amp == "bf16"
    if device_type == "cpu" and embed_dim < BF16_MIN_CPU_WIDTH:
        return False
    import torch  # the answer depends on this machine's device: ask torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return device_type == "cpu" and native
