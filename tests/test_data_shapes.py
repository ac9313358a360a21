"""Shards in the shapes users bring, written by webdataset's own ShardWriter: each is read, and a tiny study trains
on it for one epoch (pretraining, the linear probe and the reconstruction artifact) to a done trial."""
from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import one_epoch_study
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mae_lab import data as D
from mae_lab.data import loading as L
from mae_lab.data import transforms as T


def image(i: int, fmt: str, *, size=(8, 8), mode="RGB") -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode != "P" else im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def sample(i: int, shape: str) -> dict:
    key, label = f"s{i:05d}", i % 2
    if shape == "png_cls":
        return {"__key__": key, "png": image(i, "PNG"), "cls": str(label).encode()}
    if shape == "jpg_json":
        return {"__key__": key, "jpg": image(i, "JPEG"), "json": json.dumps({"label": label, "url": "x"}).encode()}
    if shape == "webp":
        return {"__key__": key, "webp": image(i, "WEBP"), "cls": str(label).encode()}
    if shape == "variable_sizes":
        size = (6 + i % 7, 5 + (3 * i) % 11)
        return {"__key__": key, "jpeg": image(i, "JPEG", size=size), "cls": str(label).encode()}
    if shape in ("gray_rgba_palette", "tgz"):
        mode = ("L", "RGBA", "P", "LA")[i % 4] if shape != "tgz" else "RGB"
        return {"__key__": key, "png": image(i, "PNG", mode=mode), "cls": str(label).encode()}
    if shape == "unlabeled":  # img2dataset's shape: jpg + txt + json without a label
        return {"__key__": key, "jpg": image(i, "JPEG", size=(12, 10)), "txt": b"a caption",
                "json": json.dumps({"caption": "a caption", "width": 12}).encode()}
    raise ValueError(shape)


def write(folder: Path, split: str, shape: str, n: int, offset: int = 0, per_shard: int = 12) -> str:
    """n samples in shards of `per_shard` via ShardWriter; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = "tgz" if shape == "tgz" else "tar"
    with wds.ShardWriter(str(folder / f"{split}-%06d.{ext}"), maxcount=per_shard, verbose=0) as sink:
        for i in range(offset, offset + n):
            sink.write(sample(i, shape))
    last = (n - 1) // per_shard
    return str(folder / f"{split}-{{000000..{last:06d}}}.{ext}")


def run_study(workdir: Path, **data: str) -> list[tuple]:
    (workdir / "s.toml").write_text(one_epoch_study("shape", **data))
    res = CliRunner().invoke(app, ["run", "s.toml"])
    assert res.exit_code == 0, res.output
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        return c.execute("SELECT t.status, r.linear_top1 FROM mae_trials t JOIN mae_results r ON r.trial_id = t.id "
                         ).fetchall()


LABELED = ["png_cls", "jpg_json", "webp", "variable_sizes", "gray_rgba_palette", "tgz"]


@pytest.mark.parametrize("shape", LABELED)
def test_labeled_shape_is_read_and_trained_on(workdir: Path, shape: str):
    train, val = write(workdir / "d", "train", shape, 30), write(workdir / "d", "val", shape, 10, offset=100)
    info = D.resolve_dataset(train=train, val=val, cache_dir=workdir / "c")
    assert (info.num_train, info.num_val, info.num_classes) == (30, 10, 2)
    loader = L.make_loader(train, num_samples=30, transform=T.eval_transform(8, info.mean, info.std), batch_size=16,
                           shuffle=False)
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(16, 3, 8, 8), (14, 3, 8, 8)]
    assert [int(y) for _, ys in batches for y in ys] == [i % 2 for i in range(30)]
    rows = run_study(workdir, train=train, val=val)
    assert [status for status, _ in rows] == ["done"] and rows[0][1] is not None
    assert list((workdir / "db").rglob("recon/*.png")) or list(workdir.rglob("recon/*.png"))  # the artifact too


def test_unlabeled_shards_pretrain_and_the_labeled_digits_probe(workdir: Path):
    shards = write(workdir / "u", "train", "unlabeled", 40)
    with pytest.raises(D.DataError, match=r"train-000000.tar: sample 's00000': missing label"):
        list(L.make_loader(shards, num_samples=40, transform=T.eval_transform(8, D.IMAGENET_MEAN, D.IMAGENET_STD),
                           batch_size=8, shuffle=False))
    x, y = next(iter(L.make_loader(shards, num_samples=40, batch_size=8, shuffle=True, need_label=False,
                                   transform=T.pretrain_transform("random_resized_crop", 8, D.IMAGENET_MEAN,
                                                                  D.IMAGENET_STD))))
    assert x.shape == (8, 3, 8, 8) and y.tolist() == [-1] * 8
    info = D.resolve_dataset("digits", cache_dir=None, pretrain_shards=shards)
    assert info.pretrain.num_train == 40 and info.pretrain.classes == ()
    assert info.pretrain_fingerprint != D.resolve_dataset("digits").pretrain_fingerprint
    rows = run_study(workdir, dataset="digits", pretrain_shards=shards)
    assert [status for status, _ in rows] == ["done"] and rows[0][1] is not None


def test_pretraining_source_is_part_of_the_trial_identity(workdir: Path):
    shards = write(workdir / "u", "train", "unlabeled", 20)
    (workdir / "s.toml").write_text(one_epoch_study("shape", dataset="digits")
                                    + f'\n[[cases]]\n"data.pretrain_shards" = "{shards}"\n'
                                    '\n[[cases]]\n"data.pretrain_dataset" = "digits"\n')
    res = CliRunner().invoke(app, ["run", "s.toml"])
    assert res.exit_code == 0, res.output
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        hashes = c.execute("SELECT hash FROM mae_trials").fetchall()
    assert len(set(hashes)) == 2


def test_holdout_split_is_exact_disjoint_and_seeded(workdir: Path):
    folder = workdir / "data" / "toy"
    write(folder, "toy-train", "png_cls", 40)
    write(folder, "toy-test", "png_cls", 10, offset=100)
    (folder / "dataset.json").write_text(json.dumps({
        "name": "toy", "classes": ["a", "b"], "image_size": [8, 8],
        "splits": {"train": {"samples": 40, "shards": "toy-train-{000000..000003}.tar"},
                   "test": {"samples": 10, "shards": "toy-test-{000000..000000}.tar"}}}))
    info = D.resolve_dataset("toy", data_root=workdir / "data", val_holdout=7, val_seed=3)
    assert (info.num_train, info.num_val, info.num_test) == (33, 7, 10)
    tf = T.eval_transform(8, info.mean, info.std)
    seen = {}
    for split in ("train", "val", "test"):
        pattern, n, subset = info.split(split)
        loader = L.make_loader(pattern, num_samples=n, transform=tf, batch_size=5, shuffle=False, subset=subset)
        seen[split] = [int(y) for _, ys in loader for y in ys]
        assert len(seen[split]) == n
    again = D.resolve_dataset("toy", data_root=workdir / "data", val_holdout=7, val_seed=3)
    assert again.holdout == info.holdout != D.resolve_dataset("toy", data_root=workdir / "data", val_holdout=7).holdout
    default = D.resolve_dataset("toy", data_root=workdir / "data")
    assert (default.num_train, default.num_val) == (36, 4)  # 10% by default
