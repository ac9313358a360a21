"""Loaders: one global sample order per (seed, epoch) (`GlobalBatches`, a batch sampler), a map-style Dataset over
the split's samples (`ShardSamples`) read by torch's DataLoader, exact counts, and the in-memory loader.

Both loaders serve the same batches. The epoch's order is a permutation of the split's sample indices (index = place
in shard order, counting only the samples of a `subset`) drawn from the stream ("data_order", epoch); global batch
b is order[b*G : (b+1)*G] for the global batch G = batch_size * world_size, and rank r takes its rows r, r+N, ...
Each sample's augmentation draws from ("augment", epoch, sample index). So the batches a trial sees do not depend
on loader workers, in-memory decoding or the process count at an equal global batch (rng.py).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from mae_lab import rng
from mae_lab.data.shards import (
    DataError,
    Subset,
    _image_bytes,
    _label,
    check_end,
    decode_pil,
    expand_shards,
    shard_keys,
)
from mae_lab.data.stream import read_samples
from mae_lab.data.tar_index import SampleIndex, read_sample_at, sample_index
from mae_lab.data.transforms import ImageTransform


def _rank_share(n: int, rank: int, world_size: int) -> int:
    """How many of indices 0..n-1 satisfy i % world_size == rank."""
    return n // world_size + (rank < n % world_size)


def _num_batches(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches of one rank: whole global batches only with drop_last (equal on every rank), else ceil(share / B)."""
    if drop_last:
        return n // (batch_size * world_size)
    return -(-_rank_share(n, rank, world_size) // batch_size)


def _epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """(n,) sample indices in the epoch's order: the permutation of stream ("data_order", epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=rng.generator(seed, "data_order", epoch))


def _augment(transform, image: Tensor, seed: int, epoch: int, index: int) -> Tensor:
    """uint8 (3, H, W) -> (3, S, S): uint8 (an ImageTransform's augmentation; normalised per batch) or the
    transform's float output; drawn from the sample's own stream ("augment", epoch, index)."""
    step = transform.augment if isinstance(transform, ImageTransform) else transform
    with rng.seeded(seed, "augment", epoch, index):  # the global RNG is left as it was
        return step(image)


def _worker_slot() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _decode(shard: str, key: str, files: dict[str, bytes], *, label_key: str = "label",
            need_label: bool = True) -> tuple[Tensor, int]:
    """Raw sample -> (uint8 image (3, H, W) in RGB, label; -1 when missing and not needed)."""
    label, data = _label(shard, key, files, label_key=label_key, required=need_label), _image_bytes(shard, key, files)
    try:  # torchvision's decoder first (3-4x faster than PIL on small JPEGs; the same pixels), else PIL
        with warnings.catch_warnings():  # it warns on every call that torchcodec will replace it; not a dependency
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return image, label
    except Exception:  # a format or mode it does not take (16-bit PNG, BMP, ...), or bad data: PIL decides
        pass
    arr, _ = decode_pil(shard, key, files, label_key=label_key, need_label=need_label)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1), label


@dataclass(frozen=True)
class _Failure:
    """A DataError raised inside a DataLoader worker, carried to the main process as data (one clean line)."""

    message: str


def _as_is(batch):
    """DataLoader's collate_fn: `ShardSamples.__getitems__` makes the batch itself."""
    return batch


class GlobalBatches(torch.utils.data.Sampler):
    """One rank's batches of global sample indices for one epoch: the epoch's order (`_epoch_order`), rows rank,
    rank + N, ... of each global batch, `batch_size` at a time (whole global batches only, with drop_last)."""

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed, self.epoch = n, batch_size, shuffle, seed, epoch
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last

    def mine(self) -> Tensor:
        """(share,) this rank's sample indices in order."""
        order = _epoch_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)  # (n,)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return _num_batches(self.n, self.rank, self.world_size, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.mine().tolist()
        for b in range(len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


class ShardSamples(torch.utils.data.Dataset):
    """The admitted samples of a split by global index (place in shard order): item i is sample i decoded and
    augmented from its own stream, (uint8 (3, S, S) or the transform's float, label); `__getitems__` makes a batch
    (images (B, 3, S, S), labels (B,)), or a `_Failure` carrying a DataError's line.

    Local uncompressed .tar shards come with an `index` (where each sample's files lie, from tarfile's headers) and
    are read at those places, each process opening its own files. Other shards (http(s), pipe:, .tar.gz, headers
    tarfile cannot read, or a count that differs from `num_samples`) have no index: `fill` reads them once per
    epoch, in shard order, in the main process (before DataLoader workers fork) and keeps the encoded bytes of the
    samples this rank is served, so a rank holds about 1/world_size of such a split in memory; a split too large for
    that should be made local."""

    def __init__(self, shards: list[str], *, index: SampleIndex | None, num_samples: int, transform, seed: int,
                 epoch: int, subset: Subset | None, label_key: str, need_label: bool):
        self.shards, self.index, self.n, self.transform = shards, index, num_samples, transform
        self.seed, self.epoch, self.subset, self.label_key, self.need_label = seed, epoch, subset, label_key, need_label
        self.raw: dict[int, tuple[str, str, dict[str, bytes]]] = {}  # index None: global index -> (shard, key, files)
        self.short: str | None = None  # index None: what `fill` found wrong with the sample count
        self._files: dict[int, BinaryIO] = {}  # shard number -> open file, of process `_pid`
        self._pid = 0

    def __len__(self) -> int:
        return self.n

    def _raw(self, i: int) -> tuple[str, str, dict[str, bytes]]:
        if self.index is None:
            return self.raw[i]
        if self._pid != os.getpid():  # a forked worker: its own files, not its parent's
            self._files, self._pid = {}, os.getpid()
        s, key, members = self.index[i]
        if s not in self._files:
            self._files[s] = open(self.shards[s], "rb", buffering=0)  # closed by `close`, or with the worker
        return self.shards[s], key, read_sample_at(self.shards[s], self._files[s], key, members)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        shard, key, files = self._raw(i)
        image, label = _decode(shard, key, files, label_key=self.label_key, need_label=self.need_label)
        return _augment(self.transform, image, self.seed, self.epoch, i), label  # (3, S, S)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor] | _Failure:
        try:
            if self.short is not None and any(i not in self.raw for i in indices):
                return _Failure(self.short)
            rows = [self[i] for i in indices]
        except DataError as e:
            return _Failure(str(e))
        return torch.stack([x for x, _ in rows]), torch.tensor([y for _, y in rows], dtype=torch.long)

    def fill(self, batches: GlobalBatches) -> None:
        """Without an index: read every shard once, in order, keeping the raw samples of `batches`; a count that
        differs from `num_samples` is noted in `short` (served as the batch that lacks a sample, or after the last)."""
        served = set(batches.mine()[: len(batches) * batches.batch_size].tolist())
        self.raw, total = {}, 0
        for shard in self.shards:
            check_end(shard)  # a local shard cut at a member boundary
            for key, files in read_samples(shard):
                if self.subset is None or self.subset.admits(shard, key):
                    if total in served:
                        self.raw[total] = shard, key, files
                    total += 1
        self.short = None
        if total != self.n:
            mine, n, rank, world = batches.mine(), self.n, batches.rank, batches.world_size
            read = int((mine < total).sum()) + max(0, _rank_share(total, rank, world) - _rank_share(n, rank, world))
            self.short = f"expected {len(mine)} samples for this rank, read {read}: " \
                         "is num_samples / dataset.json stale?"

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


class MemoryLoader:
    """The in-memory loader: (images float (B, 3, S, S), labels long (B,)) over decoded uint8 images ((N, 3, H, W),
    or a list of (3, H, W) where sizes differ), one epoch of one rank, in the module's global order (the same
    batches as the streaming loader). The images are decoded already, so DataLoader workers are not used.
    """

    def __init__(self, images: Tensor | list[Tensor], labels: Tensor, *, transform, batch_size: int, shuffle: bool,
                 seed: int, epoch: int, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 device_batches: bool = False):
        if batch_size < 1 or len(labels) < 1 or not 0 <= rank < world_size:
            raise DataError(f"in-memory loader: need batch_size >= 1, samples >= 1 (got {len(labels)}), "
                            "0 <= rank < world_size")
        self.images, self.labels, self.transform, self.batch_size = images, labels, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, epoch, drop_last
        self.rank, self.world_size, self.device_batches = rank, world_size, device_batches

    @property
    def num_samples(self) -> int:
        """This rank's samples."""
        return _rank_share(len(self.labels), self.rank, self.world_size)

    def __len__(self) -> int:
        return _num_batches(len(self.labels), self.rank, self.world_size, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for rows in GlobalBatches(len(self.labels), batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed,
                                  epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                                  drop_last=self.drop_last):
            idx = torch.tensor(rows)  # (B,)
            x = torch.stack([_augment(self.transform, self.images[i], self.seed, self.epoch, i)
                             for i in idx.tolist()])  # (B, 3, S, S) uint8, or the transform's float
            if self.device_batches:  # uint8, pinned: the consumer copies it without blocking and normalises there
                yield x.pin_memory(), self.labels[idx]
                continue
            yield (self.transform.normalize(x) if isinstance(self.transform, ImageTransform) else x), self.labels[idx]


class ShardLoader:
    """Iterable of (images float (B, 3, S, S), labels long (B,)) for one epoch of one rank, read from shards: the
    map-style `ShardSamples` (`stream`) in the order of `GlobalBatches`, by torch's DataLoader (which keeps batch
    order with any number of workers); `len` = its batches. A sample count that differs from `num_samples` (stale
    dataset.json, short shard) raises DataError.
    """

    def __init__(self, stream: ShardSamples, batches: GlobalBatches, *, num_workers: int, transform,
                 device_batches: bool = False):
        self.stream, self.batches, self.num_workers = stream, batches, num_workers
        self.transform, self.device_batches = transform, device_batches

    @property
    def num_samples(self) -> int:
        """This rank's samples."""
        return _rank_share(self.batches.n, self.batches.rank, self.batches.world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.stream.index is None:
            self.stream.fill(self.batches)
        loader = torch.utils.data.DataLoader(self.stream, batch_sampler=self.batches, num_workers=self.num_workers,
                                             collate_fn=_as_is, pin_memory=self.device_batches)  # non_blocking copies
        made = 0
        try:
            for item in loader:
                if isinstance(item, _Failure):
                    raise DataError(item.message)
                made += 1
                yield self._finish(*item)
        finally:
            self.stream.close()
        if self.stream.short is not None:
            raise DataError(self.stream.short)
        if made != len(self):
            raise DataError(f"expected {len(self)} batches for this rank, made {made}")

    def _finish(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.device_batches:  # uint8, pinned: the consumer copies it without blocking and normalises there
            return (x if x.is_pinned() else x.pin_memory()), y
        return (self.transform.normalize(x) if isinstance(self.transform, ImageTransform) else x), y


def make_loader(pattern: str, *, num_samples: int, transform, batch_size: int, shuffle: bool, seed: int = 0,
                epoch: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                in_memory: bool = False, allow_pipe: bool = False, subset: Subset | None = None,
                label_key: str = "label", need_label: bool = True,
                device_batches: bool = False) -> ShardLoader | MemoryLoader:
    """Loader over one epoch of `pattern` (or the `subset` of its samples) for `rank` of `world_size`.

    The batches are a function of (seed, epoch, global batch) only (module docstring): `num_workers` and
    `in_memory` change how they are made, not what they hold. `transform` receives uint8 (3, H, W) tensors (an
    ImageTransform from pretrain/eval_transform, or any callable returning a float tensor). `in_memory=True`
    decodes the split once per process (`load_split`) and serves it through `MemoryLoader`, so later epochs cost
    no decoding. Labels come from `.cls` or field `label_key` of `.json`; with `need_label=False` a sample without
    one gets label -1. `device_batches=True` (a CUDA consumer) yields the augmented uint8 batches pinned and not
    normalised: a quarter of the bytes to copy, copied without blocking, normalised on the device by the consumer
    (`transform.normalize`, the same arithmetic).
    """
    if batch_size < 1 or num_samples < 1 or not 0 <= rank < world_size:
        raise DataError(f"{pattern!r}: need batch_size >= 1, num_samples >= 1, 0 <= rank < world_size")
    if in_memory:
        images, labels = load_split(pattern, allow_pipe=allow_pipe, subset=subset, label_key=label_key,
                                    need_label=need_label)
        if len(labels) != num_samples:
            raise DataError(f"{pattern!r}: num_samples is {num_samples} but the shards hold {len(labels)} samples")
        return MemoryLoader(images, labels, transform=transform, batch_size=batch_size, shuffle=shuffle, seed=seed,
                            epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last,
                            device_batches=device_batches)
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    index = sample_index(shards, subset, num_samples)
    if index is None and world_size > 1:  # a wrong count would give ranks different batch counts: check up front
        keys = [shard_keys(s) for s in shards]
        if None not in keys:
            held = sum(subset is None or subset.admits(s, k) for s, ks in zip(shards, keys) for k in ks or ())
            if held != num_samples:
                raise DataError(f"{pattern!r}: num_samples is {num_samples} but the shards hold {held} samples")
    samples = ShardSamples(shards, index=index, num_samples=num_samples, transform=transform, seed=seed, epoch=epoch,
                           subset=subset, label_key=label_key, need_label=need_label)
    batches = GlobalBatches(num_samples, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                            world_size=world_size, drop_last=drop_last)
    return ShardLoader(samples, batches, num_workers=num_workers, transform=transform, device_batches=device_batches)


def _stack(images: list[Tensor]) -> Tensor | list[Tensor]:
    """(N, 3, H, W) when all images share a size, else the list as it is."""
    return torch.stack(images) if len({im.shape for im in images}) == 1 else images


def decode_shard(shard: str, *, subset: Subset | None = None, label_key: str = "label", need_label: bool = True,
                 limit: int | None = None) -> tuple[list[Tensor], list[int]]:
    """Decode the samples of one shard (those of `subset`; at most `limit`): uint8 (3, H, W) images and labels."""
    check_end(shard)
    images: list[Tensor] = []
    labels: list = []
    for key, files in read_samples(shard):
        if limit is not None and len(labels) >= limit:
            break
        if subset is None or subset.admits(shard, key):
            image, label = _decode(shard, key, files, label_key=label_key, need_label=need_label)
            images.append(image)
            labels.append(label)
    return images, labels


class _ShardDecoder(torch.utils.data.IterableDataset):
    """Decode whole shards; worker w takes shards w::W, so in-order DataLoader output keeps shard order."""

    def __init__(self, shards: list[str], **decode):
        super().__init__()
        self.shards, self.decode = shards, decode

    def __iter__(self):
        worker, num_workers = _worker_slot()
        for shard in self.shards[worker::num_workers]:
            try:
                images, labels = decode_shard(shard, **self.decode)
            except DataError as e:
                yield _Failure(str(e))
                return
            yield images, torch.tensor(labels, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _load_split_cached(pattern: str, allow_pipe: bool, subset: Subset | None, label_key: str, need_label: bool
                       ) -> tuple[Tensor | list[Tensor], Tensor]:
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    workers = min(len(shards), os.cpu_count() or 1) if len(shards) > 1 else 0  # PIL decoding holds the GIL: processes
    images: list[Tensor] = []
    labels: list = []
    decoder = _ShardDecoder(shards, subset=subset, label_key=label_key, need_label=need_label)
    for item in torch.utils.data.DataLoader(decoder, batch_size=None, num_workers=workers):
        if isinstance(item, _Failure):
            raise DataError(item.message)
        images += item[0]
        labels.append(item[1])
    if not images:
        raise DataError(f"{pattern!r}: the shards hold no samples")
    return _stack(images), torch.cat(labels)  # (N, 3, H, W) uint8 (or N tensors (3, H, W)), (N,) long


def load_split(pattern: str, *, allow_pipe: bool = False, subset: Subset | None = None, label_key: str = "label",
               need_label: bool = True) -> tuple[Tensor | list[Tensor], Tensor]:
    """Decode every sample of `pattern` (or of `subset`) once, in shard order: (uint8 (N, 3, H, W), long (N,));
    images of different sizes come as a list of (3, H, W). Cached per process."""
    return _load_split_cached(pattern, allow_pipe, subset, label_key, need_label)


@functools.lru_cache(maxsize=4)
def first_samples(pattern: str, n: int, *, allow_pipe: bool = False, subset: Subset | None = None,
                  label_key: str = "label", need_label: bool = True) -> tuple[Tensor | list[Tensor], Tensor]:
    """The first `n` samples in shard order (of `subset`), decoded like `load_split`; reads no further. Cached."""
    images: list[Tensor] = []
    labels: list = []
    for shard in expand_shards(pattern, allow_pipe=allow_pipe):
        got = decode_shard(shard, subset=subset, label_key=label_key, need_label=need_label, limit=n - len(labels))
        images += got[0]
        labels += got[1]
        if len(labels) >= n:
            break
    if not labels:
        raise DataError(f"{pattern!r}: the shards hold no samples")
    return _stack(images), torch.tensor(labels, dtype=torch.long)
