"""mae-lab's MAE pretraining step against HF transformers' ViTMAEForPreTraining with the identical config.

    python benchmarks/pretrain_step.py            # ViT-Tiny/4 at 32 px, batch 128; compile variants; 100-step curve
    python benchmarks/pretrain_step.py --quick    # eager variants only, 20-step curve (about a minute when idle)

Baseline: HF `ViTMAEForPreTraining` (random init from a `ViTMAEConfig`, nothing downloaded), eager fp32, with the
fused AdamW that HF's Trainer uses by default on torch >= 2.8. Candidates, timed interleaved with it in this process:
mae-lab eager fp32 with the unfused AdamW it used before, eager fp32 as `pretrain.py` runs it now (fused AdamW),
bf16 autocast, and (not with --quick) torch.compile with and without bf16. One step = forward, backward, AdamW step.
Also: model FLOPs per step (torch.utils.flop_counter), achieved FLOP/s as a share of an fp32 / bf16 matmul peak
timed in the same rounds, peak memory of two steps (CPU: peak RSS growth), and a loss curve
of the fastest non-fp32-eager variant against eager fp32 from the same init on CIFAR-10 batches.
Needs the `bench` extra (transformers).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import re
import sys
from pathlib import Path

import _bench  # noqa: F401  (puts the checkout on sys.path)
import torch
from _bench import CIFAR10, header, interleaved, matmul_fn, pass_fail, table

from mae_lab.study.presets import MAEConfig, config_from_preset
from mae_lab.train.common import param_groups_weight_decay
from mae_lab.train.model import MaskedAutoencoder, count_params

FAST_TARGET, PAR_TARGET = 1.5, 0.95  # fast path vs HF; eager fp32 vs HF ("on par": within 5% timing noise)
LOSS_FINAL_TOL, LOSS_CURVE_TOL = 0.02, 0.05  # relative: mean of the last 10 steps; every 10-step moving average


def hf_model(c: MAEConfig):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(
        hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio), decoder_hidden_size=c.decoder_embed_dim,
        decoder_num_hidden_layers=c.decoder_depth, decoder_num_attention_heads=c.decoder_num_heads,
        decoder_intermediate_size=int(c.decoder_embed_dim * c.mlp_ratio), image_size=c.img_size,
        patch_size=c.patch_size, num_channels=c.in_chans, mask_ratio=c.mask_ratio, norm_pix_loss=c.norm_pix_loss,
        qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    return ViTMAEForPreTraining(cfg)


VARIANTS = {  # name: (model, amp, compile, fused AdamW)
    "hf eager fp32 (baseline)": ("hf", False, False, True),
    "mae-lab eager fp32, unfused AdamW (before)": ("mae", False, False, False),
    "mae-lab eager fp32": ("mae", False, False, True),
    "mae-lab bf16 autocast": ("mae", True, False, True),
    "mae-lab compile fp32": ("mae", False, True, True),
    "mae-lab compile + bf16": ("mae", True, True, True),
}
BASE, EAGER = "hf eager fp32 (baseline)", "mae-lab eager fp32"


def make_step(name: str, models: dict, batch: int, lr: float = 1e-4):
    """A closure doing one training step of variant `name` on a fixed batch (its own copy of the model)."""
    kind, amp, comp, fused = VARIANTS[name]
    model = copy.deepcopy(models[kind])
    model.train()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=lr, betas=(0.9, 0.95), fused=fused)
    fwd = torch.compile(model) if comp else model
    x = torch.randn(batch, 3, models["config"].img_size, models["config"].img_size)
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = fwd(x, generator=gen)[0] if kind == "mae" else fwd(pixel_values=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def build(preset: str) -> dict:
    c = config_from_preset(preset)
    torch.manual_seed(0)
    return {"config": c, "mae": MaskedAutoencoder(c), "hf": hf_model(c)}


def step_flops(models: dict, batch: int) -> dict[str, float]:
    """Forward + backward FLOPs of one step (2 per multiply-add), fp32 eager."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    x = torch.randn(batch, 3, models["config"].img_size, models["config"].img_size)
    for kind in ("mae", "hf"):
        m = copy.deepcopy(models[kind])
        with FlopCounterMode(display=False) as fc:
            loss = m(x, generator=torch.Generator().manual_seed(0))[0] if kind == "mae" else m(pixel_values=x).loss
            loss.backward()
        out[kind] = fc.get_total_flops()
    return out


def peak_memory(step) -> float | None:
    """MiB: on CPU the process's peak RSS over two steps above its RSS before them (Linux: VmHWM is reset through
    /proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step(), step()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        def vm(key: str) -> float:
            return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that this step's memory shows in RSS
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = vm("VmRSS")
        step(), step()
        return vm("VmHWM") - before
    except (OSError, AttributeError):
        return None


def cifar_batches(batch: int, n_batches: int) -> list[torch.Tensor]:
    """The first n_batches * batch CIFAR-10 train images, normalised, in fixed batches."""
    from mae_lab.data import CIFAR10_MEAN, CIFAR10_STD
    from mae_lab.data.loading import first_samples
    from mae_lab.data.transforms import ImageTransform

    meta = json.loads((CIFAR10 / "dataset.json").read_text())["splits"]["train"]
    images, _ = first_samples(str(CIFAR10 / meta["shards"]), batch * n_batches)
    x = ImageTransform(lambda im: im, CIFAR10_MEAN, CIFAR10_STD).normalize(images)
    return list(x.split(batch))


def loss_curve(name: str, models: dict, batches: list[torch.Tensor], steps: int) -> list[float]:
    """Per-step losses of `steps` steps from the shared init: warmup 10% then cosine, peak 1.5e-3 * B / 256."""
    from mae_lab.train.common import lr_at

    _, amp, comp, fused = VARIANTS[name]
    model = copy.deepcopy(models["mae"])
    peak = 1.5e-3 * batches[0].shape[0] / 256
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=peak, betas=(0.9, 0.95), fused=fused)
    fwd = torch.compile(model) if comp else model
    gen = torch.Generator().manual_seed(0)
    losses = []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, steps, max(1, steps // 10), peak, 0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = fwd(batches[s % len(batches)], generator=gen)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def moving_avg(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[i - w:i]) / w for i in range(w, len(xs) + 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="eager variants only, fewer rounds, a 20-step curve")
    p.add_argument("--preset", default="vit_tiny_patch4_32")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="loss-curve steps (default 100; 20 with --quick)")
    p.add_argument("--no-memory", action="store_true")
    a = p.parse_args()
    rounds = a.rounds or (3 if a.quick else 5)
    steps = a.steps or (20 if a.quick else 100)
    names = [n for n in VARIANTS if not (a.quick and VARIANTS[n][2])]

    header(f"MAE pretraining step: {a.preset}, batch {a.batch}, mask ratio 0.75",
           "python benchmarks/pretrain_step.py" + (" --quick" if a.quick else ""))
    models = build(a.preset)
    n_mae, n_hf = count_params(models["mae"]), count_params(models["hf"])
    print(f"parameters: mae-lab {n_mae:,}, HF {n_hf:,} ({'identical' if n_mae == n_hf else 'DIFFERENT'})")
    flops = step_flops(models, a.batch)
    fns = {n: make_step(n, models, a.batch) for n in names}
    mm32, mm32_flops = matmul_fn(torch.float32)
    mm16, mm16_flops = matmul_fn(torch.bfloat16)
    fns["matmul fp32"], fns["matmul bf16"] = mm32, mm16
    t = interleaved(fns, rounds=rounds, reps=2)
    peak32, peak16 = mm32_flops / t["matmul fp32"], mm16_flops / t["matmul bf16"]
    print(f"matmul peak (2048^3, same rounds): fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s "
          f"({peak16 / peak32:.2f}x)")

    mem = {} if a.no_memory else {n: peak_memory(fns[n]) for n in names}
    rows = []
    for n in names:
        kind, amp = VARIANTS[n][:2]
        ips = a.batch / t[n]
        achieved = flops[kind] / t[n]
        share = f"{100 * achieved / peak32:.0f}% fp32" + (f" / {100 * achieved / peak16:.0f}% bf16" if amp else "")
        m = mem.get(n)
        rows.append([n, f"{ips:.1f}", f"{t[BASE] / t[n]:.2f}x", f"{flops[kind] / 1e9:.0f}",
                     f"{achieved / 1e9:.0f}", share, f"{m:.0f}" if m is not None else "-"])
    table(["variant", "images/s", "vs HF", "GFLOP/step", "GFLOP/s", "of matmul peak", "peak MiB"], rows)

    # the default: the fastest mae-lab variant whose loss curve tracks eager fp32
    candidates = sorted((n for n in names if n not in (BASE, EAGER) and VARIANTS[n][3]), key=lambda n: t[n])
    fast = candidates[0]
    batches = cifar_batches(a.batch, min(steps, 10))
    ref = loss_curve(EAGER, models, batches, steps)
    cur = loss_curve(fast, models, batches, steps)
    final_ref, final_cur = sum(ref[-10:]) / 10, sum(cur[-10:]) / 10
    final_dev = abs(final_cur - final_ref) / final_ref
    curve_dev = max(abs(x - y) / y for x, y in zip(moving_avg(cur), moving_avg(ref)))
    loss_ok = final_dev <= LOSS_FINAL_TOL and curve_dev <= LOSS_CURVE_TOL and all(map(math.isfinite, cur))
    print(f"loss curve, {steps} steps on CIFAR-10, {fast} vs eager fp32: first {cur[0]:.4f} vs {ref[0]:.4f}, "
          f"last-10 mean {final_cur:.4f} vs {final_ref:.4f} ({100 * final_dev:.2f}%, tol {100 * LOSS_FINAL_TOL:.0f}%), "
          f"max 10-step moving-average deviation {100 * curve_dev:.2f}% (tol {100 * LOSS_CURVE_TOL:.0f}%)")
    pick = fast if loss_ok and t[fast] < t[EAGER] else EAGER
    print(f"default on this device: {pick}")

    fast_ratio, par_ratio = t[BASE] / t[pick], t[BASE] / t[EAGER]
    print(f"RESULT fast path ({pick}) vs HF eager fp32: {fast_ratio:.2f}x (target >= {FAST_TARGET}x) "
          f"{pass_fail(fast_ratio >= FAST_TARGET)}")
    print(f"RESULT loss curve tracks fp32: {pass_fail(loss_ok)}")
    print(f"RESULT mae-lab eager fp32 vs HF eager fp32: {par_ratio:.2f}x (target >= {PAR_TARGET}, on par) "
          f"{pass_fail(par_ratio >= PAR_TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
