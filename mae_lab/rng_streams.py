"""The names of a trial's random streams and their seeds, with no torch: what data resolution (the held-out
validation split) and the embedded digits' fixed split draw from. `rng.py` builds torch generators on the same
seeds and re-exports these names."""
from __future__ import annotations

import hashlib
import json

import numpy as np

# The streams of a trial and what each one draws (a name not listed here is refused, so a typo cannot silently
# open a fresh stream).
STREAMS = {
    "init": "initial weights, one stream per parameter name",
    "data_order": "the order of the training samples in an epoch",
    "augment": "augmentation of one epoch's samples",
    "mask": "the pretraining masks of an epoch",
    "probe": "the linear probe's head init and batch order",
    "knn": "the k-NN probe's subset",
    "finetune": "fine-tuning: head init, augmentation, mixup and drop path of an epoch",
    "holdout": "which training samples form the held-out validation split",
    "recon": "the masks of the reconstruction figure",
}


def stream_seed(seed: int, name: str, *keys: int | str) -> int:
    """The 63-bit seed of stream ``name`` at ``keys`` for the trial seed ``seed``: a hash, never a sum."""
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r} (known: {', '.join(STREAMS)})")
    text = json.dumps([int(seed), name, *keys], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def numpy_rng(seed: int, name: str, *keys: int | str) -> np.random.Generator:
    """A fresh numpy Generator on the stream."""
    return np.random.default_rng(stream_seed(seed, name, *keys))


def plain_numpy_rng(*seeds: int) -> np.random.Generator:
    """numpy Generator on plain integer seeds (the embedded digits' fixed split uses it; it must not change)."""
    return np.random.default_rng([int(s) for s in seeds])
