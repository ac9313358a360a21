"""`mae-lab data pack|info|get` through the installed entry point, in a subprocess: packing a train/ val/ tree and
an unlabeled folder to their summary line, a study run on each result, and refusals (exit 2, one line, nothing
written)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import dump_db, one_epoch_study
from PIL import Image

MAE_LAB = Path(sys.executable).parent / "mae-lab"  # the installed console script
pytestmark = pytest.mark.skipif(not MAE_LAB.exists(), reason="mae-lab is not installed beside this python")

def cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(MAE_LAB), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def photos(folder: Path, n: int, seed: int, fmt: str = "jpg") -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(8, 24)), int(rng.integers(8, 24))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.{fmt}")


def one_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, res.stdout + res.stderr
    return lines[0]


def test_pack_a_train_val_tree_then_run_a_study_on_it(workdir: Path):
    for split, n in (("train", 12), ("val", 4)):
        for c, fmt in (("cat", "jpg"), ("dog", "png")):
            photos(workdir / "tree" / split / c, n, seed=len(c) + n, fmt=fmt)
    (workdir / "tree" / "train" / "cat" / "notes.txt").write_text("not an image")
    res = cli(workdir, "data", "pack", "tree", "data/pets", "--shard-size", "10")
    assert res.returncode == 0, res.stderr
    assert one_line(res) == "packed pets into data/pets: train: 24, val: 8; 2 classes; 4 shards"
    meta = json.loads((workdir / "data/pets/dataset.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and set(meta["sha256"]) == {
        "pets-train-000000.tar", "pets-train-000001.tar", "pets-train-000002.tar", "pets-val-000000.tar"}
    assert meta["image_sizes"]["min"][0] >= 8 and meta["image_sizes"]["max"][0] < 24
    with tarfile.open(workdir / "data/pets/pets-train-000000.tar") as tar:
        members = tar.getmembers()
    assert {m.mtime for m in members} == {0} and {m.name.split(".")[-1] for m in members} == {"cls", "jpg", "png"}
    stored = {m.name: m.size for m in members if not m.name.endswith(".cls")}
    originals = sorted(p.stat().st_size for p in (workdir / "tree/train").rglob("img*"))
    assert all(size in originals for size in stored.values())  # files stored as they are
    res = cli(workdir, "data", "info", "data/pets/pets-train-{000000..000002}.tar")
    assert res.returncode == 0 and json.loads(res.stdout)["samples_per_class"] == {"0": 12, "1": 12}
    again = cli(workdir, "data", "pack", "tree", "data/pets2", "--shard-size", "10", "--name", "pets")
    assert again.returncode == 0 and all(
        (workdir / "data/pets" / n).read_bytes() == (workdir / "data/pets2" / n).read_bytes() for n in meta["sha256"])
    (workdir / "s.toml").write_text(one_epoch_study("packed", dataset="pets"))
    res = cli(workdir, "run", "s.toml", "--data-root", "data")
    assert res.returncode == 0, res.stdout + res.stderr
    with sqlite3.connect(workdir / "db/mae_lab.db") as c:
        assert c.execute("SELECT status FROM mae_trials").fetchall() == [("done",)]


def test_pack_an_unlabeled_folder_then_pretrain_on_it(workdir: Path):
    photos(workdir / "photos", 30, seed=1)
    photos(workdir / "photos" / "more", 5, seed=2, fmt="png")  # nested folders of images are fine too: no classes
    res = cli(workdir, "data", "pack", "photos", "data/photos")
    assert res.returncode == 0, res.stderr
    assert one_line(res) == "packed photos into data/photos: train: 35; unlabeled; 1 shards"
    meta = json.loads((workdir / "data/photos/dataset.json").read_text())
    assert meta["classes"] == [] and meta["splits"]["train"]["samples"] == 35
    with tarfile.open(workdir / "data/photos/photos-train-000000.tar") as tar:
        assert not [m for m in tar.getmembers() if m.name.endswith(".cls")]
    (workdir / "s.toml").write_text(one_epoch_study("packed", dataset="digits", pretrain_dataset="photos"))
    res = cli(workdir, "run", "s.toml", "--data-root", "data")
    assert res.returncode == 0, res.stdout + res.stderr
    with sqlite3.connect(workdir / "db/mae_lab.db") as c:
        assert c.execute("SELECT status FROM mae_trials").fetchall() == [("done",)]


@pytest.mark.parametrize(("make", "message"), [
    (lambda w: None, "error: nothere: no such folder"),
    (lambda w: (w / "nothere").mkdir(), "error: nothere: no images found"),
    (lambda w: ((w / "nothere").mkdir(), (w / "nothere/a.txt").write_text("x")), "error: nothere: no images found"),
    (lambda w: (photos(w / "nothere", 2, 0), (w / "nothere/bad.jpg").write_bytes(b"not a jpeg")),
     "error: nothere/bad.jpg: not an image PIL can read"),
])
def test_pack_refuses_a_bad_source_and_writes_nothing(workdir: Path, make, message):
    make(workdir)
    before = dump_db(workdir / "db" / "mae_lab.db")
    res = cli(workdir, "data", "pack", "nothere", "out/x")
    assert res.returncode == 2 and one_line(res).startswith(message), res.stderr
    assert not (workdir / "out").exists() or not any((workdir / "out").iterdir())  # no partial output folder
    assert dump_db(workdir / "db" / "mae_lab.db") == before


def test_data_get_and_info_refusals(workdir: Path):
    res = cli(workdir, "data", "get", "imagenet")
    assert res.returncode == 2 and "cannot fetch 'imagenet'" in one_line(res)
    (workdir / "root/cifar10").mkdir(parents=True)
    (workdir / "root/cifar10/dataset.json").write_text("{}")  # already there: nothing to download
    res = cli(workdir, "data", "get", "cifar10", "--data-root", "root")
    assert res.returncode == 0 and one_line(res).startswith("cifar10: shards and dataset.json in ")
    (workdir / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    res = cli(workdir, "data", "info", "junk.tar")
    assert res.returncode == 2 and one_line(res).startswith("error: junk.tar: not a tar archive")
