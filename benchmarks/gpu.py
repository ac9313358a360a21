"""One GPU, one run: mae-lab's fast MAE pretraining step against HF's ViTMAEForPreTraining (fp16 autocast eager).

    bash benchmarks/gpu.sh                        # ViT-B/16 at 224 px, batch 256 (under 8 minutes on one GPU)
    python benchmarks/gpu.py --smoke              # a 32 px toy on whatever device there is (checks the script)

mae-lab: bf16 autocast + torch.compile + fused AdamW, attention through F.scaled_dot_product_attention (flash
kernels on CUDA). HF: `ViTMAEForPreTraining` built from the identical config (random init, nothing downloaded),
fp16 autocast with a GradScaler as HF's Trainer runs `fp16=True`, eager, fused AdamW. Prints images/s, the ratio,
model FLOPs per step (torch.utils.flop_counter) and MFU against the card's dense bf16 peak (a table of known cards;
otherwise a bf16 matmul timed here). Targets: >= 1.5x HF and >= 40% MFU. Needs the `bench` extra (transformers).
"""
from __future__ import annotations

import argparse
import copy
import time

import _bench  # noqa: F401  (puts the checkout on sys.path)
import torch
from _bench import header, pass_fail, table
from pretrain_step import hf_model

from mae_lab.study.presets import config_from_preset
from mae_lab.train.common import param_groups_weight_decay
from mae_lab.train.model import MaskedAutoencoder, count_params

SPEED_TARGET, MFU_TARGET = 1.5, 0.40
DENSE_BF16_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 NVL": 835, "H100 PCIe": 756,
                     "H100": 756, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70}  # datasheet, without sparsity


def card_peak(device: torch.device) -> tuple[float, str]:
    """(dense bf16 FLOP/s, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DENSE_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"datasheet ({key})"
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t), f"measured {n}^3 bf16 matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(kind: str, model: torch.nn.Module, x: torch.Tensor, fast: bool):
    """One training step of mae-lab (bf16, compiled if `fast`) or HF (fp16 autocast + GradScaler, eager)."""
    dev = x.device
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=dev.type in ("cpu", "cuda"))
    if kind == "mae":
        fwd = torch.compile(model) if fast else model
        gen = torch.Generator(device=dev).manual_seed(0) if dev.type == "cuda" else torch.Generator().manual_seed(0)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = fwd(x, generator=gen)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    fp16 = dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=fp16)

    def step():
        with torch.autocast(dev.type, dtype=torch.float16 if fp16 else torch.bfloat16):
            loss = model(pixel_values=x).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` steps (compilation happens there)."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def step_flops(model: MaskedAutoencoder, x: torch.Tensor) -> float:
    """Forward + backward FLOPs of one mae-lab step (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as fc:
        m(x, generator=torch.Generator(device=x.device).manual_seed(0))[0].backward()
    return fc.get_total_flops()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="vit_mini_patch4_32, batch 32, few steps: checks the script")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args()
    preset = a.preset or ("vit_mini_patch4_32" if a.smoke else "mae_vit_base_patch16")
    batch = a.batch or (32 if a.smoke else 256)
    steps = a.steps or (3 if a.smoke else 30)
    warmup = 2 if a.smoke else 10
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    header(f"GPU MAE pretraining step: {preset}, batch {batch}, mask ratio 0.75, {device.type}",
           "bash benchmarks/gpu.sh" if not a.smoke else "python benchmarks/gpu.py --smoke")
    c = config_from_preset(preset)
    torch.manual_seed(0)
    mae, hf = MaskedAutoencoder(c).to(device), hf_model(c).to(device)
    print(f"parameters: mae-lab {count_params(mae):,}, HF {count_params(hf):,}")
    x = torch.randn(batch, 3, c.img_size, c.img_size, device=device)
    flops = step_flops(mae, x)
    peak, peak_src = card_peak(device)

    t_hf = time_steps(make_step("hf", hf, x, fast=False), device, warmup, steps)
    t_mae = time_steps(make_step("mae", mae, x, fast=True), device, warmup, steps)
    mfu = flops / t_mae / peak
    table(["variant", "images/s", "vs HF", "TFLOP/s", "MFU"], [
        ["HF eager fp16 autocast (baseline)", f"{batch / t_hf:.0f}", "1.00x", f"{flops / t_hf / 1e12:.1f}",
         f"{100 * flops / t_hf / peak:.0f}%"],
        ["mae-lab bf16 + compile + fused AdamW", f"{batch / t_mae:.0f}", f"{t_hf / t_mae:.2f}x",
         f"{flops / t_mae / 1e12:.1f}", f"{100 * mfu:.0f}%"]])
    print(f"model FLOPs per step {flops / 1e12:.3g} TFLOP (mae-lab's count for both); peak {peak / 1e12:.3g} "
          f"TFLOP/s dense bf16 ({peak_src})")
    speed_ok, mfu_ok = t_hf / t_mae >= SPEED_TARGET, mfu >= MFU_TARGET
    print(f"speed >= {SPEED_TARGET}x HF: {pass_fail(speed_ok)}; MFU >= {MFU_TARGET:.0%}: {pass_fail(mfu_ok)}")
    return 0 if (speed_ok and mfu_ok) or a.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
