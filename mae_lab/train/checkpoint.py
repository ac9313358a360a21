"""The only code that knows the checkpoint format.

A pretraining checkpoint is one ``torch.save`` of a dict that ``torch.load(weights_only=True)`` can read back:

    model         state_dict of the MaskedAutoencoder (encoder + decoder)
    optimizer     state_dict of the AdamW optimizer
    epoch         int, epochs completed
    step          int, optimizer steps completed
    rng           {"torch": ByteTensor (CPU generator state), "cuda": ByteTensor | None (the training GPU's state;
                  a list, one per visible GPU, in older files; absent or None: written off CUDA)}
    config        dict, the MAEConfig's fields
    spec          dict, the TrialSpec as JSON-able data (``spec.model_dump(mode="json")``)
    identity      dict, the pretraining identity it was written for (``identity.pretrain_identity``; a resume must
                  match it key for key); absent in checkpoints written before it existed
    loss_history  list[float], mean pretraining loss of each completed epoch

Files are written atomically (temp file in the same folder, fsync, ``os.replace``, fsync of the folder) and identified
by their sha256, which the caller stores and passes back to ``load_checkpoint`` to detect a changed or truncated file.

A checkpoint that the database records goes through three steps, so that a process stopped at any instant (signals,
however many, or SIGKILL) leaves a record that names bytes on disk: ``stage_checkpoint`` writes ``NAME.next``, the
caller records its sha256, then ``commit_checkpoint`` renames it over ``NAME``. The file at ``NAME`` is never newer
than the record; a stop between the record and the rename leaves ``NAME.next`` holding the recorded bytes, which
``settle_checkpoint`` (before a resume) renames into place, and a stop before the record leaves a ``NAME.next`` that
it deletes (the record and ``NAME`` still agree, one epoch earlier).
Loading never unpickles Python objects; reading an official MAE training checkpoint (which pickles an argparse
Namespace) goes through ``import_official``, which says in its name and docstring that it trusts the file.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from mae_lab.atomic import atomic_file, fsync_dir
from mae_lab.errors import BadInput

FORMAT_KEYS = ("model", "optimizer", "epoch", "step", "rng", "config", "spec", "identity", "loss_history")


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint cannot be used: wrong sha256, unreadable, or it holds pickled Python objects."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> str:
    """Atomically write ``obj`` to ``path``; return the file's sha256.

    The bytes go to a temp file in the same folder, which is flushed and fsynced, then renamed over ``path`` with
    ``os.replace`` and the folder fsynced: a reader sees the old file or the new one, never half of one.
    """
    with atomic_file(path) as (f, tmp):
        torch.save(obj, f)
        f.flush()
        digest = sha256_file(tmp)  # hash of the bytes on disk, before they become visible under `path`
    return digest


def staged_path(path: str | Path) -> Path:
    """Where ``stage_checkpoint`` writes the next checkpoint of ``path`` before it is recorded."""
    path = Path(path)
    return path.with_name(path.name + ".next")


def stage_checkpoint(path: str | Path, obj: dict[str, Any]) -> str:
    """Write ``obj`` as the next checkpoint of ``path`` (``staged_path``), atomically; return its sha256. ``path``
    itself is unchanged until ``commit_checkpoint``, which the caller runs once the sha256 is recorded."""
    return save_checkpoint(staged_path(path), obj)


def commit_checkpoint(path: str | Path) -> None:
    """Rename the staged checkpoint over ``path`` (one ``os.replace``; the folder fsynced); nothing if none."""
    path = Path(path)
    try:
        staged_path(path).replace(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def settle_checkpoint(path: str | Path, recorded_sha256: str | None) -> None:
    """Before a resume: finish a commit that a stop cut short (the staged file holds the recorded sha256: it
    becomes ``path``), or delete a staged file that was never recorded."""
    staged = staged_path(path)
    if not staged.exists():
        return
    if recorded_sha256 is not None and sha256_file(staged) == recorded_sha256:
        commit_checkpoint(path)
    else:
        staged.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, *, sha256: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; check its sha256 first when one is given.

    Raises CheckpointError naming the file when the hash differs, the file is not a complete checkpoint, or it holds
    pickled Python objects (an official MAE training checkpoint: use ``import_official`` if you trust it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(f"{path}: sha256 mismatch: expected {sha256}, got {actual} "
                                  "(the file was changed or only partly written)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"found {found.group(1)}" if found else "weights_only=True load failed"
        raise CheckpointError(
            f"{path}: refuses to load: it holds pickled Python objects, not only tensors ({what}); "
            "if it is an official MAE checkpoint you trust, read its weights with import_official()"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None


def import_official(path: str | Path) -> dict[str, torch.Tensor]:
    """TRUSTS THE FILE: read an official MAE checkpoint with ``weights_only=False`` and return its model tensors.

    Official training checkpoints pickle an argparse Namespace next to the weights, so they cannot be read with
    ``weights_only=True``; unpickling runs arbitrary code from the file. Call this only on files from a source you
    trust (e.g. the released ``mae_pretrain_vit_*.pth``). Returns ``{name: tensor}`` from ``ckpt["model"]``.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the caller, see docstring
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'model' state_dict in this file")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
