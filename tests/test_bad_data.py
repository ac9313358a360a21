"""Broken shards and dataset folders: `mae-lab run` refuses them before training, with exit code 2, one line that
names the shard and the sample key, and the database unchanged."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import dump_db
from PIL import Image
from typer.testing import CliRunner

from cli import app


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, files in enumerate(samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good(n: int, offset: int = 0) -> list[dict[str, bytes]]:
    return [{"png": png(offset + i), "cls": str(i % 2).encode()} for i in range(n)]


def broken(kind: str) -> list[dict[str, bytes]]:
    samples = good(6)
    if kind == "undecodable":
        samples[3]["png"] = b"\x89PNG\r\n\x1a\n this is not an image"
    elif kind == "missing_label":
        del samples[3]["cls"]
    elif kind == "non_integer_label":
        samples[3]["cls"] = b"cat"
    elif kind == "missing_image":
        del samples[3]["png"]
    elif kind == "json_label_not_integer":
        samples[3] = {"png": samples[3]["png"], "json": b'{"label": "cat"}'}
    return samples


def study(train: str, val: str) -> str:
    return f'[study]\nname = "s"\n[data]\ntrain = "{train}"\nval = "{val}"\n[model]\npreset = "vit_digits"\n'


CASES = {
    "undecodable": "sample 's0003': image could not be decoded",
    "missing_label": "sample 's0003': missing label ('cls' or field 'label' of 'json')",
    "non_integer_label": "sample 's0003': label 'cat' is not an integer",
    "missing_image": "sample 's0003': no image",
    "json_label_not_integer": "sample 's0003': label 'cat' is not an integer",
}


def run_refused(workdir: Path, text: str, *extra: str) -> str:
    from mae_lab.store.engine import connect

    connect("sqlite:///db/mae_lab.db").dispose()  # an existing database: it must not change
    before = dump_db(workdir / "db" / "mae_lab.db")
    (workdir / "s.toml").write_text(text)
    res = CliRunner().invoke(app, ["run", "s.toml", *extra])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "s.toml" in lines[0]
    assert dump_db(workdir / "db" / "mae_lab.db") == before
    return lines[0]


@pytest.mark.parametrize("kind", list(CASES))
def test_broken_sample_is_named(workdir: Path, kind: str):
    write_shard(workdir / "train-000000.tar", good(6))
    write_shard(workdir / "train-000001.tar", broken(kind))
    write_shard(workdir / "val-000000.tar", good(4, 100))
    line = run_refused(workdir, study(f"{workdir}/train-{{000000..000001}}.tar", f"{workdir}/val-000000.tar"))
    assert "train-000001.tar" in line and CASES[kind] in line, line


def test_truncated_tar_is_named(workdir: Path):
    write_shard(workdir / "train-000000.tar", good(6))
    data = (workdir / "train-000000.tar").read_bytes()
    (workdir / "train-000000.tar").write_bytes(data[: len(data) // 2])
    write_shard(workdir / "val-000000.tar", good(4, 100))
    line = run_refused(workdir, study(f"{workdir}/train-000000.tar", f"{workdir}/val-000000.tar"))
    assert "train-000000.tar" in line and ("truncated" in line or "ends" in line), line


def test_not_a_tar_is_named(workdir: Path):
    write_shard(workdir / "train-000000.tar", good(6))
    (workdir / "train-000001.tar").write_bytes(b"<html>404 not found</html>" * 40)
    write_shard(workdir / "val-000000.tar", good(4, 100))
    line = run_refused(workdir, study(f"{workdir}/train-{{000000..000001}}.tar", f"{workdir}/val-000000.tar"))
    assert "train-000001.tar: not a tar archive" in line, line


def make_dataset(root: Path, *, declared_train: int, classes: int = 2, sha256: dict | None = None) -> None:
    folder = root / "toy"
    folder.mkdir(parents=True)
    write_shard(folder / "toy-train-000000.tar", good(6))
    write_shard(folder / "toy-test-000000.tar", good(4, 100))
    (folder / "dataset.json").write_text(json.dumps({
        "name": "toy", "classes": [str(c) for c in range(classes)], "image_size": [8, 8],
        "splits": {"train": {"samples": declared_train, "shards": "toy-train-{000000..000000}.tar"},
                   "test": {"samples": 4, "shards": "toy-test-{000000..000000}.tar"}}, "sha256": sha256 or {}}))


def test_dataset_json_that_disagrees_with_the_shards(workdir: Path):
    make_dataset(workdir / "data", declared_train=60)
    line = run_refused(workdir, '[study]\nname = "s"\n[data]\ndataset = "toy"\n', "--data-root", "data")
    assert "hold 6 samples but dataset.json says 60" in line, line


def test_label_out_of_range_for_the_declared_classes(workdir: Path):
    make_dataset(workdir / "data", declared_train=6, classes=1)
    line = run_refused(workdir, '[study]\nname = "s"\n[data]\ndataset = "toy"\n', "--data-root", "data")
    assert "label 1 is out of range for 1 classes" in line and "toy-train-000000.tar" in line, line


def test_a_good_shard_is_verified_once(workdir: Path, digits_cache: Path):
    from mae_lab.data import verify_split

    write_shard(workdir / "t.tar", good(5))
    assert verify_split(str(workdir / "t.tar"), 5, cache_dir=workdir / "c") == 5
    assert len(list((workdir / "c" / "verified").glob("*.json"))) == 1
    assert verify_split(str(workdir / "t.tar"), 5, cache_dir=workdir / "c") == 5  # from the mark


def test_checksum_mismatch_is_refused(workdir: Path):
    make_dataset(workdir / "data", declared_train=6, sha256={"toy-train-000000.tar": "0" * 64})
    line = run_refused(workdir, '[study]\nname = "s"\n[data]\ndataset = "toy"\n', "--data-root", "data")
    assert "toy-train-000000.tar: checksum mismatch" in line, line


def test_a_matching_checksum_is_checked_once(workdir: Path):
    from mae_lab.data import verify_split
    from mae_lab.data.verify import file_sha256

    write_shard(workdir / "t.tar", good(5))
    digest = {"t.tar": file_sha256(workdir / "t.tar")}
    assert verify_split(str(workdir / "t.tar"), 5, sha256=digest, cache_dir=workdir / "c") == 5
    assert len(list((workdir / "c" / "sha256").glob("*.txt"))) == 1
    with pytest.raises(Exception, match="checksum mismatch"):
        verify_split(str(workdir / "t.tar"), 5, sha256={"t.tar": "f" * 64}, cache_dir=workdir / "c")


def test_val_holdout_as_large_as_the_training_split_names_the_key(workdir: Path):
    make_dataset(workdir / "data", declared_train=6)
    line = run_refused(workdir, '[study]\nname = "s"\n[data]\ndataset = "toy"\nval_holdout = 6\n', "--data-root",
                       "data")
    assert "data.val_holdout" in line and "6 samples" in line, line


def test_a_missing_label_is_refused_only_where_labels_are_needed(workdir: Path):
    write_shard(workdir / "train-000000.tar", good(6))
    write_shard(workdir / "train-000001.tar", broken("missing_label"))
    write_shard(workdir / "val-000000.tar", good(4, 100))
    text = study(f"{workdir}/train-{{000000..000001}}.tar", f"{workdir}/val-000000.tar")
    text += "[pretrain]\nepochs = 1\nbatch_size = 4\nwarmup_epochs = 0\n[eval.linear]\nenabled = false\n" \
            "[eval.finetune]\nenabled = false\n"
    (workdir / "p.toml").write_text(text)
    res = CliRunner().invoke(app, ["run", "p.toml"])  # pretraining only: the unlabeled sample is fine
    assert res.exit_code == 0, res.output
