"""Loaders: one global sample order per (seed, epoch), rank/worker splitting by global batch, exact counts, and the
in-memory loader.

Both loaders serve the same batches. The epoch's order is a permutation of the split's sample indices (index = place
in shard order, counting only the samples of a `subset`) drawn from the stream ("data_order", epoch); global batch
b is order[b*G : (b+1)*G] for the global batch G = batch_size * world_size, and rank r takes its rows r, r+N, ...
Each sample's augmentation draws from ("augment", epoch, sample index). So the batches a trial sees do not depend
on loader workers, in-memory decoding or the process count at an equal global batch (rng.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mae_lab import rng
from mae_lab.data.shards import DataError, Subset, check_end, expand_shards, shard_keys
from mae_lab.data.stream import _decode, read_samples
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


@dataclass(frozen=True)
class _Failure:
    """A DataError raised inside a DataLoader worker, carried to the main process as data (one clean line)."""

    message: str


class _ShardStream(torch.utils.data.IterableDataset):
    """One epoch of one rank over shards: yields (batch number, uint8 or float images (B, 3, S, S), labels (B,)).

    Rank batch b goes to loader worker b mod W, which makes its batches in order. Local uncompressed .tar shards
    come with an `index` (where each sample's files lie, from the tar headers): a worker reads just its batches'
    samples, out of order, holding one batch. Otherwise (http(s), pipe:, .tar.gz, or headers tarfile cannot
    parse) every worker reads the whole stream in shard order, counting the global sample index, keeps the raw
    bytes of its batches' samples, and decodes a batch once all its samples have arrived. Shuffled, a batch's
    samples lie all over the split, so such a worker holds the encoded bytes of up to its share of the epoch (about
    1/(W * world_size) of the split) and its first batch comes after one read of the split: for remote shards that
    is W downloads of the split per rank and epoch, and a split too large for memory should be read unshuffled
    (a batch then completes as it is read) or made local.
    """

    def __init__(self, shards: list[str], *, num_samples: int, transform, batch_size: int, shuffle: bool, seed: int,
                 epoch: int, rank: int, world_size: int, drop_last: bool, subset: Subset | None, label_key: str,
                 need_label: bool, index: SampleIndex | None = None):
        super().__init__()
        self.index = index  # per admitted sample: (shard number, key, its files' places), or None: stream
        self.shards, self.n, self.transform, self.batch_size = shards, num_samples, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, epoch, drop_last
        self.rank, self.world_size = rank, world_size
        self.subset, self.label_key, self.need_label = subset, label_key, need_label

    def _mine(self) -> Tensor:
        """(share,) this rank's sample indices in order: rows rank, rank + N, ... of each global batch."""
        order = _epoch_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)  # (n,)
        return order[self.rank :: self.world_size]

    def _plan(self, worker: int, num_workers: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """For each global sample index, the rank batch it belongs to if that batch is this worker's (else -1) and
        its row; and the batch sizes of this worker's batches (in order)."""
        mine = self._mine().numpy()
        count = _num_batches(self.n, self.rank, self.world_size, self.batch_size, self.drop_last)
        pos = np.arange(min(len(mine), count * self.batch_size))  # places in this rank's sequence that are served
        batch = pos // self.batch_size
        take = batch % num_workers == worker
        batch_of, row_of = np.full(self.n, -1), np.zeros(self.n, dtype=np.int64)
        batch_of[mine[pos[take]]], row_of[mine[pos[take]]] = batch[take], pos[take] % self.batch_size
        sizes = np.bincount(batch[take], minlength=count)[worker::num_workers].tolist()
        return batch_of, row_of, sizes

    def _samples(self) -> Iterator[tuple[str, str, dict]]:
        for shard in self.shards:
            check_end(shard)  # a local shard cut at a member boundary
            for key, files in read_samples(shard):
                if self.subset is None or self.subset.admits(shard, key):
                    yield shard, key, files

    def _indexed(self, index: SampleIndex, worker: int, num_workers: int
                 ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """This worker's batches, each sample's files read where the index puts them."""
        mine, files_of = self._mine().tolist(), {}
        try:
            for b in range(worker, _num_batches(self.n, self.rank, self.world_size, self.batch_size, self.drop_last),
                           num_workers):
                rows = []
                for i in mine[b * self.batch_size : (b + 1) * self.batch_size]:
                    s, key, members = index[i]
                    if s not in files_of:
                        files_of[s] = open(self.shards[s], "rb", buffering=0)  # closed below
                    rows.append((self.shards[s], key, read_sample_at(self.shards[s], files_of[s], key, members), i))
                yield self._batch(b, rows)
        finally:
            for f in files_of.values():
                f.close()

    def __iter__(self):
        worker, num_workers = _worker_slot()
        try:
            if self.index is not None:
                yield from self._indexed(self.index, worker, num_workers)
                return
            batch_of, row_of, sizes = self._plan(worker, num_workers)
            held: dict[int, list] = {}  # batch -> its rows (shard, key, files, global index) as they arrive
            nxt, total = 0, 0  # this worker's next batch (k-th of its own, rank batch worker + k * W)
            for i, (shard, key, files) in enumerate(self._samples()):
                total = i + 1
                b = int(batch_of[i]) if i < self.n else -1
                if b < 0:
                    continue
                held.setdefault(b, [None] * sizes[b // num_workers])[int(row_of[i])] = (shard, key, files, i)
                while nxt < len(sizes) and (rows := held.get(worker + nxt * num_workers)) and None not in rows:
                    yield self._batch(worker + nxt * num_workers, held.pop(worker + nxt * num_workers))
                    nxt += 1
            if total != self.n or nxt < len(sizes):
                mine = self._mine()
                read = int((mine < total).sum()) + max(0, _rank_share(total, self.rank, self.world_size)
                                                         - _rank_share(self.n, self.rank, self.world_size))
                yield _Failure(f"expected {len(mine)} samples for this rank, read {read}: "
                               "is num_samples / dataset.json stale?")
        except DataError as e:
            yield _Failure(str(e))

    def _batch(self, b: int, rows: list) -> tuple[int, Tensor, Tensor]:
        images, labels = [], []
        for shard, key, files, i in rows:
            image, label = _decode(shard, key, files, label_key=self.label_key, need_label=self.need_label)
            images.append(_augment(self.transform, image, self.seed, self.epoch, i))  # (3, S, S)
            labels.append(label)
        return b, torch.stack(images), torch.tensor(labels, dtype=torch.long)  # (B, 3, S, S), (B,)


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
        order = _epoch_order(len(self.labels), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        mine = order[self.rank :: self.world_size]  # (share,)
        for b in range(len(self)):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]  # (B,)
            x = torch.stack([_augment(self.transform, self.images[i], self.seed, self.epoch, i)
                             for i in idx.tolist()])  # (B, 3, S, S) uint8, or the transform's float
            if self.device_batches:  # uint8, pinned: the consumer copies it without blocking and normalises there
                yield x.pin_memory(), self.labels[idx]
                continue
            yield (self.transform.normalize(x) if isinstance(self.transform, ImageTransform) else x), self.labels[idx]


class ShardLoader:
    """Iterable of (images float (B, 3, S, S), labels long (B,)) for one epoch of one rank, streamed from shards;
    `len` = its batches. Workers' batches are put back in batch order (DataLoader's round robin already does);
    a sample count that differs from `num_samples` (stale dataset.json, short shard) raises DataError at the end of
    the epoch.
    """

    def __init__(self, stream: _ShardStream, *, num_samples: int, batch_size: int, num_workers: int,
                 drop_last: bool, transform, rank: int = 0, world_size: int = 1, device_batches: bool = False):
        self.stream, self.num_samples, self.batch_size = stream, num_samples, batch_size
        self.device_batches = device_batches
        self.num_workers, self.drop_last, self.transform = num_workers, drop_last, transform
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = self.stream.n
        return _num_batches(n, self.rank, self.world_size, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        source: Iterable = self.stream
        if self.num_workers > 0:
            source = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                                 pin_memory=self.device_batches)  # for non_blocking copies
        early: dict[int, tuple[Tensor, Tensor]] = {}
        nxt = 0
        for item in source:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            early[item[0]] = item[1], item[2]
            while nxt in early:
                yield self._finish(*early.pop(nxt))
                nxt += 1
        if nxt != len(self):
            raise DataError(f"expected {len(self)} batches for this rank, made {nxt}")

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
    stream = _ShardStream(shards, num_samples=num_samples, transform=transform, batch_size=batch_size,
                          shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          drop_last=drop_last, subset=subset, label_key=label_key, need_label=need_label,
                          index=index)
    return ShardLoader(stream, num_samples=_rank_share(num_samples, rank, world_size), batch_size=batch_size,
                       num_workers=num_workers, drop_last=drop_last, transform=transform, rank=rank,
                       world_size=world_size, device_batches=device_batches)


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
