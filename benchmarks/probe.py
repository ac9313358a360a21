"""Linear probe on cached features (`mae_lab.train.probe.linear_probe`) against re-encoding every epoch.

    python benchmarks/probe.py            # 50 epochs, first 1024 CIFAR-10 train images, 512 val images
    python benchmarks/probe.py --quick    # 50 epochs, first 256 train images, 256 val images

Both probe the same frozen vit_mini_patch4_32 encoder (random init, seed 0) with the same recipe (BatchNorm + linear
head, SGD, warmup + cosine, the same batch order); the baseline re-encodes the train images every epoch and the val
images at every evaluation, as the official `main_linprobe.py` loop does. Run one after the other in this process.
Target: cached >= 20x faster, top-1 within noise (1 point; with identical features it is equal).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import _bench  # noqa: F401
import torch
from _bench import cifar10_info, header, pass_fail, table, uncached_linear_probe

from mae_lab.study.expand import mae_config
from mae_lab.study.presets import config_from_preset
from mae_lab.study.spec import TrialSpec
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.probe import linear_probe

TARGET, TOP1_TOL = 20.0, 0.01


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=50)
    a = p.parse_args()
    n_train, n_val = (256, 256) if a.quick else (1024, 512)
    header(f"linear probe, {a.epochs} epochs, vit_mini_patch4_32, {n_train} train / {n_val} val CIFAR-10 images",
           "python benchmarks/probe.py" + (" --quick" if a.quick else ""))
    with tempfile.TemporaryDirectory() as tmp:
        info = cifar10_info(n_val, tmp)
        spec = TrialSpec.model_validate({
            "data": {"dataset": None, "train": info.train, "val": info.val, "train_samples": n_train},
            "model": {"preset": "vit_mini_patch4_32",
                      **dataclasses.asdict(config_from_preset("vit_mini_patch4_32"))},
            "eval": {"linear": {"epochs": a.epochs, "batch_size": 128}}})
        torch.manual_seed(0)
        model = MaskedAutoencoder(mae_config(spec))
        linear_probe(spec, model, info, device="cpu")  # warm-up: decode caches, first-call costs
        cached = linear_probe(spec, model, info, device="cpu")
        uncached = uncached_linear_probe(spec, model, info)
    speedup = uncached["wall_s"] / cached["wall_s"]
    same = abs(cached["top1"] - uncached["top1"]) <= TOP1_TOL
    table(["probe", "wall s", "top-1", "speedup"],
          [["re-encode every epoch (baseline)", f"{uncached['wall_s']:.1f}", f"{100 * uncached['top1']:.2f}", "1.00x"],
           ["cached features (mae-lab)", f"{cached['wall_s']:.1f}", f"{100 * cached['top1']:.2f}", f"{speedup:.1f}x"]])
    print(f"RESULT cached probe speedup {speedup:.1f}x (target >= {TARGET:.0f}x): {pass_fail(speedup >= TARGET)}")
    print(f"RESULT same top-1 within {100 * TOP1_TOL:.0f} point: {pass_fail(same)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
