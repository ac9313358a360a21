"""WebDataset pipeline throughput (decoded + augmented images/s) against the pretraining step's images/s.

    python benchmarks/data.py            # 40 batches per loader, 3 rounds; vit_mini and vit_tiny steps
    python benchmarks/data.py --quick    # 12 batches per loader, 2 rounds; vit_mini step

Loaders: `make_loader` over the shared CIFAR-10 train shards with the pretraining augmentation (RandomResizedCrop +
flip, batch 128, shuffled) and 0, 1, 2 DataLoader workers; the opt-in in-memory cache (`in_memory=True`, decoded
once per process; the one-off decode is timed apart); the first-N subset loader (`data.train_samples`). The first
batch of each pass (worker start-up) is not timed. Step: forward + backward + fused AdamW at batch 128 on random
input, eager fp32 and bf16 autocast, timed in the same run. Target: every loader >= 5x the fastest step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import _bench  # noqa: F401
from _bench import CIFAR10, header, interleaved, mae_train_step, pass_fail, table

from mae_lab.data import CIFAR10_MEAN, CIFAR10_STD, load_split, make_loader, pretrain_transform
from mae_lab.loaders import MemoryLoader, first_samples
from mae_lab.presets import config_from_preset

TARGET = 5.0
BATCH = 128


def loader_rate(make, n_batches: int) -> float:
    """images/s over batches 2..n_batches+1 of a fresh loader (the first batch, with worker start-up, untimed)."""
    it = iter(make())
    next(it)
    t, n = time.perf_counter(), 0
    for _ in range(n_batches):
        x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    n_batches, rounds = (12, 2) if a.quick else (40, 3)
    presets = ["vit_mini_patch4_32"] + ([] if a.quick else ["vit_tiny_patch4_32"])
    header(f"data pipeline vs pretraining step, CIFAR-10 shards, batch {BATCH}",
           "python benchmarks/data.py" + (" --quick" if a.quick else ""))
    meta = json.loads((CIFAR10 / "dataset.json").read_text())["splits"]["train"]
    pattern, n = str(CIFAR10 / meta["shards"]), meta["samples"]
    tf = pretrain_transform("random_resized_crop", 32, CIFAR10_MEAN, CIFAR10_STD)
    t0 = time.perf_counter()
    load_split(pattern)  # the in-memory cache: decoded once per process
    decode_s = time.perf_counter() - t0
    images, labels = first_samples(pattern, n, 10_000)

    def shards(workers: int, in_memory: bool = False):
        return lambda: make_loader(pattern, num_samples=n, transform=tf, batch_size=BATCH, shuffle=True, seed=0,
                                   epoch=0, num_workers=workers, in_memory=in_memory)

    loaders = {
        "shards, 0 workers": shards(0), "shards, 1 worker": shards(1), "shards, 2 workers": shards(2),
        "in-memory cache, 0 workers": shards(0, True), "in-memory cache, 2 workers": shards(2, True),
        "first 10k subset (train_samples)": lambda: MemoryLoader(images, labels, transform=tf, batch_size=BATCH,
                                                                 shuffle=True, seed=0, epoch=0, drop_last=True),
    }
    rates = {k: [] for k in loaders}
    for _ in range(rounds):
        for k, make in loaders.items():
            rates[k].append(loader_rate(make, n_batches))
    rate = {k: statistics.median(v) for k, v in rates.items()}

    steps = {f"{p} {'bf16' if amp else 'fp32'}": mae_train_step(config_from_preset(p), BATCH, amp)[0]
             for p in presets for amp in (False, True)}
    t = interleaved(steps, rounds=3)
    step_rate = {k: BATCH / v for k, v in t.items()}
    fastest = max(step_rate, key=step_rate.get)
    print("pretraining step: " + ", ".join(f"{k} {v:.0f} images/s" for k, v in step_rate.items()))
    print(f"in-memory cache: one-off decode of {n} images in {decode_s:.1f} s")
    rows = [[k, f"{v:.0f}", f"{v / step_rate[fastest]:.1f}x", pass_fail(v >= TARGET * step_rate[fastest])]
            for k, v in rate.items()]
    table(["loader", "images/s", f"vs step ({fastest})", f">= {TARGET:.0f}x"], rows)
    ok = all(v >= TARGET * step_rate[fastest] for v in rate.values())
    print(f"RESULT every loader >= {TARGET:.0f}x the fastest step ({step_rate[fastest]:.0f} images/s): {pass_fail(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
