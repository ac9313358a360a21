"""Memory and build time of the loader's sample index on the CIFAR-10 train shards: the columnar index
(`tar_index.sample_index`, a few numpy arrays per shard) against the Python tuples it replaced.

    python benchmarks/sample_index_memory.py                      # $MAE_LAB_DATA/cifar10 or ../shared/data/cifar10
    python benchmarks/sample_index_memory.py --data DIR --rounds 5

Baseline ("tuples"): the code before the columnar index, copied here: each shard's headers grouped into a tuple of
(key, ((ext, offset, size), ...)) (what `sample_members` cached) and a list of (shard number, key, members) per
sample (what `_sample_index` built). Candidate ("columnar"): `sample_index` with its per-shard cache cleared. Both
read the headers with the same `regular_members`. Bytes per sample: tracemalloc's traced memory held by the built
index (its cache included) over the samples; peak: the most traced during the build. Build time: medians of
interleaved rounds, tracemalloc off. Worker copy: a forked child (as a DataLoader worker is) runs one gc collection,
then reads every sample of the index once (as a worker's epoch does) and collects again; the Private_Dirty bytes it
gains in between (pages copied on write by refcount and gc writes) over the samples. Linux only.
"""
from __future__ import annotations

import argparse
import gc
import glob
import os
import tracemalloc
from pathlib import Path

import _bench  # noqa: F401
from _bench import CIFAR10, header, interleaved, table

from mae_lab.data.shards import _is_meta, base_plus_ext, check_end, regular_members
from mae_lab.data.tar_index import _members_of_local_tar, sample_index

IMAGENET = 1_281_167


def old_members(path: str) -> tuple | None:
    """The per-shard value `sample_members` cached before the columnar index (`_members_of_local_tar`, copied)."""
    headers, size = list(regular_members(path, "r:")), os.stat(path).st_size
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, length in headers:
        if _is_meta(name):
            continue
        key, ext = base_plus_ext(name)
        if key is None or ext is None:
            continue
        if offset + length > size:
            return None
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        files, ext = samples[-1][1], ext.lower()
        if ext in files:
            return None
        files[ext] = offset, length
    return tuple((key, tuple((e, *where) for e, where in files.items())) for key, files in samples)


def tuples(shards: list[str]) -> tuple[list, list]:
    """(the per-shard cache, the list of (shard number, key, members)): what a process held before."""
    cache, index = [], []
    for s, shard in enumerate(shards):
        cache.append(old_members(shard))
        check_end(shard)
        index += [(s, key, members) for key, members in cache[-1]]
    return cache, index


def columnar(shards: list[str], n: int):
    """The columnar index built from scratch (its per-shard cache cleared first)."""
    _members_of_local_tar.cache_clear()
    return sample_index(shards, None, n)


def held(build) -> tuple[object, int, int]:
    """(what `build()` returns, bytes traced while it is held, peak bytes traced during the build)."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = build()
    gc.collect()
    now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, now - base, peak - base


def private_dirty() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_Dirty:"))


def worker_copy(index) -> int:
    """Bytes a forked child gains in private dirty pages by reading every sample of `index` once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read each sample as `loading.ShardSamples` does, report, exit at once
        gc.collect()  # the pages a collection dirties anyway (every tracked object's header), counted before
        before = private_dirty()
        for i in range(len(index)):
            s, key, members = index[i]
        gc.collect()
        os.write(write, str(private_dirty() - before).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return int(f.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=CIFAR10, help="a folder with cifar10-train-*.tar")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    shards = sorted(glob.glob(str(a.data / "cifar10-train-*.tar")))
    if not shards:
        raise SystemExit(f"no cifar10-train-*.tar under {a.data}")
    header("sample index memory: columnar (numpy) vs tuples", f"python benchmarks/sample_index_memory.py "
           f"--data {a.data} --rounds {a.rounds}")

    (_, old), old_bytes, old_peak = held(lambda: tuples(shards))
    n = len(old)
    new, new_bytes, new_peak = held(lambda: columnar(shards, n))
    same = new is not None and old == list(new)
    times = interleaved({"tuples": lambda: tuples(shards), "columnar": lambda: columnar(shards, n)}, rounds=a.rounds)
    can_fork = hasattr(os, "fork") and os.path.exists("/proc/self/smaps_rollup")
    copies = {"tuples": worker_copy(old), "columnar": worker_copy(new)} if can_fork else {}

    print(f"{len(shards)} shards, {n} samples; same (shard, key, members) in the same order: {same}")
    print(f"columnar arrays (nbytes): {new.nbytes / n:.1f} bytes/sample")
    rows = []
    for name, held_bytes, peak, t in (("tuples", old_bytes, old_peak, times["tuples"]),
                                      ("columnar", new_bytes, new_peak, times["columnar"])):
        copy = f"{copies[name] / n:.0f}" if copies else "n/a"
        rows.append([name, f"{held_bytes / n:.1f}", f"{held_bytes / n * IMAGENET / 1e6:.0f}",
                     f"{peak / 1e6:.1f}", copy, f"{t:.3f}"])
    table(["index", "bytes/sample", "MB at 1.28M", "peak MB", "worker copy B/sample", "build s"], rows)
    copied = f"; worker copy {copies['tuples'] / n:.0f} vs {copies['columnar'] / n:.0f} bytes/sample" if copies else ""
    print(f"ratio tuples/columnar: memory {old_bytes / new_bytes:.1f}x, peak {old_peak / new_peak:.1f}x, "
          f"build time {times['tuples'] / times['columnar']:.2f}x{copied}")


if __name__ == "__main__":
    main()
