"""Where each sample's files lie in local uncompressed .tar shards, as flat numpy arrays read from tarfile's headers
(torch-free, like `shards`): the sample index that the loader's map-style Dataset reads at.

The loader reads local shards out of order through this index, and every DataLoader worker forked from a process
holds it. As Python tuples it cost ~585 bytes a sample (~750 MB a process at ImageNet's 1.28M samples, and a copy
in each worker, since refcount writes touch every page); as a few numpy arrays it costs tens of bytes a sample,
in pages that forked workers only read. `TarMembers` indexes one shard (cached by path, size and mtime),
`SampleIndex` the admitted samples of a split, `read_sample_at` one sample's files (any other shard streams through
`stream.read_samples`).
"""

from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from mae_lab.data.shards import (
    COMPRESSED,
    DataError,
    Subset,
    _is_local,
    _is_meta,
    base_plus_ext,
    check_end,
    regular_members,
)

Member = tuple[str, int, int]  # (extension, first data byte, size) of one file of a sample


@dataclass(frozen=True, eq=False)
class TarMembers:
    """The samples of one local uncompressed .tar in shard order, as flat arrays: sample i is `keys[i]`, its files
    are entries start[i]:start[i + 1] of `ext`, `offset` and `size`. Iterates as (key, ((ext, first data byte,
    size), ...)) pairs, with Python ints; `table[i]` is sample i's pair. Keys are utf-8 (surrogateescape) bytes in
    a numpy 'S' array (each as long as the longest), which drops trailing NUL bytes: a tar header's name cannot
    hold one, and a shard where a (pax) name would is not indexed."""

    keys: np.ndarray  # (N,) S: utf-8 keys
    exts: tuple[str, ...]  # the extensions met (lower-cased), in order of first appearance
    ext: np.ndarray  # (F,) int16 (int32 past 32,767 extensions): each file's extension, a place in `exts`
    start: np.ndarray  # (N + 1,) int64: sample i's files are start[i]:start[i + 1]
    offset: np.ndarray  # (F,) int64: first data byte of each file
    size: np.ndarray  # (F,) int64: bytes of each file

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, tuple[Member, ...]]:
        i = range(len(self))[i]  # negative rows count from the end; IndexError past it
        a, b = int(self.start[i]), int(self.start[i + 1])
        exts = [self.exts[e] for e in self.ext[a:b].tolist()]
        return (self.keys[i].decode("utf-8", "surrogateescape"),
                tuple(zip(exts, self.offset[a:b].tolist(), self.size[a:b].tolist())))

    def __iter__(self) -> Iterator[tuple[str, tuple[Member, ...]]]:
        exts = [self.exts[e] for e in self.ext.tolist()]
        offsets, sizes, start = self.offset.tolist(), self.size.tolist(), self.start.tolist()
        for i, key in enumerate(self.keys.tolist()):
            a, b = start[i], start[i + 1]
            yield key.decode("utf-8", "surrogateescape"), tuple(zip(exts[a:b], offsets[a:b], sizes[a:b]))

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(a.nbytes for a in (self.keys, self.ext, self.start, self.offset, self.size))


def _frozen(values, dtype) -> np.ndarray:
    out = np.array(values, dtype=dtype)
    out.flags.writeable = False  # cached and shared by every loader of the process (and its forked workers)
    return out


def _group(headers: list[tuple[str, int, int]], size: int) -> TarMembers | None:
    """Members (name, data offset, size) -> TarMembers, grouped as webdataset's reader groups them (meta names
    skipped, consecutive members with one key, extensions lower-cased); None where a file repeats within a sample,
    data lies past `size` bytes or a key ends with a NUL byte."""
    keys: list[bytes] = []
    start: list[int] = []
    exts: dict[str, int] = {}  # extension -> its id
    ext_ids: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    last: str | None = None  # the current sample's key
    seen: set[str] = set()  # and its extensions
    for name, offset, length in headers:
        if _is_meta(name):
            continue
        key, ext = base_plus_ext(name)
        if key is None or ext is None:
            continue
        if offset + length > size:
            return None
        if key != last:
            keys.append(key.encode("utf-8", "surrogateescape"))
            if keys[-1].endswith(b"\0"):
                return None
            start.append(len(offsets))
            last, seen = key, set()
        ext = ext.lower()
        if ext in seen:
            return None
        seen.add(ext)
        ext_ids.append(exts.setdefault(ext, len(exts)))
        offsets.append(offset)
        sizes.append(length)
    start.append(len(offsets))
    return TarMembers(keys=_frozen(keys, np.bytes_), exts=tuple(exts),
                      ext=_frozen(ext_ids, np.int16 if len(exts) <= np.iinfo(np.int16).max else np.int32),
                      start=_frozen(start, np.int64), offset=_frozen(offsets, np.int64),
                      size=_frozen(sizes, np.int64))


@functools.lru_cache(maxsize=4096)
def _members_of_local_tar(path: str, size: int, mtime_ns: int) -> TarMembers | None:
    """The samples of an uncompressed local tar (`_group`); None where tarfile cannot read its headers."""
    try:
        headers = list(regular_members(path, "r:"))  # offsets into the file itself: no compressed stream
    except (tarfile.TarError, EOFError, OSError):
        return None
    return _group(headers, size)


def sample_members(shard: str) -> TarMembers | None:
    """Where each sample's files lie in a local uncompressed .tar, for reading samples out of order
    (`read_sample_at`); None for other shards or where the headers do not parse (streaming then names the
    problem). Cached by path, size and mtime."""
    if not _is_local(shard) or shard.endswith(COMPRESSED):
        return None
    st = os.stat(shard)
    return _members_of_local_tar(os.path.abspath(shard), st.st_size, st.st_mtime_ns)


def read_sample_at(shard: str, f: BinaryIO, key: str, members: tuple[Member, ...]) -> dict[str, bytes]:
    """{extension: bytes} of sample `key` of an open local shard, at the places `sample_members` found."""
    files = {}
    for ext, offset, length in members:
        f.seek(offset)
        if len(data := f.read(length)) < length:
            raise DataError(f"{os.path.basename(shard)}: sample {key!r}: truncated tar (ends inside {key}.{ext})")
        files[ext] = data
    return files


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """Every admitted sample of a split in shard order: sample i is row `row[i]` of `tables[shard[i]]`.
    `index[i]` is (shard number, key, members) as `read_sample_at` takes them."""

    tables: tuple[TarMembers, ...]  # per shard number (shared with `sample_members`' cache)
    shard: np.ndarray  # (n,) int32
    row: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> tuple[int, str, tuple[Member, ...]]:
        s = int(self.shard[i])
        return (s, *self.tables[s][int(self.row[i])])

    def __iter__(self) -> Iterator[tuple[int, str, tuple[Member, ...]]]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays, the shards' tables included."""
        return self.shard.nbytes + self.row.nbytes + sum(t.nbytes for t in self.tables)


def sample_index(shards: list[str], subset: Subset | None, num_samples: int) -> SampleIndex | None:
    """Where every admitted sample (all, or those `subset` admits) lies, in shard order, where every shard is a
    local .tar whose headers parse and that ends with its end-of-archive marker, and the count is `num_samples`;
    else None (streaming then reads the shards and names what is wrong). Built shard by shard: at most one shard's
    keys are Python objects at a time."""
    tables: list[TarMembers] = []
    rows: list[np.ndarray] = []  # per shard: the rows it admits
    for shard in shards:
        members = sample_members(shard)
        if members is None:
            return None
        try:
            check_end(shard)
        except DataError:
            return None
        if subset is None:
            admitted = np.arange(len(members), dtype=np.int32)
        else:
            admits = (subset.admits(shard, key.decode("utf-8", "surrogateescape")) for key in members.keys.tolist())
            admitted = np.flatnonzero(np.fromiter(admits, dtype=bool, count=len(members))).astype(np.int32)
        tables.append(members)
        rows.append(admitted)
    if sum(len(r) for r in rows) != num_samples:
        return None
    shard_of = np.repeat(np.arange(len(rows), dtype=np.int32), [len(r) for r in rows])  # (n,)
    row = np.concatenate([np.zeros(0, np.int32), *rows])  # (n,)
    return SampleIndex(tables=tuple(tables), shard=_frozen(shard_of, np.int32), row=_frozen(row, np.int32))
