"""Datasets: dataset.json, resolving a name or patterns to a DatasetInfo, summaries and up-front verification."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mae_lab.atomic import write_atomic
from mae_lab.data.digits import _pack_digits
from mae_lab.data.pack import _data_root
from mae_lab.data.shards import DataError, _decode, _image_size, _is_local, _label, _raw_samples, expand_shards

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's splits live and what they hold; `image_size` is (H, W) of the stored images."""

    name: str
    train: str  # brace shard pattern: absolute path or http(s) URL
    val: str
    num_train: int
    num_val: int
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------------------------------- dataset summary


def _scan(shards: list[str]) -> dict:
    """Read every sample's label and image header: counts per shard and class, image sizes."""
    per_shard, per_class, sizes = {}, Counter(), Counter()
    first_size = None
    for shard in shards:
        n = 0
        for key, files in _raw_samples(shard):
            per_class[_label(shard, key, files)] += 1
            size = _image_size(shard, key, files)
            sizes[size] += 1
            first_size = first_size or size
            n += 1
        per_shard[os.path.basename(shard)] = n
    return {"per_shard": per_shard, "per_class": per_class, "sizes": sizes, "first_size": first_size}


def dataset_info(pattern: str, *, allow_pipe: bool = False) -> dict:
    """Summary of a shard pattern (reads every sample's label and image header; decodes no pixels)."""
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    scan = _scan(shards)
    return {
        "pattern": pattern,
        "shards": len(shards),
        "samples": sum(scan["per_shard"].values()),
        "samples_per_shard": scan["per_shard"],
        "samples_per_class": dict(sorted(scan["per_class"].items())),
        "image_sizes": {f"{h}x{w}": n for (h, w), n in scan["sizes"].most_common()},
    }


# ------------------------------------------------------------------------------------------------ resolving datasets


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir or os.environ.get("MAE_LAB_CACHE") or "db/cache").resolve()


def _stats(meta: dict, name: str) -> tuple[tuple, tuple]:
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    return (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read dataset.json ({e})") from None


def _info_from_json(folder: Path, meta: dict, *, allow_pipe: bool) -> DatasetInfo:
    """DatasetInfo of a dataset folder's train split and its val split ("val", else "test")."""
    name, splits = meta.get("name", folder.name), meta.get("splits", {})
    val = "val" if "val" in splits else "test"
    for split in ("train", val):
        if split not in splits or "shards" not in splits[split] or "samples" not in splits[split]:
            raise DataError(f"{folder / 'dataset.json'}: no {split!r} split with 'shards' and 'samples'")

    def where(split: str) -> str:
        shards = splits[split]["shards"]
        return str(folder / shards) if _is_local(shards) else shards

    if not isinstance(meta.get("classes"), list):
        raise DataError(f"{folder / 'dataset.json'}: no 'classes' list")
    train, val_pattern = where("train"), where(val)
    for pattern in (train, val_pattern):
        expand_shards(pattern, allow_pipe=allow_pipe)
    size = meta.get("image_size") or _first_image_size(train, allow_pipe=allow_pipe)
    mean, std = _stats(meta, name)
    return DatasetInfo(name=name, train=train, val=val_pattern, num_train=int(splits["train"]["samples"]),
                       num_val=int(splits[val]["samples"]), classes=tuple(meta["classes"]),
                       image_size=(int(size[0]), int(size[1])), mean=mean, std=std)


def _json_beside(pattern: str) -> tuple[dict, str] | None:
    """(dataset.json, split) when the pattern is one split of a dataset.json in the shards' folder."""
    if not _is_local(pattern):
        return None
    path = Path(pattern).parent / "dataset.json"
    if not path.is_file():
        return None
    meta = _read_json(path)
    for split, entry in meta.get("splits", {}).items():
        if entry.get("shards") == os.path.basename(pattern):
            return meta, split
    return None


def _first_image_size(pattern: str, *, allow_pipe: bool) -> tuple[int, int]:
    shard = expand_shards(pattern, allow_pipe=allow_pipe)[0]
    for key, files in _raw_samples(shard):
        return _image_size(shard, key, files)
    raise DataError(f"{os.path.basename(shard)}: shard holds no samples")


def _scanned_facts(pattern: str, cache_dir, *, allow_pipe: bool) -> dict:
    """samples, num_classes and image_size of a pattern: scanned once, cached by pattern and shard sizes/mtimes."""
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    stamp = [pattern] + [(s, os.stat(s).st_size, os.stat(s).st_mtime_ns) for s in shards if _is_local(s)]
    path = _cache_root(cache_dir) / "counts" / f"{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    scan = _scan(shards)
    facts = {"pattern": pattern, "samples": sum(scan["per_shard"].values()),
             "num_classes": max(scan["per_class"], default=-1) + 1, "image_size": list(scan["first_size"] or (0, 0))}
    if facts["samples"] == 0:
        raise DataError(f"{pattern!r}: the shards hold no samples")
    write_atomic(path, json.dumps(facts))
    return facts


def _split_facts(pattern: str, cache_dir, *, allow_pipe: bool) -> tuple[str, dict, dict | None]:
    """(absolute pattern, {samples, num_classes, image_size}, the dataset.json it is a split of, or None)."""
    pattern = str(Path(pattern).resolve()) if _is_local(pattern) else pattern
    found = _json_beside(pattern)
    if found is None:
        return pattern, _scanned_facts(pattern, cache_dir, allow_pipe=allow_pipe), None
    meta, split = found
    expand_shards(pattern, allow_pipe=allow_pipe)
    size = meta.get("image_size") or _first_image_size(pattern, allow_pipe=allow_pipe)
    facts = {"samples": int(meta["splits"][split]["samples"]), "num_classes": len(meta["classes"]), "image_size": size}
    return pattern, facts, meta


def _explicit(train: str, val: str, cache_dir, *, allow_pipe: bool) -> DatasetInfo:
    """DatasetInfo of explicit patterns: facts from a dataset.json beside the shards, else from one cached scan."""
    train, train_facts, train_meta = _split_facts(train, cache_dir, allow_pipe=allow_pipe)
    val, val_facts, val_meta = _split_facts(val, cache_dir, allow_pipe=allow_pipe)
    meta = train_meta or val_meta or {}
    num_classes = max(train_facts["num_classes"], val_facts["num_classes"])
    if len(meta.get("classes", ())) == num_classes:
        classes, name = tuple(meta["classes"]), meta.get("name", "custom")
    else:
        classes, name = tuple(str(i) for i in range(num_classes)), "custom"
    mean, std = _stats(meta, name)
    size = train_facts["image_size"]
    return DatasetInfo(name=name, train=train, val=val, num_train=train_facts["samples"], num_val=val_facts["samples"],
                       classes=classes, image_size=(int(size[0]), int(size[1])), mean=mean, std=std)


def resolve_dataset(dataset: str | None = None, *, train: str | None = None, val: str | None = None,
                    data_root: str | Path | None = None, cache_dir: str | Path | None = None,
                    allow_pipe: bool = False) -> DatasetInfo:
    """A dataset name ("digits" built in; else <data_root>/<name>/dataset.json) or explicit train/val patterns."""
    if train is not None or val is not None:
        if dataset is not None:
            raise DataError(f"pass a dataset name or train/val patterns, not both (got {dataset!r} and patterns)")
        if train is None or val is None:
            raise DataError("pass both a train and a val shard pattern")
        return _explicit(train, val, cache_dir, allow_pipe=allow_pipe)
    dataset = dataset or "digits"
    if dataset == "digits":
        folder = _pack_digits(_cache_root(cache_dir))
        return _info_from_json(folder, _read_json(folder / "dataset.json"), allow_pipe=False)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise DataError(f"dataset name {dataset!r} is not valid: use letters, digits, '_', '-', '.'")
    root = _data_root(data_root)
    path = root / dataset / "dataset.json"
    if not path.is_file():
        raise DataError(f"dataset {dataset!r} not found: no {path}; fetch it with 'mae-lab data get {dataset}' or "
                        "point --data-root / MAE_LAB_DATA at a folder that has it")
    return _info_from_json(path.parent, _read_json(path), allow_pipe=allow_pipe)


# ------------------------------------------------------------------------------------------------------ verification

def verify_split(pattern: str, expected: int | None = None, *, num_classes: int | None = None,
                 cache_dir=None, allow_pipe: bool = False) -> int:
    """Read and decode every sample of a split once, before any training: a truncated tar, an undecodable image,
    a missing or non-integer label, or a count that disagrees with ``expected`` (dataset.json) raises DataError
    naming the shard and key. A local shard that passed is remembered (by path, size and mtime) under the cache,
    so the check costs a full decode only the first time. Returns the number of samples."""
    marks = _cache_root(cache_dir) / "verified"
    total = 0
    for shard in expand_shards(pattern, allow_pipe=allow_pipe):
        mark = None
        if _is_local(shard):
            st = os.stat(shard)
            ident = f"{os.path.abspath(shard)}|{st.st_size}|{st.st_mtime_ns}|{num_classes}"
            mark = marks / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")
            if mark.exists():
                total += json.loads(mark.read_text())["samples"]
                continue
        n = 0
        for key, files in _raw_samples(shard):
            _, label = _decode(shard, key, files)
            if num_classes is not None and label >= num_classes:
                raise DataError(f"{os.path.basename(shard)}: sample {key!r}: label {label} is out of range "
                                f"for {num_classes} classes")
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
