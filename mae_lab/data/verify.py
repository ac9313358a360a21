"""Checking shards before training: checksums, a full decode once per shard (remembered under the cache), and
summaries of what a shard pattern holds."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from mae_lab.data.shards import (
    DataError,
    _image_size,
    _is_local,
    _label,
    decode_pil,
    expand_shards,
    shard_keys,
)
from mae_lab.data.stream import read_samples


def cache_root(cache_dir) -> Path:
    return Path(cache_dir or os.environ.get("MAE_LAB_CACHE") or "db/cache").resolve()


def _stamp(shard: str) -> str:
    st = os.stat(shard)
    return f"{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_sha256(shard: str, cache_dir=None) -> str:
    """sha256 of a local shard, remembered under the cache by path, size and mtime."""
    mark = cache_root(cache_dir) / "sha256" / (hashlib.sha256(_stamp(shard).encode()).hexdigest()[:32] + ".txt")
    if mark.is_file():
        return mark.read_text().strip()
    digest = file_sha256(shard)
    mark.parent.mkdir(parents=True, exist_ok=True)
    tmp = mark.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, mark)
    return digest


def verify_split(pattern: str, expected: int | None = None, *, num_classes: int | None = None,
                 sha256: dict[str, str] | None = None, label_key: str = "label", need_label: bool = True,
                 cache_dir=None, allow_pipe: bool = False) -> int:
    """Check every sample of a split once, before any training: a shard whose sha256 differs from `sha256`
    (dataset.json's, by shard file name), a cut tar, an undecodable image, a missing (where `need_label`),
    non-integer or out-of-range label, or a count that disagrees with `expected` raises DataError naming the shard
    and key. A local shard that passed is remembered (by path, size, mtime and the checks asked for) under the
    cache, so the check costs a full read only the first time. Returns the number of samples."""
    marks = cache_root(cache_dir) / "verified"
    total = 0
    for shard in expand_shards(pattern, allow_pipe=allow_pipe):
        name, mark = os.path.basename(shard), None
        want = (sha256 or {}).get(name)
        if _is_local(shard):
            ident = f"{_stamp(shard)}|{num_classes}|{want}|{label_key}|{need_label}"
            mark = marks / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")
            if mark.exists():
                total += json.loads(mark.read_text())["samples"]
                continue
            if want is not None and (got := shard_sha256(shard, cache_dir)) != want:
                raise DataError(f"{name}: checksum mismatch (sha256 {got[:12]}..., dataset.json says {want[:12]}...)")
            shard_keys(shard)  # a shard cut at a member boundary
        n = 0
        for key, files in read_samples(shard):
            _, label = decode_pil(shard, key, files, label_key=label_key, need_label=need_label)
            if num_classes is not None and label >= num_classes:
                raise DataError(f"{name}: sample {key!r}: label {label} is out of range for {num_classes} classes")
            n += 1
        total += n
        if mark is not None:
            mark.parent.mkdir(parents=True, exist_ok=True)
            tmp = mark.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"shard": shard, "samples": n}))
            os.replace(tmp, mark)
    if expected is not None and total != expected:
        raise DataError(f"{pattern}: the shards hold {total} samples but dataset.json says {expected}")
    return total


def scan(shards: list[str], *, label_key: str = "label") -> dict:
    """Read every sample's label (if any) and image header: counts per shard and class, unlabeled, image sizes."""
    per_shard: dict[str, int] = {}
    per_class: Counter[int] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    first_size, unlabeled = None, 0
    for shard in shards:
        shard_keys(shard)
        n = 0
        for key, files in read_samples(shard):
            label = _label(shard, key, files, label_key=label_key, required=False)
            if label < 0:
                unlabeled += 1
            else:
                per_class[label] += 1
            size = _image_size(shard, key, files)
            sizes[size] += 1
            first_size = first_size or size
            n += 1
        per_shard[os.path.basename(shard)] = n
    return {"per_shard": per_shard, "per_class": per_class, "sizes": sizes, "first_size": first_size,
            "unlabeled": unlabeled}


def dataset_info(pattern: str, *, label_key: str = "label", allow_pipe: bool = False) -> dict:
    """Summary of a shard pattern (reads every sample's label and image header; decodes no pixels)."""
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    found = scan(shards, label_key=label_key)
    return {
        "pattern": pattern,
        "shards": len(shards),
        "samples": sum(found["per_shard"].values()),
        "samples_per_shard": found["per_shard"],
        "samples_per_class": dict(sorted(found["per_class"].items())),
        "unlabeled": found["unlabeled"],
        "image_sizes": {f"{h}x{w}": n for (h, w), n in found["sizes"].most_common()},
    }
