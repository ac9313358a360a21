"""WebDataset shards in, `(B, 3, H, W)` float batches out; plus the embedded default dataset.

A dataset is a folder with `<name>-<split>-{000000..}.tar` shards (samples `{key}.jpg|jpeg|png` + `{key}.cls`) and a
`dataset.json` (classes, image_size [H, W], splits {split: {samples, shards}}, sha256 per shard, optional mean/std).
`"digits"` (scikit-learn's bundled 8x8 digits) is packed into such a folder on first use, so everything runs offline.

Loaders read tars with a small strict reader (every error names shard and sample key, a truncated shard is an error),
shuffle with a seed derived from (seed, epoch), split work across ranks and DataLoader workers without duplicates,
and decode with PIL into uint8 tensors that the transforms augment; normalisation runs once per batch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from mae_lab.atomic import write_atomic

AUGMENTATIONS = ("none", "fixed_crop", "random_resized_crop", "rrc_color_jitter")
IMAGE_EXTS = ("jpg", "jpeg", "png")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIGITS_NUM_VAL, DIGITS_SEED = 300, 0  # fixed split of sklearn's 1,797 digits: 1,497 train / 300 val
DOWNLOADABLE = ("cifar10", "cifar100")


class DataError(ValueError):
    """Bad data or a bad data argument; the message is one line naming the pattern/shard and sample key."""


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


# ----------------------------------------------------------------------------------------------------------- patterns


def _is_url(pattern: str) -> bool:
    return pattern.startswith(("http://", "https://"))


def _is_local(pattern: str) -> bool:
    return not (_is_url(pattern) or pattern.startswith("pipe:"))


def _check_pipe(pattern: str, allow_pipe: bool) -> None:
    if pattern.startswith("pipe:") and not allow_pipe:
        raise DataError(f"refusing shard pattern {pattern!r}: 'pipe:' runs a shell command; "
                        "pass allow_pipe=True to allow it")


def expand_shards(pattern: str, *, allow_pipe: bool = False) -> list[str]:
    """Brace-expand `pattern` into shard paths/URLs; local shards must all exist."""
    import braceexpand  # a webdataset dependency

    _check_pipe(pattern, allow_pipe)
    if "://" in pattern.split(" ")[0] and not _is_url(pattern):
        raise DataError(f"unsupported shard URL {pattern!r}: use a local path, http(s):// or pipe:")
    shards = list(braceexpand.braceexpand(pattern))
    if not _is_local(pattern):
        return shards
    missing = [s for s in shards if not os.path.isfile(s)]
    if len(missing) == len(shards):
        raise DataError(f"no shards match {pattern!r}")
    if missing:
        found = len(shards) - len(missing)
        raise DataError(f"{pattern!r}: shard {missing[0]!r} is missing ({found} of {len(shards)} found)")
    return shards


# ---------------------------------------------------------------------------------------------------------- tar reading

_BLOCK = 512
_NAME_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split: key = path up to first dot


def _open_shard(shard: str) -> BinaryIO:
    """Open a local path, http(s) URL or (already allowed) pipe: command for streaming reads."""
    name = os.path.basename(shard)
    try:
        if _is_url(shard):
            import urllib.request

            return urllib.request.urlopen(shard, timeout=60)  # noqa: S310 - http(s) only, checked above
        if shard.startswith("pipe:"):
            import webdataset

            return webdataset.gopen(shard, "rb")
        return open(shard, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{name}: cannot open shard ({e})") from None


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Read n bytes unless the stream ends first."""
    buf = f.read(n)
    while len(buf) < n:
        more = f.read(n - len(buf))
        if not more:
            break
        buf += more
    return buf


def _skip(f: BinaryIO, n: int) -> bool:
    """Skip n bytes; False if the stream ended first (a seek past the end shows up at the next header read)."""
    if n > 1 << 16 and f.seekable():  # small skips: reading beats seeking a buffered file
        f.seek(n, os.SEEK_CUR)
        return True
    return len(_read_exact(f, n)) == n


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_members(f: BinaryIO, where: Callable[..., str], *, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """Yield (name, data) of each regular file in a tar stream; data None when read=False (skipped by seeking).

    Strict where tarfile is lenient: a stream that ends before the end-of-archive block is an error.
    `where(detail, member=None)` formats an error message naming the shard and the sample.
    """
    long_name, pax = None, {}
    while True:
        header = _read_exact(f, _BLOCK)
        if len(header) < _BLOCK:
            raise DataError(where("truncated tar (ends before the end-of-archive marker)"))
        if header.count(0) == _BLOCK:
            return
        stored = _tar_number(header[148:156])
        if stored != sum(header[:148]) + sum(header[156:]) + 8 * 32:
            raise DataError(where("corrupt tar header (bad checksum)"))
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        size, kind = _tar_number(header[124:136]), header[156:157]
        size = int(pax.get("size", size))
        name = long_name or pax.get("path", name)
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x", b"g"):  # GNU long name, pax header, pax global header
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise DataError(where("truncated tar (ends inside a header)"))
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax_records(data[:size])
            continue
        long_name, pax = None, {}
        if kind not in (b"0", b"\0", b"7") or not read:
            if not _skip(f, padded):
                raise DataError(where(f"truncated tar (ends inside {name!r})", name))
            if kind in (b"0", b"\0", b"7"):
                yield name, None
            continue
        data = _read_exact(f, padded)
        if len(data) < padded:
            raise DataError(where(f"truncated tar (ends inside {name!r})", name))
        yield name, data[:size]


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        pos += length
    return out


def _raw_samples(shard: str, *, read: bool = True) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Yield (key, {ext: bytes}) for each sample of a shard, grouping consecutive files that share a key."""
    name = os.path.basename(shard)
    key, files = None, {}

    def where(detail: str, member: str | None = None) -> str:
        m = _NAME_RE.match(member or "")
        k = m.group(1) if m else key
        return f"{name}: sample {k!r}: {detail}" if k is not None else f"{name}: {detail} at the start of the shard"

    with _open_shard(shard) as f:
        for path, data in _tar_members(f, where, read=read):
            m = _NAME_RE.match(path)
            if m is None:
                continue  # a directory-like or extension-less entry: not part of any sample
            k, ext = m.group(1), m.group(2).lower()
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            if ext in files:
                raise DataError(where(f"duplicate file {path!r}"))
            files[ext] = data
        if key is not None:
            yield key, files


def _label(shard: str, key: str, files: dict[str, bytes | None]) -> int:
    raw = files.get("cls")
    if raw is None:
        raise DataError(f"{os.path.basename(shard)}: sample {key!r}: missing label ('cls')")
    text = raw.decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{os.path.basename(shard)}: sample {key!r}: label {text[:40]!r} is not an integer") from None
    if label < 0:
        raise DataError(f"{os.path.basename(shard)}: sample {key!r}: label {label} is negative")
    return label


def _image_bytes(shard: str, key: str, files: dict[str, bytes | None]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in files:
            return files[ext]
    found = ", ".join(sorted(files)) or "nothing"
    raise DataError(f"{os.path.basename(shard)}: sample {key!r}: no image (expected jpg, jpeg or png; found {found})")


def _undecodable(shard: str, key: str, e: Exception) -> DataError:
    why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__
    return DataError(f"{os.path.basename(shard)}: sample {key!r}: image could not be decoded ({why})")


def _decode(shard: str, key: str, files: dict[str, bytes | None]) -> tuple[Tensor, int]:
    """Raw sample -> (uint8 image (3, H, W), label)."""
    from PIL import Image

    label, data = _label(shard, key, files), _image_bytes(shard, key, files)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # (H, W, 3)
    except Exception as e:  # PIL raises many types for bad data
        raise _undecodable(shard, key, e) from None
    return torch.from_numpy(arr).permute(2, 0, 1), label


def _image_size(shard: str, key: str, files: dict[str, bytes | None]) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(_image_bytes(shard, key, files))) as im:
            return im.height, im.width
    except DataError:
        raise
    except Exception as e:
        raise _undecodable(shard, key, e) from None


@functools.lru_cache(maxsize=4096)
def _count_local_shard(path: str, size: int, mtime_ns: int) -> int:
    """Samples in a local shard, from tar headers only (size/mtime make the cache key)."""
    return sum(1 for _ in _raw_samples(path, read=False))


def _shard_count(shard: str) -> int | None:
    """Samples in a shard if it is a local file (cheap header scan), else None."""
    if not _is_local(shard):
        return None
    st = os.stat(shard)
    return _count_local_shard(os.path.abspath(shard), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class ImageTransform:
    """uint8 image (3, H, W) -> float (3, S, S): `augment` (uint8 -> uint8, per image), then `normalize`.

    Loaders call `augment` per image and `normalize` once per batch (vectorised); calling the object does both.
    """

    augment: Callable[[Tensor], Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) -> float32 (..., 3, H, W), (x / 255 - mean) / std."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1) * 255
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1) * 255
        return (x.float() - mean) / std

    def __call__(self, img) -> Tensor:
        if not isinstance(img, Tensor):  # a PIL image
            from torchvision.transforms.v2.functional import pil_to_tensor

            img = pil_to_tensor(img.convert("RGB"))
        return self.normalize(self.augment(img))


def pretrain_transform(mode: str, img_size: int, mean, std) -> ImageTransform:
    """Pretraining augmentation of MAE Table 1e.

    none: resize only. fixed_crop: resize, then RandomCrop(img_size, padding=img_size // 8) + flip, i.e. the standard
    CIFAR "pad 4, crop 32" (a fixed-size crop; at ImageNet scale the paper's fixed crop is a center-size crop, which
    at 32 px would leave nothing to vary). random_resized_crop (default): RRC(scale 0.2-1, bicubic) + flip.
    rrc_color_jitter: the previous + ColorJitter(0.4, 0.4, 0.4). Flips are kept for 8x8 digits too (same code path).
    """
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    size = (img_size, img_size)
    resize = v2.Resize(size, interpolation=bicubic, antialias=True)
    rrc = v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=bicubic, antialias=True)
    steps = {
        "none": [resize],
        "fixed_crop": [resize, v2.RandomCrop(size, padding=img_size // 8), v2.RandomHorizontalFlip()],
        "random_resized_crop": [rrc, v2.RandomHorizontalFlip()],
        "rrc_color_jitter": [rrc, v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)],
    }
    if mode not in steps:
        raise DataError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return ImageTransform(v2.Compose(steps[mode]), tuple(mean), tuple(std))


def eval_transform(img_size: int, mean, std) -> ImageTransform:
    """Evaluation: resize to img_size x img_size (a no-op when already that size), then normalise."""
    from torchvision.transforms import v2

    resize = v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return ImageTransform(resize, tuple(mean), tuple(std))


# -------------------------------------------------------------------------------------------- splitting and shuffling


def _split_by_shards(num_shards: int, world_size: int, num_workers: int) -> bool:
    """Split by whole shards when every (rank, worker) can get one; else by sample index."""
    return num_shards >= world_size * max(1, num_workers)


def _rng(*seeds: int) -> np.random.Generator:
    return np.random.default_rng([int(s) for s in seeds])


def _rank_share(n: int, rank: int, world_size: int) -> int:
    """How many of indices 0..n-1 satisfy i % world_size == rank."""
    return n // world_size + (rank < n % world_size)


def _buffer_shuffle(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Approximate shuffle through a buffer of `size` items (WebDataset-style), seeded."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _TorchRng:
    """A private torch RNG stream: transforms use torch's global RNG, so swap our state in while they run."""

    def __init__(self, *seeds: int):
        seed = int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0])
        self.state = torch.Generator().manual_seed(seed).get_state()

    @contextmanager
    def active(self):
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)


@dataclass(frozen=True)
class _Failure:
    """A DataError raised inside a DataLoader worker, carried to the main process as data (one clean line)."""

    message: str


def _augment_batch(images: list[Tensor], labels: list[int], transform) -> tuple[Tensor, Tensor]:
    """uint8 images -> (B, 3, S, S) uint8 (ImageTransform: normalised later, per batch) or transform's float output."""
    step = transform.augment if isinstance(transform, ImageTransform) else transform
    return torch.stack([step(im) for im in images]), torch.tensor(labels, dtype=torch.long)


class _ShardStream(torch.utils.data.IterableDataset):
    """One epoch of one rank over shards; each DataLoader worker yields batches of its part."""

    def __init__(self, shards, *, transform, batch_size, shuffle, seed, epoch, rank, world_size, by_shards, buffer):
        super().__init__()
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.buffer = shuffle, seed, epoch, buffer
        self.rank, self.world_size, self.by_shards = rank, world_size, by_shards

    def _raw(self, worker: int, num_workers: int) -> Iterator[tuple[str, str, dict]]:
        if self.by_shards:  # fixed shard set per rank; its order changes per epoch; workers take every W-th shard
            mine = self.shards[self.rank :: self.world_size]
            if self.shuffle:
                mine = [mine[i] for i in _rng(self.seed, self.epoch, self.rank).permutation(len(mine))]
            for shard in mine[worker::num_workers]:
                for key, files in _raw_samples(shard):
                    yield shard, key, files
            return
        order = self.shards  # every reader walks all shards in the same order and keeps its sample indices
        if self.shuffle:
            order = [order[i] for i in _rng(self.seed, self.epoch).permutation(len(order))]
        i = 0
        for shard in order:
            for key, files in _raw_samples(shard):
                if i % self.world_size == self.rank and (i // self.world_size) % num_workers == worker:
                    yield shard, key, files
                i += 1

    def __iter__(self):
        worker, num_workers = _worker_slot()
        try:
            raw = self._raw(worker, num_workers)
            if self.shuffle:
                raw = _buffer_shuffle(raw, self.buffer, _rng(self.seed, self.epoch, self.rank, worker, 1))
            rng = _TorchRng(self.seed, self.epoch, self.rank, worker, 2)
            batch = []
            for item in raw:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._batch(batch, rng)
                    batch = []
            if batch:
                yield self._batch(batch, rng)
        except DataError as e:
            yield _Failure(str(e))

    def _batch(self, batch, rng: _TorchRng) -> tuple[Tensor, Tensor]:
        decoded = [_decode(shard, key, files) for shard, key, files in batch]
        with rng.active():
            return _augment_batch([im for im, _ in decoded], [y for _, y in decoded], self.transform)


class _MemoryStream(torch.utils.data.IterableDataset):
    """One epoch of one rank over decoded uint8 images: a seeded permutation, rank takes every world_size-th index."""

    def __init__(self, images, labels, *, transform, batch_size, shuffle, seed, epoch, rank, world_size):
        super().__init__()
        self.images, self.labels, self.transform, self.batch_size = images, labels, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.rank, self.world_size = shuffle, seed, epoch, rank, world_size

    def __iter__(self):
        worker, num_workers = _worker_slot()
        n = len(self.labels)
        order = _rng(self.seed, self.epoch).permutation(n) if self.shuffle else np.arange(n)
        mine = torch.from_numpy(order[self.rank :: self.world_size].copy())
        rng = _TorchRng(self.seed, self.epoch, self.rank, worker, 2)
        starts = range(worker * self.batch_size, len(mine), num_workers * self.batch_size)  # worker w: batches w::W
        for start in starts:
            idx = mine[start : start + self.batch_size]
            with rng.active():
                yield _augment_batch(list(self.images[idx]), self.labels[idx].tolist(), self.transform)


class ShardLoader:
    """Iterable of (images float (B, 3, S, S), labels long (B,)) for one epoch of one rank; `len` = its batches.

    Workers' last partial batches are merged in the main process, so the batch count is exactly
    ceil(n / batch_size) (floor with drop_last), n being this rank's samples; a mismatch with the expected count
    (stale dataset.json, short shard) raises DataError at the end of the epoch.
    """

    def __init__(self, stream, *, num_samples: int, exact: bool, batch_size: int, num_workers: int, drop_last: bool,
                 transform, split: str):
        self.stream, self.num_samples, self.exact, self.batch_size = stream, num_samples, exact, batch_size
        self.num_workers, self.drop_last, self.transform, self.split = num_workers, drop_last, transform, split

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        source = self.stream
        if self.num_workers > 0:
            source = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                                 pin_memory=torch.cuda.is_available())  # for non_blocking copies
        pending, seen = [], 0
        for item in source:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            seen += len(item[1])
            if len(item[1]) == self.batch_size:
                yield self._finish(*item)
            else:
                pending.append(item)
        if pending:
            x, y = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            for start in range(0, len(y), self.batch_size):
                if len(y) - start >= self.batch_size or not self.drop_last:
                    yield self._finish(x[start : start + self.batch_size], y[start : start + self.batch_size])
        if self.exact and seen != self.num_samples:
            raise DataError(f"expected {self.num_samples} samples for this rank, read {seen}: "
                            "is num_samples / dataset.json stale?")

    def _finish(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return (self.transform.normalize(x) if isinstance(self.transform, ImageTransform) else x), y


def make_loader(pattern: str, *, num_samples: int, transform, batch_size: int, shuffle: bool, seed: int = 0,
                epoch: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                shuffle_buffer: int = 2000, in_memory: bool = False, allow_pipe: bool = False) -> ShardLoader:
    """Loader over one epoch of `pattern` for `rank` of `world_size`; see the module docstring for the scheme.

    `transform` receives uint8 (3, H, W) tensors (an ImageTransform from pretrain/eval_transform, or any callable
    returning a float tensor). `in_memory=True` decodes the whole split once per process (`load_split`) and then
    shuffles a seeded permutation of indices (rank r takes every world_size-th), so later epochs cost no decoding.
    """
    if batch_size < 1 or num_samples < 1 or not 0 <= rank < world_size:
        raise DataError(f"{pattern!r}: need batch_size >= 1, num_samples >= 1, 0 <= rank < world_size")
    common = dict(transform=transform, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                  world_size=world_size)
    loader = dict(transform=transform, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)
    if in_memory:
        images, labels = load_split(pattern, allow_pipe=allow_pipe)
        if len(labels) != num_samples:
            raise DataError(f"{pattern!r}: num_samples is {num_samples} but the shards hold {len(labels)} samples")
        stream = _MemoryStream(images, labels, **common)
        n = _rank_share(num_samples, rank, world_size)
        return ShardLoader(stream, num_samples=n, exact=True, split="memory", **loader)
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    by_shards = _split_by_shards(len(shards), world_size, num_workers)
    n, exact = _rank_share(num_samples, rank, world_size), True
    if by_shards and world_size > 1:  # this rank's share depends on its shards' sizes: count them (tar headers)
        counts = [_shard_count(s) for s in shards]
        if None in counts:  # remote shards: assume equal shard sizes, and don't check
            n, exact = round(num_samples * len(shards[rank::world_size]) / len(shards)), False
        elif sum(counts) != num_samples:
            raise DataError(f"{pattern!r}: num_samples is {num_samples} but the shards hold {sum(counts)} samples")
        else:
            n = sum(counts[rank::world_size])
    stream = _ShardStream(shards, by_shards=by_shards, buffer=shuffle_buffer, **common)
    return ShardLoader(stream, num_samples=n, exact=exact, split="shards" if by_shards else "samples", **loader)


class _ShardDecoder(torch.utils.data.IterableDataset):
    """Decode whole shards; worker w takes shards w::W, so in-order DataLoader output keeps shard order."""

    def __init__(self, shards: list[str]):
        super().__init__()
        self.shards = shards

    def __iter__(self):
        worker, num_workers = _worker_slot()
        for shard in self.shards[worker::num_workers]:
            try:
                decoded = [_decode(shard, key, files) for key, files in _raw_samples(shard)]
            except DataError as e:
                yield _Failure(str(e))
                return
            sizes = sorted({tuple(im.shape[1:]) for im, _ in decoded})
            if len(sizes) > 1:
                yield _Failure(f"{os.path.basename(shard)}: images differ in size "
                               f"({', '.join(f'{h}x{w}' for h, w in sizes)}); the in-memory loader needs one size")
                return
            images = torch.stack([im for im, _ in decoded]) if decoded else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
            yield images, torch.tensor([y for _, y in decoded], dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _load_split_cached(pattern: str, allow_pipe: bool) -> tuple[Tensor, Tensor]:
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    workers = min(len(shards), os.cpu_count() or 1) if len(shards) > 1 else 0  # PIL decoding holds the GIL: processes
    parts = []
    for item in torch.utils.data.DataLoader(_ShardDecoder(shards), batch_size=None, num_workers=workers):
        if isinstance(item, _Failure):
            raise DataError(item.message)
        if len(item[1]):
            parts.append(item)
    if not parts:
        raise DataError(f"{pattern!r}: the shards hold no samples")
    sizes = sorted({tuple(x.shape[2:]) for x, _ in parts})
    if len(sizes) > 1:
        raise DataError(f"{pattern!r}: images differ in size ({', '.join(f'{h}x{w}' for h, w in sizes)}); "
                        "the in-memory loader needs one size")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])  # (N, 3, H, W) uint8, (N,) long


def load_split(pattern: str, *, allow_pipe: bool = False) -> tuple[Tensor, Tensor]:
    """Decode every sample of `pattern` once, in shard order: (uint8 (N, 3, H, W), long (N,)); cached per process."""
    return _load_split_cached(pattern, allow_pipe)


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


def _data_root(data_root) -> Path:
    return Path(data_root or os.environ.get("MAE_LAB_DATA") or "db/data").resolve()


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


# ------------------------------------------------------------------------------------------------------ writing shards


@contextmanager
def _atomic_dir(out: Path):
    """Yield a temp folder beside `out`, renamed to `out` on success (atomic; fails if `out` is a non-empty folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same samples give byte-identical shards
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_split(folder: Path, prefix: str, split: str, samples: list, shard_size: int,
                 read: Callable[[object], tuple[str, bytes]]) -> tuple[dict, dict[str, str]]:
    """Write (source, label) samples as `prefix-split-NNNNNN.tar` shards; `read(source)` gives (ext, bytes)."""
    num_shards = max(1, -(-len(samples) // shard_size))
    digests = {}
    for s in range(num_shards):
        path = folder / f"{prefix}-{split}-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(len(samples), (s + 1) * shard_size)):
                source, label = samples[i]
                ext, data = read(source)
                _tar_add(tar, f"{split}_{i:06d}.{ext}", data)
                _tar_add(tar, f"{split}_{i:06d}.cls", str(label).encode())
        digests[path.name] = _sha256(path)
    shards = f"{prefix}-{split}-{{000000..{num_shards - 1:06d}}}.tar"
    return {"samples": len(samples), "shards": shards}, digests


def _write_dataset(out: Path, *, name: str, classes: list[str], image_size: tuple[int, int], mean, std,
                   splits: dict[str, list], shard_size: int, read: Callable[[object], tuple[str, bytes]]) -> dict:
    """Pack splits into shards + dataset.json inside `out`, atomically; return the dataset.json dict."""
    meta = {"name": name, "classes": list(classes), "image_size": list(image_size), "splits": {}, "sha256": {},
            "mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std]}
    try:
        with _atomic_dir(out) as tmp:
            for split, samples in splits.items():
                meta["splits"][split], digests = _write_split(tmp, name, split, samples, shard_size, read)
                meta["sha256"].update(digests)
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        if (out / "dataset.json").is_file():
            raise FileExistsError(str(out)) from e  # someone else finished first (or it existed already)
        raise DataError(f"cannot write dataset to {out} ({e})") from None
    return meta


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _pixel_stats(images: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (in 0..1) over uint8 (..., 3) arrays, accumulated one array at a time."""
    total, squares, n = np.zeros(3), np.zeros(3), 0
    for image in images:
        x = image.reshape(-1, 3).astype(np.float64) / 255
        total, squares, n = total + x.sum(0), squares + (x * x).sum(0), n + len(x)
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean * mean, 0))


def _pack_digits(cache: Path) -> Path:
    """scikit-learn's bundled digits as shards under <cache>/digits (once; atomic, so racing processes are fine)."""
    out = cache / "digits"
    if (out / "dataset.json").is_file():
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    order = _rng(DIGITS_SEED).permutation(len(images))
    splits = {"train": order[DIGITS_NUM_VAL:], "val": order[:DIGITS_NUM_VAL]}
    mean, std = _pixel_stats([np.repeat(images[splits["train"]][..., None], 3, axis=-1)])
    try:
        _write_dataset(out, name="digits", classes=[str(c) for c in digits.target_names], image_size=(8, 8),
                       mean=mean, std=std, shard_size=5000, read=lambda i: ("png", _png(images[i])),
                       splits={k: [(int(i), int(digits.target[i])) for i in v] for k, v in splits.items()})
    except FileExistsError:
        pass
    return out


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_image_file(path: Path) -> tuple[str, bytes]:
    """jpg/jpeg/png bytes as they are; other formats PIL reads become RGB PNG."""
    from PIL import Image

    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return ext, path.read_bytes()
    with Image.open(path) as im:
        return "png", _png(np.array(im.convert("RGB")))


def pack_imagefolder(src: Path, out: Path, *, shard_size: int = 5000, name: str | None = None,
                     val_fraction: float = 0.0, seed: int = 0) -> dict:
    """Pack an ImageFolder tree (class folders, or src/train + src/val|test) into shards + dataset.json in `out`.

    Samples are shuffled once (seeded) so every shard mixes classes; with no val folder, `val_fraction` of them
    becomes a "val" split. mean/std are estimated from up to 2,000 train images. Written atomically.
    """
    from PIL import Image

    src, out = Path(src), Path(out)
    name = name or out.name
    roots = {"train": src / "train"}
    for val in ("val", "test"):
        if (src / val).is_dir():
            roots[val] = src / val
            break
    if not roots["train"].is_dir() or len(roots) == 1:
        roots = {"train": src}
    classes = sorted({d.name for root in roots.values() for d in root.iterdir() if d.is_dir()})
    if not classes:
        raise DataError(f"{src}: no class folders (expected <class>/<image> or train/<class>/<image>)")
    rng = _rng(seed)
    splits = {}
    for split, root in roots.items():
        items = [(p, classes.index(d.name)) for d in sorted(root.iterdir()) if d.is_dir() for p in _folder_images(d)]
        splits[split] = [items[i] for i in rng.permutation(len(items))]
    if len(roots) == 1 and val_fraction > 0:
        n_val = int(round(len(splits["train"]) * val_fraction))
        splits = {"train": splits["train"][n_val:], "val": splits["train"][:n_val]}
    if not splits["train"]:
        raise DataError(f"{src}: no images found")
    sizes = Counter()
    for split in splits.values():
        for path, _ in split:
            try:
                with Image.open(path) as im:
                    sizes[(im.height, im.width)] += 1
            except Exception as e:
                raise DataError(f"{path}: not an image PIL can read ({e})") from None
    def rgb(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))

    mean, std = _pixel_stats(rgb(path) for path, _ in splits["train"][:2000])  # train is shuffled: a random sample
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; remove it or pick another output folder")
    try:
        return _write_dataset(out, name=name, classes=classes, image_size=sizes.most_common(1)[0][0], mean=mean,
                              std=std, splits=splits, shard_size=shard_size, read=_read_image_file)
    except FileExistsError:
        raise DataError(f"{out} was written by someone else meanwhile") from None


def get_dataset(name: str, data_root: str | Path | None = None) -> Path:
    """Download CIFAR-10/100 with torchvision and pack it as shards + dataset.json under <data_root>/<name>/."""
    if name not in DOWNLOADABLE:
        raise DataError(f"cannot fetch {name!r}: known datasets are {', '.join(DOWNLOADABLE)}; "
                        "pack your own ImageFolder with pack_imagefolder ('mae-lab data pack')")
    out = _data_root(data_root) / name
    if (out / "dataset.json").is_file():
        return out
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    with tempfile.TemporaryDirectory(prefix=f"mae-lab-{name}-") as tmp:
        try:
            parts = {split: cls(root=tmp, train=split == "train", download=True) for split in ("train", "test")}
        except Exception as e:  # URLError, socket errors, checksum errors...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"could not download {name} ({msg}); check network access, or copy its shards and "
                            f"dataset.json into {out}") from None
        data = {split: ds.data for split, ds in parts.items()}  # uint8 (N, 32, 32, 3)
        mean, std = _pixel_stats(data["train"][i : i + 5000] for i in range(0, len(data["train"]), 5000))
        rng = _rng(0)  # shuffled once, so every shard mixes all classes
        splits = {split: [((split, int(i)), int(ds.targets[i])) for i in rng.permutation(len(ds.targets))]
                  for split, ds in parts.items()}
        try:
            _write_dataset(out, name=name, classes=list(parts["train"].classes), image_size=(32, 32), mean=mean,
                           std=std, splits=splits, shard_size=5000, read=lambda s: ("png", _png(data[s[0]][s[1]])))
        except FileExistsError:
            pass
    return out


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
