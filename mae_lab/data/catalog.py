"""Datasets: dataset.json, resolving a name or shard patterns (plus an optional pretraining source) to a DatasetInfo.

Splits: `train`; `val` is the dataset's own "val" split, else `val_holdout` training samples (default 10%) held
out by `val_seed`; `test` is the dataset's "test" split or None. CIFAR-10 (train/test on disk) gives 45,000 train,
5,000 val, 10,000 test; the digits keep their own train/val split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mae_lab import rng_streams
from mae_lab.atomic import write_atomic
from mae_lab.data.digits import _pack_digits, _pack_digits_unlabeled
from mae_lab.data.pack import _data_root
from mae_lab.data.shards import DataError, Subset, _image_size, _is_local, expand_shards, shard_keys
from mae_lab.data.stream import read_samples
from mae_lab.data.verify import cache_root, scan, shard_sha256, verify_split

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_HOLDOUT = 0.1  # fraction of the training split held out as val when a dataset has no val split


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's splits live and what they hold; `image_size` is (H, W) of the stored images.

    With a non-empty `holdout` (the (shard file name, key) of held-out training samples), `val` is the same pattern
    as `train`: the train split skips those samples and the val split is exactly them (`split()` says which).
    `fingerprint` is the sha256 of the data's identity (dataset.json, or the shards' checksums), never its path.
    `pretrain` is a separate pretraining source ([data] pretrain_dataset / pretrain_shards), or None: pretrain on
    `train`.
    """

    name: str
    train: str  # brace shard pattern: absolute path or http(s) URL
    val: str
    num_train: int
    num_val: int
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test: str | None = None
    num_test: int = 0
    holdout: frozenset[tuple[str, str]] = field(default=frozenset(), repr=False)
    fingerprint: str = ""
    sha256: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (shard file name, sha256) to verify
    pretrain: DatasetInfo | None = None
    allow_pipe: bool = False  # the user allowed 'pipe:' shards (--allow-pipe): the loaders, run later, may open them

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> tuple[str, int, Subset | None]:
        """(pattern, samples, subset or None) of "train", "val" or "test"."""
        held = Subset(self.holdout, keep=name == "val") if self.holdout else None
        if name == "train":
            return self.train, self.num_train, held
        if name == "val":
            return self.val, self.num_val, held
        if name == "test":
            if self.test is None:
                raise DataError(f"dataset {self.name!r} has no test split")
            return self.test, self.num_test, None
        raise DataError(f"split must be 'train', 'val' or 'test'; got {name!r}")

    @property
    def pretrain_data(self) -> DatasetInfo:
        """The dataset pretraining reads (its train split): `pretrain`, else this one."""
        return self.pretrain or self

    @property
    def pretrain_fingerprint(self) -> str:
        """sha256 of exactly what pretraining reads: the source's fingerprint and the samples held out of it."""
        src = self.pretrain_data
        held = "\n".join(f"{s}/{k}" for s, k in sorted(src.holdout))
        return hashlib.sha256(f"{src.fingerprint}\n{held}".encode()).hexdigest()


def _stats(meta: dict, name: str) -> tuple[tuple, tuple]:
    if "mean" in meta and "std" in meta:
        return tuple(meta["mean"]), tuple(meta["std"])
    return (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (IMAGENET_MEAN, IMAGENET_STD)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read dataset.json ({e})") from None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def holdout_keys(pattern: str, count: int | None, seed: int, *, allow_pipe: bool = False
                 ) -> tuple[frozenset[tuple[str, str]], int]:
    """(`count` training samples chosen by `seed`, as (shard file name, key); samples in all); None: 10%."""
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    keys = []
    for shard in shards:
        found = shard_keys(shard)
        if found is None:
            raise DataError(f"{pattern!r}: holding out a val split needs local shards (or a dataset with a val split)")
        keys += [(os.path.basename(shard), k) for k in found]
    n = len(keys)
    count = round(n * DEFAULT_HOLDOUT) if count is None else count
    if not 0 < count < n:
        raise DataError(f"data.val_holdout = {count} must be at least 1 and below the {n} samples of the training "
                        f"split {os.path.basename(pattern)}", key="data.val_holdout")
    picked = rng_streams.numpy_rng(seed, "holdout").choice(n, size=count, replace=False)  # (count,) sample indices
    return frozenset(keys[i] for i in picked), n


def _with_holdout(info: DatasetInfo, val_holdout: int | None, val_seed: int, allow_pipe: bool) -> DatasetInfo:
    held, n = holdout_keys(info.train, val_holdout, val_seed, allow_pipe=allow_pipe)
    if n != info.num_train:
        raise DataError(f"{info.train}: the shards hold {n} samples but dataset.json says {info.num_train}")
    return DatasetInfo(**{**info.__dict__, "val": info.train, "num_train": n - len(held), "num_val": len(held),
                          "holdout": held})


def _info_from_json(folder: Path, meta: dict, *, val_holdout: int | None, val_seed: int,
                    allow_pipe: bool) -> DatasetInfo:
    """DatasetInfo of a dataset folder: train, val (its own, else held out of train) and test (or None)."""
    name, splits = meta.get("name", folder.name), meta.get("splits", {})
    for split in ("train", "val", "test"):
        if split in splits and ("shards" not in splits[split] or "samples" not in splits[split]):
            raise DataError(f"{folder / 'dataset.json'}: split {split!r} needs 'shards' and 'samples'")
    if "train" not in splits:
        raise DataError(f"{folder / 'dataset.json'}: no 'train' split")
    if not isinstance(meta.get("classes", []), list):
        raise DataError(f"{folder / 'dataset.json'}: 'classes' is not a list")

    def where(split: str) -> str | None:
        if split not in splits:
            return None
        shards = splits[split]["shards"]
        pattern = str(folder / shards) if _is_local(shards) else shards
        expand_shards(pattern, allow_pipe=allow_pipe)
        return pattern

    train, val, test = where("train") or "", where("val"), where("test")  # train is there: checked above
    size = meta.get("image_size") or _first_image_size(train, allow_pipe=allow_pipe)
    mean, std = _stats(meta, name)
    count = {s: int(splits[s]["samples"]) if s in splits else 0 for s in ("train", "val", "test")}
    info = DatasetInfo(name=name, train=train, val=val or train, num_train=count["train"], num_val=count["val"],
                       classes=tuple(meta.get("classes", [])), image_size=(int(size[0]), int(size[1])), mean=mean,
                       std=std, test=test, num_test=count["test"], fingerprint=_digest(meta),
                       sha256=tuple(sorted(meta.get("sha256", {}).items())))
    if val is not None or not info.classes:  # an unlabeled dataset (pretraining only) has no val to hold out
        return info
    return _with_holdout(info, val_holdout, val_seed, allow_pipe)


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
    for key, files in read_samples(shard):
        return _image_size(shard, key, files)
    raise DataError(f"{os.path.basename(shard)}: shard holds no samples")


def _scanned_facts(pattern: str, cache_dir, *, label_key: str, allow_pipe: bool) -> dict:
    """samples, num_classes, image_size and fingerprint of a pattern: scanned once, cached by pattern and shards."""
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    stamp = [pattern, label_key] + [(s, os.stat(s).st_size, os.stat(s).st_mtime_ns) for s in shards if _is_local(s)]
    path = cache_root(cache_dir) / "counts" / f"{_digest(stamp)[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    found = scan(shards, label_key=label_key)
    sums = [(os.path.basename(s), shard_sha256(s, cache_dir) if _is_local(s) else s) for s in shards]
    facts = {"pattern": pattern, "samples": sum(found["per_shard"].values()),
             "num_classes": max(found["per_class"], default=-1) + 1, "image_size": list(found["first_size"] or (0, 0)),
             "fingerprint": _digest(sums)}
    if facts["samples"] == 0:
        raise DataError(f"{pattern!r}: the shards hold no samples")
    write_atomic(path, json.dumps(facts))
    return facts


def _split_facts(pattern: str, cache_dir, *, label_key: str, allow_pipe: bool) -> tuple[str, dict, dict | None]:
    """(absolute pattern, {samples, num_classes, image_size, fingerprint}, the dataset.json it is a split of)."""
    pattern = str(Path(pattern).resolve()) if _is_local(pattern) else pattern
    found = _json_beside(pattern)
    if found is None:
        return pattern, _scanned_facts(pattern, cache_dir, label_key=label_key, allow_pipe=allow_pipe), None
    meta, split = found
    expand_shards(pattern, allow_pipe=allow_pipe)
    size = meta.get("image_size") or _first_image_size(pattern, allow_pipe=allow_pipe)
    facts = {"samples": int(meta["splits"][split]["samples"]), "num_classes": len(meta.get("classes", [])),
             "image_size": size, "fingerprint": _digest([meta, split])}
    return pattern, facts, meta


def _explicit(train: str, val: str | None, cache_dir, *, label_key: str, allow_pipe: bool) -> DatasetInfo:
    """DatasetInfo of explicit patterns: facts from a dataset.json beside the shards, else from one cached scan."""
    train, train_facts, train_meta = _split_facts(train, cache_dir, label_key=label_key, allow_pipe=allow_pipe)
    val_facts: dict[str, Any]
    val_meta: dict | None
    val_facts, val_meta = {"samples": 0, "num_classes": 0, "fingerprint": ""}, None
    if val is not None:
        val, val_facts, val_meta = _split_facts(val, cache_dir, label_key=label_key, allow_pipe=allow_pipe)
    meta = train_meta or val_meta or {}
    num_classes = max(train_facts["num_classes"], val_facts["num_classes"])
    if len(meta.get("classes", ())) == num_classes:
        classes, name = tuple(meta.get("classes", ())), meta.get("name", "custom")
    else:
        classes, name = tuple(str(i) for i in range(num_classes)), "custom"
    mean, std = _stats(meta, name)
    size = train_facts["image_size"]
    sha256 = {**(train_meta or {}).get("sha256", {}), **(val_meta or {}).get("sha256", {})}
    return DatasetInfo(name=name, train=train, val=val or train, num_train=train_facts["samples"],
                       num_val=val_facts["samples"], classes=classes, image_size=(int(size[0]), int(size[1])),
                       mean=mean, std=std, fingerprint=_digest([train_facts["fingerprint"], val_facts["fingerprint"]]),
                       sha256=tuple(sorted(sha256.items())))


def resolve_dataset(dataset: str | None = None, *, train: str | None = None, val: str | None = None,
                    data_root: str | Path | None = None, cache_dir: str | Path | None = None,
                    allow_pipe: bool = False, val_holdout: int | None = None, val_seed: int = 0,
                    label_key: str = "label", pretrain_dataset: str | None = None,
                    pretrain_shards: str | None = None) -> DatasetInfo:
    """A dataset name ("digits" and the unlabeled "digits-unlabeled" built in; else <data_root>/<name>/dataset.json)
    or explicit train/val patterns,
    plus an optional pretraining source: another named dataset (its train split) or a pattern of (unlabeled)
    shards."""
    if train is not None or val is not None:
        if dataset is not None:
            raise DataError(f"pass a dataset name or train/val patterns, not both (got {dataset!r} and patterns)")
        if train is None or val is None:
            raise DataError("pass both a train and a val shard pattern")
        info = _explicit(train, val, cache_dir, label_key=label_key, allow_pipe=allow_pipe)
    else:
        info = _named(dataset or "digits", data_root, cache_dir, val_holdout=val_holdout, val_seed=val_seed,
                      allow_pipe=allow_pipe)
    if pretrain_dataset is not None and pretrain_shards is not None:
        raise DataError("give data.pretrain_dataset or data.pretrain_shards, not both")
    if pretrain_dataset is not None:
        source = _named(pretrain_dataset, data_root, cache_dir, val_holdout=val_holdout, val_seed=val_seed,
                        allow_pipe=allow_pipe)
        info = DatasetInfo(**{**info.__dict__, "pretrain": source})
    elif pretrain_shards is not None:
        source = _explicit(pretrain_shards, None, cache_dir, label_key=label_key, allow_pipe=allow_pipe)
        info = DatasetInfo(**{**info.__dict__, "pretrain": source})
    return info


def _named(dataset: str, data_root, cache_dir, *, val_holdout: int | None, val_seed: int,
           allow_pipe: bool) -> DatasetInfo:
    if dataset in ("digits", "digits-unlabeled"):
        pack = _pack_digits if dataset == "digits" else _pack_digits_unlabeled
        folder = pack(cache_root(cache_dir))
        return _info_from_json(folder, _read_json(folder / "dataset.json"), val_holdout=val_holdout,
                               val_seed=val_seed, allow_pipe=False)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", dataset):
        raise DataError(f"dataset name {dataset!r} is not valid: use letters, digits, '_', '-', '.'")
    path = _data_root(data_root) / dataset / "dataset.json"
    if not path.is_file():
        raise DataError(f"dataset {dataset!r} not found: no {path}; fetch it with 'mae-lab data get {dataset}', "
                        "pack it with 'mae-lab data pack', or point --data-root / MAE_LAB_DATA at a folder that has it")
    return _info_from_json(path.parent, _read_json(path), val_holdout=val_holdout, val_seed=val_seed,
                           allow_pipe=allow_pipe)


def resolve_spec_data(d, *, data_root: str | Path | None = None, cache_dir: str | Path | None = None,
                      allow_pipe: bool = False) -> DatasetInfo:
    """The DatasetInfo of a trial spec's [data] section (a `spec.DataSpec`); `allow_pipe` travels with it."""
    info = resolve_dataset(None if d.train else d.dataset, train=d.train, val=d.val, data_root=data_root,
                           cache_dir=cache_dir, allow_pipe=allow_pipe, val_holdout=d.val_holdout,
                           val_seed=d.val_seed, label_key=d.label_key, pretrain_dataset=d.pretrain_dataset,
                           pretrain_shards=d.pretrain_shards)
    if allow_pipe:
        info = replace(info, allow_pipe=True, pretrain=info.pretrain and replace(info.pretrain, allow_pipe=True))
    return info


def verify_dataset(info: DatasetInfo, *, need_label: bool = True, label_key: str = "label", cache_dir=None,
                   allow_pipe: bool = False) -> None:
    """`verify_split` every split a trial reads (checksums, counts, decoding, labels where `need_label`), before
    any training; the pretraining source's labels are never needed."""
    sha256 = dict(info.sha256)
    classes = info.num_classes if need_label else None
    check = dict(label_key=label_key, cache_dir=cache_dir, allow_pipe=allow_pipe)
    verify_split(info.train, info.num_train + (info.num_val if info.holdout else 0), num_classes=classes,
                 sha256=sha256, need_label=need_label, **check)
    if info.val != info.train:
        verify_split(info.val, info.num_val, num_classes=classes, sha256=sha256, need_label=need_label, **check)
    if info.test is not None:
        verify_split(info.test, info.num_test, num_classes=classes, sha256=sha256, need_label=need_label, **check)
    if info.pretrain is not None:
        src = info.pretrain
        verify_split(src.train, src.num_train + (src.num_val if src.holdout else 0), sha256=dict(src.sha256),
                     need_label=False, **check)
