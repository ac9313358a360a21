"""One GPU, one run: mae-lab's MAE pretraining step against HF's ViTMAEForPreTraining, offline.

    bash benchmarks/gpu_check.sh                  # preflight, CUDA tests, then this at ViT-B/16, 224 px, batch 256
    python benchmarks/gpu.py --smoke              # a 32 px toy on whatever device there is (checks the script)

Variants, each timed on its own and printed (and appended to --json) as soon as it is timed, so a variant that fails
leaves the others' numbers: HF `ViTMAEForPreTraining` (built from the identical config, random init, nothing
downloaded, `attn_implementation="sdpa"` pinned and printed) with fp16 autocast + GradScaler as HF's Trainer runs
`fp16=True` (the baseline), with bf16 autocast, and with bf16 + torch.compile; mae-lab with bf16 autocast, eager
and compiled, its masks drawn on the CPU for the batch and moved once, as `pretrain.py` does. Every variant uses
fused AdamW. MFU: model FLOPs per step (torch.utils.flop_counter, mae-lab's count for every variant) against the
card's datasheet dense bf16 peak and against a measured 8192^3 bf16 matmul. Targets: >= 1.5x HF fp16, >= 1.2x HF
bf16, >= 40% MFU (datasheet). Without transformers the HF variants are skipped and said so.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lent card has no network: never try the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import _bench  # noqa: E402,F401  (puts the checkout on sys.path)
import torch  # noqa: E402
from _bench import header, pass_fail  # noqa: E402

from mae_lab.study.presets import MAEConfig, config_from_preset  # noqa: E402
from mae_lab.train.common import allow_tf32, compile_module, param_groups_weight_decay  # noqa: E402
from mae_lab.train.model import MaskedAutoencoder, count_params  # noqa: E402
from mae_lab.train.pretrain import step_noise  # noqa: E402

TARGETS = {"hf fp16": 1.5, "hf bf16": 1.2}  # mae-lab compiled vs these baselines
MFU_TARGET = 0.40
# datasheet dense bf16 TFLOP/s (without sparsity); the longest matching key wins ("H200 NVL" before "H200")
DENSE_BF16_TFLOPS = {"H200 NVL": 835, "H200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100 SXM": 989,
                     "H100 80GB HBM3": 989, "H100": 756, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70}


def datasheet_peak(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s from the datasheet table, the key matched), or (None, why not)."""
    if device.type != "cuda":
        return None, "no datasheet figure off CUDA"
    name = torch.cuda.get_device_name(device)
    keys = sorted((k for k in DENSE_BF16_TFLOPS if k in name), key=len, reverse=True)
    return (DENSE_BF16_TFLOPS[keys[0]] * 1e12, keys[0]) if keys else (None, f"{name!r} is not in the table")


def measured_peak(device: torch.device, n: int) -> float:
    """bf16 FLOP/s of an n x n x n matmul, timed here (3 warmup, 10 timed)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_model(c: MAEConfig):
    """HF ViTMAEForPreTraining with the identical config and SDPA attention (raises ImportError without HF)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio), decoder_hidden_size=c.decoder_embed_dim,
        decoder_num_hidden_layers=c.decoder_depth, decoder_num_attention_heads=c.decoder_num_heads,
        decoder_intermediate_size=int(c.decoder_embed_dim * c.mlp_ratio), image_size=c.img_size,
        patch_size=c.patch_size, num_channels=c.in_chans, mask_ratio=c.mask_ratio, norm_pix_loss=c.norm_pix_loss,
        qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return ViTMAEForPreTraining(cfg)


def make_step(kind: str, c: MAEConfig, x: torch.Tensor, *, dtype: torch.dtype, compiled: bool, backend: str):
    """(one training step: forward, backward, fused AdamW; a note on how it runs) of a fresh model."""
    dev = x.device
    torch.manual_seed(0)
    model = (MaskedAutoencoder(c) if kind == "mae" else hf_model(c)).to(dev).train()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95),
                            fused=dev.type in ("cpu", "cuda"))
    fwd = compile_module(model, backend=backend) if compiled else model
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(0)  # CPU: the masks are drawn on the CPU, as in pretrain.py
    note = f"{count_params(model):,} params"
    if kind == "hf":
        note += f", attn_implementation={model.config._attn_implementation!r}"

    def step():
        with torch.autocast(dev.type, dtype=dtype):
            if kind == "mae":
                loss = fwd(x, noise=step_noise(c, x.shape[0], gen, dev))[0]
            else:
                loss = fwd(pixel_values=x).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, note


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


def step_flops(c: MAEConfig, x: torch.Tensor) -> float:
    """Forward + backward FLOPs of one mae-lab step (2 per multiply-add), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = MaskedAutoencoder(c)
        imgs = torch.empty(x.shape)
    noise = step_noise(c, x.shape[0], torch.Generator().manual_seed(0), torch.device("meta"))
    with FlopCounterMode(display=False) as fc:
        model(imgs, noise=noise)[0].backward()
    return fc.get_total_flops()


VARIANTS = {  # name: (model, autocast dtype, compiled); the pair the targets need first, should time run out
    "hf fp16": ("hf", torch.float16, False),
    "mae-lab bf16 compiled": ("mae", torch.bfloat16, True),
    "hf bf16": ("hf", torch.bfloat16, False),
    "mae-lab bf16": ("mae", torch.bfloat16, False),
    "hf bf16 compiled": ("hf", torch.bfloat16, True),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="vit_mini_patch4_32, batch 4, 1 step: checks the script")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; eager with --smoke "
                                                   "off CUDA, which traces without generating code)")
    p.add_argument("--only", default=None, help="comma-separated variants to run (default: all)")
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per variant as it is timed")
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = a.preset or ("vit_mini_patch4_32" if a.smoke else "mae_vit_base_patch16")
    batch = a.batch or (4 if a.smoke else 256)
    steps = a.steps or (1 if a.smoke else 30)
    warmup = 1 if a.smoke else 10
    backend = a.backend or ("eager" if a.smoke and device.type != "cuda" else "inductor")
    allow_tf32(device)

    header(f"GPU MAE pretraining step: {preset}, batch {batch}, mask ratio 0.75, {device.type}, compile backend "
           f"{backend}", "python benchmarks/gpu.py" + (" --smoke" if a.smoke else ""))
    c = config_from_preset(preset)
    x = torch.randn(batch, 3, c.img_size, c.img_size, device=device)  # (B, C, H, W)
    flops = step_flops(c, x)
    sheet, sheet_src = datasheet_peak(device)
    n = 8192 if device.type == "cuda" else 512
    matmul = measured_peak(device, n)
    print(f"model FLOPs per step {flops / 1e12:.4g} TFLOP; peak dense bf16: datasheet "
          f"{'-' if sheet is None else f'{sheet / 1e12:.0f} TFLOP/s'} ({sheet_src}), measured {n}^3 matmul "
          f"{matmul / 1e12:.4g} TFLOP/s", flush=True)

    names = a.only.split(",") if a.only else list(VARIANTS)
    try:
        import transformers

        print(f"transformers {transformers.__version__} (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']})")
    except ImportError:
        print("transformers is not installed: the HF variants are skipped (pip install 'mae-lab[bench]')")
        names = [v for v in names if VARIANTS[v][0] != "hf"]
    times: dict[str, float] = {}
    print(f"  {'variant':24} {'images/s':>9} {'ms/step':>8} {'TFLOP/s':>8} {'MFU sheet':>9} {'MFU matmul':>10}  how",
          flush=True)
    for name in names:
        kind, dtype, compiled = VARIANTS[name]
        row: dict = {"variant": name, "preset": preset, "batch": batch, "device": device.type}
        try:
            step, note = make_step(kind, c, x, dtype=dtype, compiled=compiled, backend=backend)
            t = time_steps(step, device, warmup, steps)
            times[name] = t
            row.update(s_per_step=t, images_per_s=batch / t, tflops=flops / t / 1e12, note=note,
                       mfu_datasheet=None if sheet is None else flops / t / sheet, mfu_matmul=flops / t / matmul)
            mfu_sheet = "-" if sheet is None else f"{100 * row['mfu_datasheet']:.1f}%"
            print(f"  {name:24} {batch / t:9.1f} {1e3 * t:8.2f} {flops / t / 1e12:8.2f} {mfu_sheet:>9} "
                  f"{100 * row['mfu_matmul']:9.1f}%  {note}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing variant leaves the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"  {name:24} FAILED: {row['error']}", flush=True)
            traceback.print_exc(limit=3)
        if a.json is not None:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ok = True
    best = times.get("mae-lab bf16 compiled")
    for base, target in TARGETS.items():
        if best is not None and base in times:
            ratio = times[base] / best
            ok &= ratio >= target
            print(f"mae-lab bf16 compiled vs {base}: {ratio:.2f}x (target >= {target}x: {pass_fail(ratio >= target)})")
    if best is not None and sheet is not None:
        mfu = flops / best / sheet
        ok &= mfu >= MFU_TARGET
        print(f"MFU {100 * mfu:.1f}% of the datasheet peak (target >= {MFU_TARGET:.0%}: "
              f"{pass_fail(mfu >= MFU_TARGET)})")
    failed = [v for v in names if v not in times]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 0 if a.smoke and not failed else (0 if ok and not failed else 1)


if __name__ == "__main__":
    raise SystemExit(main())
