"""Behaviour of mae_lab.data: datasets, shards, loaders, errors; synthetic shards carry their sample id as label."""

import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from mae_lab import data as D
from mae_lab.data import DataError
from mae_lab.data import catalog as _catalog  # noqa: F401  (D.catalog, D.verify)
from mae_lab.data import loading as L
from mae_lab.data import transforms as T

SHARED = SHARED_DATA
CIFAR = SHARED / "cifar10"
needs_cifar = pytest.mark.skipif(not (CIFAR / "dataset.json").is_file(), reason="shared CIFAR-10 shards not present")


# ------------------------------------------------------------------------------------------------------------ helpers


def png(value: int, size=(4, 4), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def id_shards(folder: Path, counts: list[int], prefix="ids") -> tuple[str, int]:
    """Shards whose sample i has label i (and pixel value i % 256): labels identify samples."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for s, n in enumerate(counts):
        members = []
        for _ in range(n):
            members += [(f"s{i:05d}.png", png(i % 256)), (f"s{i:05d}.cls", str(i).encode())]
            i += 1
        write_tar(folder / f"{prefix}-{s:03d}.tar", members)
    return str(folder / f"{prefix}-{{000..{len(counts) - 1:03d}}}.tar"), i


def labels_of(loader) -> list[int]:
    batches = list(loader)
    assert len(batches) == len(loader)
    return [int(y) for _, labels in batches for y in labels]


def tiny_eval():
    return T.eval_transform(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _pack_digits_in(cache: str) -> None:
    D.resolve_dataset("digits", cache_dir=cache)


# ------------------------------------------------------------------------------------------------------------- digits


def test_digits_packs_once_with_a_fixed_split(tmp_path):
    info = D.resolve_dataset(cache_dir=tmp_path / "a")
    assert (info.name, info.num_train, info.num_val, info.num_classes) == ("digits", 1497, 300, 10)
    assert info.image_size == (8, 8)
    meta_path = tmp_path / "a" / "digits-v2" / "dataset.json"
    stamp = meta_path.stat().st_mtime_ns
    assert D.resolve_dataset("digits", cache_dir=tmp_path / "a") == info
    assert meta_path.stat().st_mtime_ns == stamp  # not repacked
    assert os.listdir(tmp_path / "a") == ["digits-v2"]  # no temp folders left behind
    meta = json.loads(meta_path.read_text())
    D.resolve_dataset(cache_dir=tmp_path / "b")
    other = json.loads((tmp_path / "b/digits-v2/dataset.json").read_text())
    assert meta["sha256"] == other["sha256"]  # same split, byte-identical shards
    assert info.mean == tuple(meta["mean"]) and 0.2 < info.mean[0] < 0.4


def test_digits_pack_survives_a_race(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_pack_digits_in, args=(str(tmp_path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert os.listdir(tmp_path) == ["digits-v2"]
    assert D.resolve_dataset(cache_dir=tmp_path).num_train == 1497


def test_digits_loader_yields_normalised_rgb_batches(tmp_path):
    info = D.resolve_dataset(cache_dir=tmp_path)
    transform = T.pretrain_transform("random_resized_crop", 8, info.mean, info.std)
    loader = L.make_loader(info.train, num_samples=info.num_train, transform=transform, batch_size=256, shuffle=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    x, y = batches[0]
    assert x.shape == (256, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == 1497 and set(labels.tolist()) == set(range(10))
    val = L.make_loader(info.val, num_samples=info.num_val, transform=T.eval_transform(8, info.mean, info.std),
                        batch_size=128, shuffle=False, drop_last=True)
    assert len(val) == 2 and [len(b) for b, _ in val] == [128, 128]


# -------------------------------------------------------------------------------------------------------- resolution


@needs_cifar
def test_cifar10_resolves_from_data_root():
    info = D.resolve_dataset("cifar10", data_root=SHARED)
    assert (info.num_train, info.num_val, info.num_test, info.num_classes, info.image_size) == \
        (45000, 5000, 10000, 10, (32, 32))
    assert info.test.endswith("cifar10-test-{000000..000001}.tar") and Path(info.train).is_absolute()
    assert info.val == info.train and len(info.holdout) == 5000
    assert info.mean == D.CIFAR10_MEAN and len(D.expand_shards(info.train)) == 10
    assert D.resolve_dataset("cifar10", data_root=SHARED, val_holdout=1000).num_train == 49000
    other = D.resolve_dataset("cifar10", data_root=SHARED, val_seed=1)
    assert other.holdout != info.holdout and other.fingerprint == info.fingerprint  # same data, another holdout
    # explicit patterns beside a dataset.json read its counts and classes
    explicit = D.resolve_dataset(train=info.train, val=info.test)
    assert (explicit.num_train, explicit.classes, explicit.mean) == (50000, info.classes, D.CIFAR10_MEAN)


def test_missing_named_dataset_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_LAB_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"dataset 'cifar10' not found: no .*cifar10/dataset.json; fetch it with "
                                        r"'mae-lab data get cifar10'"):
        D.resolve_dataset("cifar10")


def test_explicit_patterns_are_counted_once_and_cached(tmp_path, monkeypatch):
    train, n_train = id_shards(tmp_path / "train", [7, 5])
    val, n_val = id_shards(tmp_path / "val", [4])
    info = D.resolve_dataset(train=train, val=val, cache_dir=tmp_path / "cache")
    assert (info.num_train, info.num_val, info.num_classes, info.image_size) == (12, 4, 12, (4, 4))
    assert info.mean == D.IMAGENET_MEAN
    monkeypatch.setattr(D.catalog, "scan", lambda shards, **_: pytest.fail("counted again"))
    assert D.resolve_dataset(train=train, val=val, cache_dir=tmp_path / "cache") == info


def test_dataset_info_summarises_shards(tmp_path):
    pattern, n = id_shards(tmp_path, [3, 2])
    summary = D.dataset_info(pattern)
    assert (summary["shards"], summary["samples"], summary["image_sizes"]) == (2, 5, {"4x4": 5})
    assert summary["samples_per_class"] == {i: 1 for i in range(5)}


# ---------------------------------------------------------------------------------------------- splitting, shuffling


@pytest.mark.parametrize(("counts", "world_size", "num_workers"), [
    ([23, 20, 20, 20, 20], 2, 0),
    ([23, 20, 20, 20, 20], 2, 2),
    ([23, 20, 20, 20, 20], 1, 2),
    ([30, 30, 43], 2, 2),
    ([103], 2, 0),
])
@pytest.mark.parametrize("shuffle", [True, False])
def test_an_epoch_covers_every_sample_exactly_once(tmp_path, counts, world_size, num_workers, shuffle):
    pattern, n = id_shards(tmp_path, counts)
    seen = []
    for rank in range(world_size):
        loader = L.make_loader(pattern, num_samples=n, transform=tiny_eval(), batch_size=8, shuffle=shuffle, seed=3,
                               epoch=1, num_workers=num_workers, rank=rank, world_size=world_size)
        got = labels_of(loader)
        assert len(got) == loader.num_samples
        seen += got
    assert sorted(seen) == list(range(n))


def test_drop_last_drops_only_the_final_partial_batch(tmp_path):
    pattern, n = id_shards(tmp_path, [13, 12, 12])  # 37 samples
    loader = L.make_loader(pattern, num_samples=n, transform=tiny_eval(), batch_size=5, shuffle=True,
                           num_workers=2, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 7 and all(len(y) == 5 for _, y in batches)


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    pattern, n = id_shards(tmp_path, [40, 40, 40])
    transform = T.pretrain_transform("rrc_color_jitter", 4, (0.5,) * 3, (0.25,) * 3)

    def epoch(epoch, seed=0, workers=0):
        loader = L.make_loader(pattern, num_samples=n, transform=transform, batch_size=16, shuffle=True, seed=seed,
                               epoch=epoch, num_workers=workers)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys).tolist()

    (x0, a), (x1, b) = epoch(0), epoch(0)
    assert a == b and torch.equal(x0, x1)  # same order and same augmentations
    torch.manual_seed(123)  # the global RNG does not matter
    assert epoch(0)[1] == a
    assert epoch(1)[1] != a and epoch(0, seed=1)[1] != a
    assert epoch(2, workers=2)[1] == epoch(2)[1]  # loader workers do not change the order
    unshuffled = L.make_loader(pattern, num_samples=n, transform=tiny_eval(), batch_size=16, shuffle=False)
    assert labels_of(unshuffled) == list(range(n))


def test_a_wrong_sample_count_is_an_error(tmp_path):
    pattern, n = id_shards(tmp_path, [10, 10])
    loader = L.make_loader(pattern, num_samples=n + 1, transform=tiny_eval(), batch_size=4, shuffle=False)
    with pytest.raises(DataError, match="expected 21 samples for this rank, read 20"):
        list(loader)
    with pytest.raises(DataError, match="num_samples is 21 but the shards hold 20"):
        L.make_loader(pattern, num_samples=n + 1, transform=tiny_eval(), batch_size=4, shuffle=False, world_size=2)


# ------------------------------------------------------------------------------------------------------ in-memory


def test_in_memory_loader_matches_streaming(tmp_path):
    pattern, n = id_shards(tmp_path, [23, 20, 20])
    images, labels = L.load_split(pattern)
    assert images.shape == (n, 3, 4, 4) and images.dtype == torch.uint8 and labels.tolist() == list(range(n))
    assert torch.equal(images[:, 0, 0, 0], (labels % 256).to(torch.uint8))
    for world_size, workers in ((1, 0), (2, 2)):
        seen = []
        for rank in range(world_size):
            kw = dict(num_samples=n, transform=tiny_eval(), batch_size=8, shuffle=True, epoch=4, rank=rank,
                      world_size=world_size, num_workers=workers)
            memory, stream = L.make_loader(pattern, in_memory=True, **kw), L.make_loader(pattern, **kw)
            assert len(memory) == len(stream) and isinstance(memory, L.MemoryLoader)
            got = labels_of(memory)
            assert len(got) == memory.num_samples
            seen += got
        assert sorted(seen) == list(range(n))
    a, b = (labels_of(L.make_loader(pattern, num_samples=n, transform=tiny_eval(), batch_size=8, shuffle=True,
                                    epoch=e, in_memory=True)) for e in (0, 1))
    assert a != b and sorted(a) == sorted(b)


@needs_cifar
def test_in_memory_cifar_gives_the_same_samples_as_streaming():
    pattern = str(CIFAR / "cifar10-test-{000000..000001}.tar")
    transform = T.eval_transform(32, D.CIFAR10_MEAN, D.CIFAR10_STD)
    kw = dict(num_samples=10000, transform=transform, batch_size=500, shuffle=True)
    stream, memory = L.make_loader(pattern, **kw), L.make_loader(pattern, in_memory=True, **kw)
    xs, ys = zip(*stream)
    xm, ym = zip(*memory)
    assert Counter(torch.cat(ys).tolist()) == Counter(torch.cat(ym).tolist()) == {c: 1000 for c in range(10)}
    # same pixels: the per-sample sums agree as multisets
    assert torch.allclose(torch.cat(xs).sum((1, 2, 3)).sort().values, torch.cat(xm).sum((1, 2, 3)).sort().values)


# ----------------------------------------------------------------------------------------------------- bad inputs


def test_patterns_matching_nothing_or_partly(tmp_path):
    with pytest.raises(DataError, match=r"no shards match '.*foo/bar-\{000..003\}.tar'"):
        D.expand_shards(str(tmp_path / "foo/bar-{000..003}.tar"))
    id_shards(tmp_path, [1, 1], prefix="bar")
    with pytest.raises(DataError, match=r"shard '.*bar-002.tar' is missing \(2 of 4 found\)"):
        D.expand_shards(str(tmp_path / "bar-{000..003}.tar"))


def test_pipe_patterns_are_refused(tmp_path):
    for call in (lambda: D.expand_shards("pipe:cat x.tar"),
                 lambda: D.resolve_dataset(train="pipe:cat a.tar", val="pipe:cat b.tar", cache_dir=tmp_path),
                 lambda: L.make_loader("pipe:cat a.tar", num_samples=1, transform=tiny_eval(), batch_size=1,
                                       shuffle=False)):
        with pytest.raises(DataError, match="refusing shard pattern 'pipe:cat .*allow_pipe=True"):
            call()
    pattern, _ = id_shards(tmp_path, [3])
    loader = L.make_loader(f"pipe:cat {pattern}", num_samples=3, transform=tiny_eval(), batch_size=2, shuffle=False,
                           allow_pipe=True)
    assert labels_of(loader) == [0, 1, 2]


@pytest.mark.parametrize(("members", "message"), [
    ([("a.png", png(1)), ("a.cls", b"1"), ("b.jpg", b"not an image"), ("b.cls", b"2")],
     r"bad.tar: sample 'b': image could not be decoded \(cannot identify image file\)"),
    ([("a.png", png(1)), ("a.cls", b"1"), ("b.png", png(2))],
     r"bad.tar: sample 'b': missing label \('cls' or field 'label' of 'json'\)"),
    ([("a.png", png(1)), ("a.cls", b"abc")], r"bad.tar: sample 'a': label 'abc' is not an integer"),
    ([("a.cls", b"1")], r"bad.tar: sample 'a': no image"),
])
@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_name_shard_and_key(tmp_path, members, message, workers):
    write_tar(tmp_path / "bad.tar", members)
    loader = L.make_loader(str(tmp_path / "bad.tar"), num_samples=2, transform=tiny_eval(), batch_size=1,
                           shuffle=False, num_workers=workers)
    with pytest.raises(DataError, match=message) as err:
        list(loader)
    assert "\n" not in str(err.value)


def test_truncated_tar_at_a_member_boundary_is_an_error(tmp_path):
    path = write_tar(tmp_path / "cut.tar", [("a.png", png(1)), ("a.cls", b"1"), ("b.png", png(2)), ("b.cls", b"2")])
    with tarfile.open(path) as tar:
        end_of_a = next(m for m in tar.getmembers() if m.name == "a.cls").offset_data + 512
    path.write_bytes(path.read_bytes()[:end_of_a])
    with pytest.raises(DataError, match=r"cut.tar: sample 'a': truncated tar \(ends before the end-of-archive"):
        list(L.make_loader(str(path), num_samples=2, transform=tiny_eval(), batch_size=4, shuffle=False))


@needs_cifar
def test_truncated_cifar_shard_names_shard_and_key(tmp_path):
    path = tmp_path / "cifar10-test-000000.tar"
    path.write_bytes((CIFAR / path.name).read_bytes()[:1_000_003])
    loader = L.make_loader(str(path), num_samples=5000, transform=T.eval_transform(32, D.CIFAR10_MEAN, D.CIFAR10_STD),
                           batch_size=256, shuffle=False)
    with pytest.raises(DataError, match=r"^cifar10-test-000000.tar: sample 'test_\d+': truncated tar"):
        list(loader)
    with pytest.raises(DataError, match="cifar10-test-000000.tar: sample 'test_"):
        L.load_split(str(path))


# ------------------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("mode", T.AUGMENTATIONS)
@pytest.mark.parametrize("size", [8, 32])
def test_pretrain_transforms_give_normalised_float_images(mode, size):
    transform = T.pretrain_transform(mode, size, D.CIFAR10_MEAN, D.CIFAR10_STD)
    x = transform(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_eval_transform_normalises_and_unknown_modes_fail():
    x = T.eval_transform(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(torch.full((3, 4, 4), 255, dtype=torch.uint8))
    assert torch.allclose(x, torch.full((3, 4, 4), 2.0))
    with pytest.raises(DataError, match="unknown augmentation 'flip'"):
        T.pretrain_transform("flip", 32, D.CIFAR10_MEAN, D.CIFAR10_STD)


# ------------------------------------------------------------------------------------------------- packing, fetching


def _image_folder(root: Path, classes=("cat", "dog"), per_class=3) -> dict[int, int]:
    """Class folders of solid-colour RGB images; returns {pixel value: class index}."""
    values = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = 40 * c + 10 * i + 5
            Image.new("RGB", (6, 5), (value, value, value)).save(root / name / f"{i}.{'bmp' if i == 2 else 'png'}")
            values[value] = c
    return values


def test_pack_imagefolder_round_trip(tmp_path):
    values = _image_folder(tmp_path / "src")
    meta = D.pack_imagefolder(tmp_path / "src", tmp_path / "out", shard_size=2, val_fraction=1 / 3)
    assert meta["classes"] == ["cat", "dog"] and meta["image_size"] == [5, 6]
    assert {k: v["samples"] for k, v in meta["splits"].items()} == {"train": 4, "val": 2}
    assert json.loads((tmp_path / "out/dataset.json").read_text()) == meta
    for name, digest in meta["sha256"].items():
        assert D.verify.file_sha256(tmp_path / "out" / name) == digest
    info = D.resolve_dataset(train=str(tmp_path / "out" / meta["splits"]["train"]["shards"]),
                             val=str(tmp_path / "out" / meta["splits"]["val"]["shards"]), cache_dir=tmp_path / "c")
    assert (info.name, info.classes, info.num_train, info.num_val) == ("out", ("cat", "dog"), 4, 2)
    got = {}
    for pattern in (info.train, info.val):
        images, labels = L.load_split(pattern)
        got.update({int(im[0, 0, 0]): int(y) for im, y in zip(images, labels)})
    assert got == values
    with pytest.raises(DataError, match="already exists"):
        D.pack_imagefolder(tmp_path / "src", tmp_path / "out")


def test_pack_imagefolder_keeps_train_and_val_folders(tmp_path):
    _image_folder(tmp_path / "src/train")
    _image_folder(tmp_path / "src/val", per_class=1)
    meta = D.pack_imagefolder(tmp_path / "src", tmp_path / "data/mine", name="mine")
    assert {k: v["samples"] for k, v in meta["splits"].items()} == {"train": 6, "val": 2}
    info = D.resolve_dataset("mine", data_root=tmp_path / "data")
    assert (info.num_train, info.num_val, info.mean) == (6, 2, tuple(meta["mean"]))


def test_get_dataset_without_network_fails_cleanly(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"could not download cifar10 \(.*name resolution.*\); check network access"):
        D.get_dataset("cifar10", tmp_path)
    assert not (tmp_path / "cifar10").exists()
    with pytest.raises(DataError, match="cannot fetch 'mnist'"):
        D.get_dataset("mnist", tmp_path)


def test_import_has_no_side_effects(tmp_path):
    code = "import threading, mae_lab.data; assert threading.active_count() == 1"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    assert os.listdir(tmp_path) == []
