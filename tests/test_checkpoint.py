"""The checkpoint format: atomic writes, sha256 checks, weights_only loading, the trusted official import."""
import argparse
import os
import pickle

import pytest
import torch

from mae_lab.train.checkpoint import CheckpointError, import_official, load_checkpoint, save_checkpoint, sha256_file


def _ckpt() -> dict:
    return {"model": {"w": torch.randn(3, 4), "b": torch.zeros(4)}, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 2, "step": 10, "rng": {"torch": torch.get_rng_state(), "cuda": None},
            "config": {"embed_dim": 64, "mask_ratio": 0.75}, "spec": {"seed": 0, "data": {"dataset": "digits"}},
            "loss_history": [1.0, 0.5]}


def test_save_is_atomic_and_hash_checked(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    ckpt = _ckpt()
    sha = save_checkpoint(path, ckpt)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp file left behind
    assert sha == sha256_file(path)
    back = load_checkpoint(path, sha256=sha)
    assert torch.equal(back["model"]["w"], ckpt["model"]["w"])
    assert torch.equal(back["rng"]["torch"], ckpt["rng"]["torch"])
    assert back["config"] == {"embed_dim": 64, "mask_ratio": 0.75} and back["loss_history"] == [1.0, 0.5]

    sha2 = save_checkpoint(path, {**_ckpt(), "epoch": 3})  # overwriting replaces the file whole
    assert sha2 != sha and load_checkpoint(path, sha256=sha2)["epoch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    sha = save_checkpoint(path, _ckpt())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-written file, as a crash without atomic writes leaves
    with pytest.raises(CheckpointError, match="sha256 mismatch") as exc:
        load_checkpoint(path, sha256=sha)
    assert str(path) in str(exc.value)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)  # without a hash, still refused rather than half-loaded


def test_failed_save_leaves_no_temp_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"bad": lambda: 0})  # a lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []


def test_pickled_objects_are_refused_and_import_official_reads_them(tmp_path):
    path = tmp_path / "checkpoint-799.pth"
    weights = {"cls_token": torch.randn(1, 1, 8), "blocks.0.attn.qkv.weight": torch.randn(24, 8)}
    torch.save({"model": weights, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}, path)
    with pytest.raises(CheckpointError, match="refuses to load: it holds pickled Python objects") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value) and "argparse.Namespace" in str(exc.value)

    state = import_official(path)
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    from mae_lab.atomic import write_atomic

    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "page.md", "# hi\n")
        save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(1)})
    finally:
        os.umask(mask)
    assert (tmp_path / "page.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
