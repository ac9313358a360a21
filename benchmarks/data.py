"""WebDataset pipeline throughput (decoded + augmented images/s) against the pretraining step's images/s, and the
shard reader against an older checkout of mae-lab.

    python benchmarks/data.py                                  # loaders vs the vit_mini and vit_tiny steps
    python benchmarks/data.py --quick                          # fewer batches and rounds; vit_mini step only
    git worktree add /tmp/data-before 620180e                  # the hand-written tar reader
    python benchmarks/data.py --before /tmp/data-before        # decode + augment images/s per process, both readers
    python benchmarks/data.py --before /tmp/data-before --workers 2   # the same through 2 DataLoader workers

Loaders: `make_loader` over the shared CIFAR-10 train shards with the pretraining augmentation (RandomResizedCrop +
flip, batch 128, shuffled) and 0, 1, 2 DataLoader workers; the in-memory cache (`in_memory=True`, decoded once per
process; the one-off decode is timed apart); the first-N subset loader (`data.train_samples`). The first batch of
each pass (worker start-up) is not timed. Step: forward + backward + fused AdamW at batch 128 on random input,
eager fp32 and bf16 autocast, timed in the same run. Target: every loader >= 5x the fastest step.

`--before DIR`: the same shard loader (0 workers: decode + augment in one process; `--workers W`: W DataLoader
workers) run by this checkout and by
the checkout in DIR, each in a fresh subprocess, alternating round by round (so load from other processes hits
both alike); medians of images/s after the first batch, and of the seconds to the first batch (the streamed loader
reads the whole split before its first shuffled batch since it serves the in-memory loader's global order).
Target: this checkout >= 0.9x of DIR's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _bench  # noqa: F401
from _bench import CIFAR10, ROOT, header, interleaved, mae_train_step, pass_fail, table

from mae_lab.data import CIFAR10_MEAN, CIFAR10_STD
from mae_lab.data.loading import MemoryLoader, first_samples, load_split, make_loader
from mae_lab.data.transforms import pretrain_transform
from mae_lab.study.presets import config_from_preset

TARGET, READER_TARGET = 5.0, 0.9
BATCH = 128

# One pass of the streaming loader, run in a subprocess against whichever checkout is first on sys.path (the API
# used, make_loader + pretrain_transform, is the same in both); prints images/s as JSON.
READER_PASS = """
import json, sys, time
import mae_lab.data
from mae_lab.data import CIFAR10_MEAN, CIFAR10_STD
from mae_lab.data.loading import make_loader
from mae_lab.data.transforms import pretrain_transform
pattern, n, batches, seed, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tf = pretrain_transform("random_resized_crop", 32, CIFAR10_MEAN, CIFAR10_STD)
t0 = time.perf_counter()
it = iter(make_loader(pattern, num_samples=n, transform=tf, batch_size=128, shuffle=True, seed=seed, epoch=0,
                      num_workers=workers))
next(it)
t, k = time.perf_counter(), 0
for _ in range(batches):
    x, _ = next(it)
    k += x.shape[0]
print(json.dumps([k / (time.perf_counter() - t), t - t0, mae_lab.data.__file__]))
"""


def loader_rate(make, n_batches: int) -> float:
    """images/s over batches 2..n_batches+1 of a fresh loader (the first batch, with worker start-up, untimed)."""
    it = iter(make())
    next(it)
    t, n = time.perf_counter(), 0
    for _ in range(n_batches):
        x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def reader_pass(checkout: str, pattern: str, n: int, batches: int, seed: int, workers: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch) of one pass in a fresh subprocess."""
    env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}
    args = [pattern, str(n), str(batches), str(seed), str(workers)]
    out = subprocess.run([sys.executable, "-c", READER_PASS, *args], env=env, cwd=checkout, capture_output=True,
                         text=True, check=True)
    rate, first_s, source = json.loads(out.stdout.strip().splitlines()[-1])
    assert source.startswith(checkout), f"{checkout}: imported {source} instead"
    return rate, first_s


def compare_readers(before: str, pattern: str, n: int, batches: int, rounds: int, workers: int) -> int:
    rates: dict[str, list[float]] = {"before": [], "after": []}
    firsts: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for which in order:
            rate, first_s = reader_pass(before if which == "before" else str(ROOT), pattern, n, batches, r, workers)
            rates[which].append(rate)
            firsts[which].append(first_s)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["after"] / med["before"]
    rows = [[f"{k} ({before if k == 'before' else ROOT})", f"{med[k]:.0f}", f"{statistics.median(firsts[k]):.1f}",
             " ".join(f"{v:.0f}" for v in rates[k])] for k in ("before", "after")]
    table(["reader", "images/s (median, after batch 1)", "s to batch 1 (median)", "rounds"], rows)
    print(f"RESULT after / before = {ratio:.2f} (target >= {READER_TARGET}): {pass_fail(ratio >= READER_TARGET)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--before", metavar="DIR", help="an older checkout to compare the shard reader with")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the --before comparison")
    a = p.parse_args()
    n_batches, rounds = (12, 2) if a.quick else (40, 3)
    meta = json.loads((CIFAR10 / "dataset.json").read_text())["splits"]["train"]
    pattern, n = str(CIFAR10 / meta["shards"]), meta["samples"]
    if a.before:
        header(f"shard reader: decode + augment images/s ({a.workers} workers, batch {BATCH}), CIFAR-10 shards",
               f"python benchmarks/data.py --before {a.before} --workers {a.workers}" + (" --quick" if a.quick else ""))
        return compare_readers(a.before, pattern, n, n_batches, 2 * rounds + 1, a.workers)
    presets = ["vit_mini_patch4_32"] + ([] if a.quick else ["vit_tiny_patch4_32"])
    header(f"data pipeline vs pretraining step, CIFAR-10 shards, batch {BATCH}",
           "python benchmarks/data.py" + (" --quick" if a.quick else ""))
    tf = pretrain_transform("random_resized_crop", 32, CIFAR10_MEAN, CIFAR10_STD)
    t0 = time.perf_counter()
    load_split(pattern)  # the in-memory cache: decoded once per process
    decode_s = time.perf_counter() - t0
    images, labels = first_samples(pattern, 10_000)

    def shards(workers: int, in_memory: bool = False):
        return lambda: make_loader(pattern, num_samples=n, transform=tf, batch_size=BATCH, shuffle=True, seed=0,
                                   epoch=0, num_workers=workers, in_memory=in_memory)

    loaders = {
        "shards, 0 workers": shards(0), "shards, 1 worker": shards(1), "shards, 2 workers": shards(2),
        "in-memory cache": shards(0, True),
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
