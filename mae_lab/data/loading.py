"""Loaders: seeded shuffling, rank/worker splitting, batches with exact counts, and the in-memory loader."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mae_lab import rng
from mae_lab.data.shards import DataError, Subset, _decode, check_end, expand_shards, read_samples, shard_keys
from mae_lab.data.transforms import ImageTransform


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
    buf: list = []
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

    def __init__(self, shards, *, transform, batch_size, shuffle, seed, epoch, rank, world_size, by_shards, buffer,
                 subset: Subset | None, label_key: str, need_label: bool):
        super().__init__()
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.buffer = shuffle, seed, epoch, buffer
        self.rank, self.world_size, self.by_shards = rank, world_size, by_shards
        self.subset, self.label_key, self.need_label = subset, label_key, need_label

    def _samples(self, shard: str) -> Iterator[tuple[str, dict]]:
        check_end(shard)  # a local shard cut at a member boundary
        for key, files in read_samples(shard):
            if self.subset is None or self.subset.admits(shard, key):
                yield key, files

    def _raw(self, worker: int, num_workers: int) -> Iterator[tuple[str, str, dict]]:
        if self.by_shards:  # fixed shard set per rank; its order changes per epoch; workers take every W-th shard
            mine = self.shards[self.rank :: self.world_size]
            if self.shuffle:
                mine = [mine[i] for i in _rng(self.seed, self.epoch, self.rank).permutation(len(mine))]
            for shard in mine[worker::num_workers]:
                for key, files in self._samples(shard):
                    yield shard, key, files
            return
        order = self.shards  # every reader walks all shards in the same order and keeps its sample indices
        if self.shuffle:
            order = [order[i] for i in _rng(self.seed, self.epoch).permutation(len(order))]
        i = 0
        for shard in order:
            for key, files in self._samples(shard):
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
        decoded = [_decode(shard, key, files, label_key=self.label_key, need_label=self.need_label)
                   for shard, key, files in batch]
        with rng.active():
            return _augment_batch([im for im, _ in decoded], [y for _, y in decoded], self.transform)


class MemoryLoader:
    """The in-memory loader: (images float (B, 3, S, S), labels long (B,)) over decoded uint8 images ((N, 3, H, W),
    or a list of (3, H, W) where sizes differ), one epoch of one rank.

    With `shuffle`, a permutation from the stream ("data_order", epoch); rank r takes every world_size-th index.
    Each sample's augmentation draws from its own stream ("augment", epoch, sample index), so the global batches
    are a function of (seed, epoch) alone, whatever the rank count (rng.py). The images are decoded already, so
    DataLoader workers are not used.
    """

    def __init__(self, images: Tensor | list[Tensor], labels: Tensor, *, transform, batch_size: int, shuffle: bool,
                 seed: int, epoch: int, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if batch_size < 1 or len(labels) < 1 or not 0 <= rank < world_size:
            raise DataError(f"in-memory loader: need batch_size >= 1, samples >= 1 (got {len(labels)}), "
                            "0 <= rank < world_size")
        self.images, self.labels, self.transform, self.batch_size = images, labels, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, epoch, drop_last
        self.rank, self.world_size = rank, world_size

    def _mine(self) -> Tensor:
        n = len(self.labels)
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=rng.generator(self.seed, "data_order", self.epoch))  # (n,)
        return order[self.rank :: self.world_size]

    @property
    def num_samples(self) -> int:
        """This rank's samples."""
        return len(self.labels[self.rank :: self.world_size])

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        mine = self._mine()
        for b in range(len(self)):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]  # (B,)
            x = torch.stack([self._augment(int(i)) for i in idx])  # (B, 3, S, S) uint8, or the transform's float
            yield (self.transform.normalize(x) if isinstance(self.transform, ImageTransform) else x), self.labels[idx]

    def _augment(self, i: int) -> Tensor:
        step = self.transform.augment if isinstance(self.transform, ImageTransform) else self.transform
        with rng.seeded(self.seed, "augment", self.epoch, i):  # the global RNG is left as it was
            return step(self.images[i])  # (3, S, S)


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
                shuffle_buffer: int = 2000, in_memory: bool = False, allow_pipe: bool = False,
                subset: Subset | None = None, label_key: str = "label", need_label: bool = True
                ) -> ShardLoader | MemoryLoader:
    """Loader over one epoch of `pattern` (or the `subset` of its samples) for `rank` of `world_size`.

    Split by whole shards when every (rank, worker) gets one, else by sample index; shuffled by shard order plus a
    seeded buffer. `transform` receives uint8 (3, H, W) tensors (an ImageTransform from pretrain/eval_transform, or
    any callable returning a float tensor). `in_memory=True` decodes the split once per process (`load_split`) and
    serves it through `MemoryLoader`, so later epochs cost no decoding. Labels come from `.cls` or field
    `label_key` of `.json`; with `need_label=False` a sample without one gets label -1.
    """
    if batch_size < 1 or num_samples < 1 or not 0 <= rank < world_size:
        raise DataError(f"{pattern!r}: need batch_size >= 1, num_samples >= 1, 0 <= rank < world_size")
    if in_memory:
        images, labels = load_split(pattern, allow_pipe=allow_pipe, subset=subset, label_key=label_key,
                                    need_label=need_label)
        if len(labels) != num_samples:
            raise DataError(f"{pattern!r}: num_samples is {num_samples} but the shards hold {len(labels)} samples")
        return MemoryLoader(images, labels, transform=transform, batch_size=batch_size, shuffle=shuffle, seed=seed,
                            epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last)
    shards = expand_shards(pattern, allow_pipe=allow_pipe)
    by_shards = _split_by_shards(len(shards), world_size, num_workers)
    n, exact = _rank_share(num_samples, rank, world_size), True
    if by_shards and world_size > 1:  # this rank's share depends on its shards' sizes: count them (tar headers)
        keys = [shard_keys(s) for s in shards]
        if None in keys:  # remote shards: assume equal shard sizes, and don't check
            n, exact = round(num_samples * len(shards[rank::world_size]) / len(shards)), False
        else:
            counts = [sum(subset is None or subset.admits(s, k) for k in ks or ()) for s, ks in zip(shards, keys)]
            if sum(counts) != num_samples:
                raise DataError(f"{pattern!r}: num_samples is {num_samples} but the shards hold {sum(counts)} "
                                "samples")
            n = sum(counts[rank::world_size])
    stream = _ShardStream(shards, transform=transform, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                          rank=rank, world_size=world_size, by_shards=by_shards, buffer=shuffle_buffer, subset=subset,
                          label_key=label_key, need_label=need_label)
    return ShardLoader(stream, num_samples=n, exact=exact, split="shards" if by_shards else "samples",
                       transform=transform, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last)


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
