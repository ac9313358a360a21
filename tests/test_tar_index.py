"""The columnar tar index: the same samples, files and bytes as a plain tarfile reading, in a few flat numpy arrays
(tens of bytes a sample, where the Python tuples it replaces took ~585), and the split-wide index admits what the
list of (shard, key, members) tuples did."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from test_data import id_shards, png, write_tar

from mae_lab.data import DataError, Subset
from mae_lab.data.shards import check_end, shard_keys
from mae_lab.data.stream import read_samples
from mae_lab.data.tar_index import (
    SampleIndex,
    TarMembers,
    read_sample_at,
    sample_index,
    sample_members,
)


def tarfile_members(path) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
    """(key, ((ext, first data byte, size), ...)) per sample, read plainly with tarfile and grouped as webdataset
    groups: consecutive members with one key, extensions lower-cased."""
    out: list[tuple[str, list]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isreg():
                continue
            key, ext = wds.tariterators.base_plus_ext(m.name)
            if not out or out[-1][0] != key:
                out.append((key, []))
            out[-1][1].append((ext.lower(), m.offset_data, m.size))
    return [(key, tuple(files)) for key, files in out]


def old_index(shards, subset, num_samples):
    """The list of (shard number, key, members) tuples that the loader built before the columnar index."""
    index = []
    for s, shard in enumerate(shards):
        samples = tarfile_members(shard)
        index += [(s, key, members) for key, members in samples if subset is None or subset.admits(shard, key)]
    return index if len(index) == num_samples else None


def sample(i: int) -> dict:
    """Samples with different sets of files: every one an image and a label, some a json, a .seg.png, a txt."""
    out = {"__key__": f"k{i:04d}", "png": png(i % 256), "cls": str(i).encode()}
    if i % 2:
        out["json"] = json.dumps({"i": i}).encode()
    if i % 3 == 0:
        out["seg.png"], out["txt"] = png(255 - i % 256), b"x" * (i % 700)  # some files span several 512-byte blocks
    return out


def written(tmp_path, samples: list[dict], writer: str) -> str:
    """One shard of `samples` by webdataset's ShardWriter (pax headers) or as a plain GNU tar (utf-8 names in the
    headers themselves): tarfile reads both."""
    if writer == "shardwriter":
        with wds.ShardWriter(str(tmp_path / "w-%06d.tar"), maxcount=len(samples), verbose=0) as sink:
            for s in samples:
                sink.write(s)
        return str(tmp_path / "w-000000.tar")
    with tarfile.open(tmp_path / "gnu.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(tmp_path / "gnu.tar")


def assert_same_as_tarfile(shard: str, samples: list[dict]) -> TarMembers:
    members = sample_members(shard)
    expected = tarfile_members(shard)
    assert list(members) == expected and len(members) == len(samples)
    assert [members[i] for i in range(len(members))] == expected and members[-1] == expected[-1]
    with pytest.raises(IndexError):
        members[len(members)]
    assert all(type(v) is int for _, files in members for _, *where in files for v in where)
    with open(shard, "rb") as f:
        for (key, files), want in zip(members, samples):
            assert key == want["__key__"]
            assert read_sample_at(shard, f, key, files) == {e: v for e, v in want.items() if e != "__key__"}
    want = [(s["__key__"], {e: v for e, v in s.items() if e != "__key__"}) for s in samples]
    assert list(read_samples(shard)) == want  # the one tar reader, streaming, reads what the index reads
    return members


@pytest.mark.parametrize("writer", ["shardwriter", "gnu"])
def test_a_shard_with_several_files_per_sample_indexes_as_tarfile_reads_it(tmp_path, writer):
    samples = [sample(i) for i in range(30)]
    shard = written(tmp_path, samples, writer)
    members = assert_same_as_tarfile(shard, samples)
    assert sorted(members.exts) == ["cls", "json", "png", "seg.png", "txt"]  # each extension once
    assert members.start.tolist()[:4] == [0, 4, 7, 9] and members.start[-1] == len(members.offset)  # 4, 3, 2 files


@pytest.mark.parametrize("writer", ["shardwriter", "gnu"])
def test_non_ascii_keys(tmp_path, writer):
    """Keys in utf-8, from pax headers or from the bytes of plain headers, come back as they went in."""
    keys = ["猫_001", "café/été", "ключ", "plain", "naïve/ü-2"]
    samples = [{"__key__": k, "png": png(i), "cls": str(i).encode()} for i, k in enumerate(keys)]
    index = assert_same_as_tarfile(written(tmp_path, samples, writer), samples)
    assert [k for k, _ in index] == keys and index.keys.dtype.kind == "S"


def test_the_index_is_a_few_numpy_arrays(tmp_path):
    pattern, n = id_shards(tmp_path, [300, 200, 250])
    shards = [str(tmp_path / f"ids-{s:03d}.tar") for s in range(3)]
    index = sample_index(shards, None, n)
    assert isinstance(index, SampleIndex) and len(index) == n
    arrays = [index.shard, index.row] + [getattr(t, f) for t in index.tables
                                         for f in ("keys", "ext", "start", "offset", "size")]
    assert all(isinstance(a, np.ndarray) and a.dtype != object and not a.flags.writeable for a in arrays)
    assert all(t.exts == ("png", "cls") for t in index.tables)  # the only Python objects: one per extension
    assert index.shard.dtype == index.row.dtype == np.int32 and index.tables[0].ext.dtype == np.int16
    assert index.nbytes == sum(a.nbytes for a in arrays)
    assert index.nbytes / len(index) < 100  # the tuples it replaces: ~585 bytes a sample
    assert index.tables[1] is sample_members(shards[1])  # the split's index shares the per-shard cache


@pytest.mark.parametrize("keep", [None, False, True])
def test_the_split_index_admits_what_the_tuples_did(tmp_path, keep):
    _, n = id_shards(tmp_path, [23, 9, 0, 20, 17])  # an empty shard among them
    shards = [str(tmp_path / f"ids-{s:03d}.tar") for s in range(5)]
    picked = frozenset((f"ids-{s:03d}.tar", f"s{i:05d}") for s, i in ((0, 3), (1, 30), (3, 40), (4, 60), (4, 68)))
    subset = None if keep is None else Subset(picked, keep=keep)
    count = n if keep is None else n - 5 if not keep else 5
    index = sample_index(shards, subset, count)
    assert list(index) == old_index(shards, subset, count)
    assert [index[i] for i in range(len(index))] == list(index)
    assert sample_index(shards, subset, count + 1) is None is old_index(shards, subset, count + 1)  # a wrong count
    with open(shards[4], "rb") as f:
        s, key, members = index[len(index) - 1]
        assert s == 4 and read_sample_at(shards[4], f, key, members)["cls"] == (b"67" if keep is False else b"68")


def test_the_index_is_none_where_the_tuples_were(tmp_path):
    """.tar.gz, a repeated file within a sample, a shard without its end-of-archive marker: streaming reads them."""
    good = write_tar(tmp_path / "good.tar", [("a.png", png(1)), ("a.cls", b"1")])
    assert len(sample_index([str(good)], None, 1)) == 1
    gz = tmp_path / "good.tar.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    twice = write_tar(tmp_path / "twice.tar", [("a.png", png(1)), ("a.cls", b"1"), ("a.CLS", b"2")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:2048])  # the members whole, the end-of-archive marker gone
    with pytest.raises(DataError, match="truncated"):
        check_end(str(cut))
    assert sample_members(str(gz)) is None and sample_members(str(twice)) is None
    assert sample_members(str(cut)) is not None
    for bad in (gz, twice, cut):
        assert sample_index([str(good), str(bad)], None, 2) is None


@pytest.mark.parametrize("writer", ["shardwriter", "gnu"])
def test_shard_keys_and_cut_shards_read_alike_either_way(tmp_path, writer):
    """`shard_keys` (the pre-run scan: holdout, checks) reads plain and pax headers through tarfile: the
    same keys, and a cut anywhere (inside a file, at a header, before the end marker) names the shard and a key."""
    samples = [sample(i) for i in range(12)]
    shard = written(tmp_path, samples, writer)
    assert shard_keys(shard) == tuple(s["__key__"] for s in samples)
    data, members = Path(shard).read_bytes(), sample_members(shard)
    last_end = int(members.offset[-1]) + -(-int(members.size[-1]) // 512) * 512  # the end marker's first byte
    for cut in (int(members.offset[5]) + 1, int(members.offset[5]) - 512, last_end):
        Path(shard).write_bytes(data[:cut])
        with pytest.raises(DataError, match=rf"^{Path(shard).name}: sample 'k00\d\d': truncated tar"):
            shard_keys(shard)


def _children() -> set[int]:
    """This process's child processes, running or exited and not yet reaped (Linux's /proc children lists)."""
    tasks = Path(f"/proc/{os.getpid()}/task").iterdir()
    return {int(pid) for task in tasks for pid in (task / "children").read_text().split()}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_a_pipe_shard_leaves_no_process_behind(tmp_path):
    """The one reader's `pipe:` opener ends and reaps its command, whether the reader stops early (as
    `first_samples` does, with the command still writing) or reads to the end (the command still running)."""
    pattern, n = id_shards(tmp_path, [3000])  # ~1.4 MB: more than a pipe's buffer holds
    shard = f"pipe:cat {pattern.replace('{000..000}', '000')}; exec sleep 60"
    before = _children()
    samples = read_samples(shard)
    assert next(samples)[0] == "s00000"
    samples.close()
    assert _children() == before
    assert [key for key, _ in read_samples(shard)][-1] == f"s{n - 1:05d}"
    assert _children() == before
