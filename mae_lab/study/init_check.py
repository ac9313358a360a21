"""Torch-free checks of a trial's init reference, probed blocks and fine-tune size, run when a study is expanded.

``pretrain.init`` names a weights file or a done trial's (whole) hash. A file's sha256 goes into
``pretrain.init_sha256`` here, so the trial's identity covers the bytes it starts from (a changed file makes a new
trial). A trial hash is itself the identity of what made its weights; when the study runs, ``init_weights.check_inits``
finds that trial's checkpoint in the database, and loading checks the checkpoint's recorded sha256.
"""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from mae_lab.study.spec import TrialSpec

TRIAL_REF = re.compile(r"^[0-9a-f]{16}$")  # a whole trial hash: it names what made the weights


class FieldError(ValueError):
    """A field that cannot be used: ``key`` is the dotted key, ``reason`` one line."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}")


def is_trial_ref(init: str) -> bool:
    """True when ``init`` is not a file but looks like a trial hash (16 lowercase hex digits)."""
    return not Path(init).exists() and bool(TRIAL_REF.match(init))


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the cache: a rewrite is re-hashed
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, cached per (path, size, mtime) so a study of many trials hashes a big file once."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def with_init_sha(spec: TrialSpec) -> TrialSpec:
    """``spec`` with ``pretrain.init_sha256`` set from the init file (unchanged for no init or a trial hash).

    Raises FieldError when the file is missing (and the name is no trial hash) or differs from a pinned sha256."""
    init = spec.pretrain.init
    if init is None:
        if spec.pretrain.init_sha256 is not None:
            raise FieldError("pretrain.init_sha256", "is set without pretrain.init")
        return spec
    if is_trial_ref(init):
        return spec
    path = Path(init)
    if not path.is_file():
        raise FieldError("pretrain.init", f"{init}: no such file (and not a trial hash)")
    sha = file_sha256(path)
    if spec.pretrain.init_sha256 not in (None, sha):
        raise FieldError("pretrain.init_sha256", f"{init} has sha256 {sha}, not the pinned "
                         f"{spec.pretrain.init_sha256}")
    return spec.model_copy(update={"pretrain": spec.pretrain.model_copy(update={"init_sha256": sha})})


def check_sizes_and_blocks(spec: TrialSpec) -> None:
    """Probed blocks within 1..depth, no duplicates; a fine-tune size divisible by the patch size (FieldError)."""
    depth = spec.model.depth
    blocks = spec.eval.linear.blocks
    bad = next((b for b in blocks if not 1 <= b <= depth), None)
    if bad is not None:
        raise FieldError("eval.linear.blocks", f"block {bad} is out of range: the encoder has blocks 1..{depth}")
    if len(set(blocks)) != len(blocks):
        raise FieldError("eval.linear.blocks", f"duplicate block in {blocks}")
    size = spec.eval.finetune.img_size
    if size is not None and size % spec.model.patch_size:
        raise FieldError("eval.finetune.img_size", f"{size} is not divisible by the patch size "
                         f"{spec.model.patch_size}")


def resolve_fields(spec: TrialSpec) -> TrialSpec:
    """Both checks above on a resolved spec; returns it with the init file's sha256 filled in."""
    check_sizes_and_blocks(spec)
    return with_init_sha(spec)


def at_finetune_size(spec: TrialSpec) -> TrialSpec:
    """``spec`` with model.img_size = eval.finetune.img_size (so the loaders make fine-tuning-size images)."""
    size = spec.eval.finetune.img_size
    if size is None or size == spec.model.img_size:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"img_size": size})})
