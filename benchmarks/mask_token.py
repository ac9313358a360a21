"""Encoder without [M] vs with [M] (MAE paper Table 2): pretraining step wall-clock and FLOPs at 75% masking.

    python benchmarks/mask_token.py            # vit_tiny_patch4_32 and vit_small_patch4_32, batch 64, 5 rounds
    python benchmarks/mask_token.py --quick    # the same presets, batch 32, 3 rounds

One step = forward, backward and AdamW step of the whole MAE (encoder + the preset's 4-block decoder), as the paper's
Table 2 times whole training. Baseline: `mask_token_in_encoder=True` (the encoder sees all L tokens, [M] at removed
positions); candidate: the MAE default (the encoder sees the 25% kept tokens only). Both are timed interleaved in
this process, eager, fp32 unless --bf16. FLOPs from torch.utils.flop_counter (forward + backward).
"""
from __future__ import annotations

import argparse
import sys

import _bench  # noqa: F401
from _bench import header, interleaved, mae_train_step, pass_fail, table

from mae_lab.study.presets import config_from_preset
from mae_lab.train.model import encoder_flops_per_image

TARGET = 2.8


def make_step(preset: str, with_m: bool, batch: int, amp: bool):
    c = config_from_preset(preset, mask_ratio=0.75, mask_token_in_encoder=with_m)
    return (c, *mae_train_step(c, batch, amp))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--presets", default="vit_tiny_patch4_32,vit_small_patch4_32")
    p.add_argument("--batch", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    a = p.parse_args()
    batch, rounds = a.batch or (32 if a.quick else 64), a.rounds or (3 if a.quick else 5)
    header(f"encoder without [M] vs with [M], mask ratio 0.75, batch {batch}, {'bf16' if a.bf16 else 'fp32'} eager",
           "python benchmarks/mask_token.py" + (" --quick" if a.quick else ""))
    rows, ok = [], True
    for preset in a.presets.split(","):
        c, with_step, with_flops = make_step(preset, True, batch, a.bf16)
        _, wo_step, wo_flops = make_step(preset, False, batch, a.bf16)
        t = interleaved({"with": with_step, "without": wo_step}, rounds=rounds)
        speedup = t["with"] / t["without"]
        flops_ratio = with_flops() / wo_flops()
        enc_ratio = (encoder_flops_per_image(config_from_preset(preset, mask_ratio=0.0))
                     / encoder_flops_per_image(config_from_preset(preset, mask_ratio=0.75)))
        ok &= speedup >= TARGET
        rows.append([preset, f"{batch / t['with']:.1f}", f"{batch / t['without']:.1f}", f"{speedup:.2f}x",
                     f"{flops_ratio:.2f}x", f"{enc_ratio:.2f}x", pass_fail(speedup >= TARGET)])
    table(["preset", "with [M] img/s", "without img/s", "wall-clock", "step FLOPs", "encoder FLOPs",
           f">= {TARGET}x"], rows)
    print(f"RESULT encoder without [M] wall-clock speedup >= {TARGET}x on every preset: {pass_fail(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
