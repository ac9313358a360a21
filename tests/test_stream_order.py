"""The batches a trial sees are a function of (seed, epoch, global batch) only: streamed with 0 or 2 loader workers,
decoded in memory, or split over ranks at an equal global batch, the first two epochs' images (after augmentation)
and labels are identical (issue 13: execution choices are provenance, so they must not change the numbers)."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from test_data import id_shards, png
from test_train import make_spec

from mae_lab.data import Subset, resolve_dataset
from mae_lab.data import loading as L
from mae_lab.data import transforms as T
from mae_lab.data.stream import read_samples
from mae_lab.data.tar_index import read_sample_at, sample_members
from mae_lab.train.loaders import finetune_loader, pretrain_loader


@pytest.fixture(scope="module")
def digits(digits_cache):
    return resolve_dataset("digits", cache_dir=digits_cache)


def _epochs(digits, *, rank: int = 0, world_size: int = 1, batch_size: int = 64, finetune: bool = False, **data):
    spec = make_spec(data={"augmentation": "random_resized_crop", **data},
                     pretrain={"epochs": 2, "batch_size": batch_size},
                     eval_finetune={"batch_size": batch_size, "epochs": 3})
    make = finetune_loader if finetune else pretrain_loader
    return [list(make(spec, digits, epoch, rank=rank, world_size=world_size)) for epoch in (0, 1)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(len(ea) == len(eb) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(ea, eb)) for ea, eb in zip(a, b))


@pytest.mark.parametrize("finetune", [False, True])
def test_workers_and_in_memory_do_not_change_the_batches(digits, finetune):
    base = _epochs(digits, finetune=finetune)  # streamed, no workers
    assert len(base[0]) == 1497 // 64 and not torch.equal(base[0][0][1], base[1][0][1])  # drop_last; epochs differ
    assert _same(base, _epochs(digits, finetune=finetune, num_workers=2))
    assert _same(base, _epochs(digits, finetune=finetune, in_memory=True))
    assert not _same(base, _epochs(digits, finetune=finetune, batch_size=32))  # the tests can fail


def test_ranks_take_rows_of_the_same_global_batches(digits):
    base = _epochs(digits)  # 1 process x 64
    ranks = [_epochs(digits, rank=r, world_size=2, batch_size=32, num_workers=w) for r, w in ((0, 0), (1, 2))]
    for e in range(2):
        assert len(ranks[0][e]) == len(ranks[1][e]) == len(base[e])
        for b, (x, y) in enumerate(base[e]):
            (x0, y0), (x1, y1) = ranks[0][e][b], ranks[1][e][b]
            assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)  # rank r: rows r, r + 2, ...
            assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("source", ["local", "pipe"])
def test_every_way_of_running_serves_the_same_batches(tmp_path, shuffle, source):
    """Several uneven shards, a subset, a partial last batch: workers 0/1/4, streamed or in memory, 1 or 3 ranks;
    local shards are read at their samples' byte ranges, pipe: shards as a stream, and both give the same."""
    local, n = id_shards(tmp_path, [23, 9, 20, 17])
    pattern = local if source == "local" else f"pipe:cat {local}"
    skip = Subset(frozenset((f"ids-{s:03d}.tar", f"s{i:05d}") for s, i in ((0, 3), (2, 40), (3, 60))), keep=False)
    n -= 3
    transform = T.pretrain_transform("rrc_color_jitter", 4, (0.5,) * 3, (0.25,) * 3)

    def loader(workers=0, in_memory=False, rank=0, world_size=1, batch_size=12, pattern=pattern):
        return L.make_loader(pattern, num_samples=n, transform=transform, batch_size=batch_size, shuffle=shuffle,
                             seed=5, epoch=3, num_workers=workers, in_memory=in_memory, rank=rank,
                             world_size=world_size, subset=skip, allow_pipe=True)

    def run(**kw):
        return list(loader(**kw))

    assert (loader().stream.index is None) == (source == "pipe")  # byte ranges only for local .tar shards
    base = run()
    assert _same([base], [run(pattern=local)])
    assert [len(y) for _, y in base] == [12] * (n // 12) + [n % 12]
    labels = torch.cat([y for _, y in base]).tolist()
    assert (labels == sorted(labels)) != shuffle and len(set(labels)) == n and not {3, 40, 60} & set(labels)
    for kw in ({"workers": 1}, {"workers": 4}, {"in_memory": True}):
        assert _same([base], [run(**kw)]), kw
    ranks = [run(workers=w, rank=r, world_size=3, batch_size=4) for r, w in ((0, 0), (1, 2), (2, 0))]
    for b, (x, y) in enumerate(base):
        for r in range(3):
            assert torch.equal(x[r::3], ranks[r][b][0]) and torch.equal(y[r::3], ranks[r][b][1])


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reading_at_places_finds_what_streaming_reads(tmp_path, fmt):
    """Long names (ustar prefix, GNU long name, pax header), folders, a meta file and upper-case extensions: the
    header walk (or tarfile, where it gives up) groups samples as webdataset's reader does."""
    deep = "d" * 60 + "/" + "e" * 60
    names = [f"{deep}/s{i:03d}" if i % 3 else f"top/s{i:03d}" for i in range(9)]
    with tarfile.open(tmp_path / "odd.tar", "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("top"))  # a regular empty file with no extension: no sample
        folder = tarfile.TarInfo(deep)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            for ext, data in (("PNG", png(i)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        meta = tarfile.TarInfo("__meta__")
        tar.addfile(meta)
    shard = str(tmp_path / "odd.tar")
    assert [k for k, _ in sample_members(shard)] == [k for k, _ in read_samples(shard)] == names
    with open(shard, "rb") as f:
        assert all(read_sample_at(shard, f, k, m) == files
                   for (k, m), (_, files) in zip(sample_members(shard), read_samples(shard)))

    def labels(pattern):
        loader = L.make_loader(pattern, num_samples=9, transform=T.eval_transform(4, (0.5,) * 3, (0.25,) * 3),
                               batch_size=4, shuffle=True, seed=1, allow_pipe=True)
        return torch.cat([y for _, y in loader]).tolist()

    assert labels(shard) == labels(f"pipe:cat {shard}") and sorted(labels(shard)) == list(range(9))
