"""The embedded default dataset: scikit-learn's bundled 8x8 digits, packed into shards on first use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mae_lab.data.loading import _rng
from mae_lab.data.pack import _png, _pixel_stats, _write_dataset

DIGITS_NUM_VAL, DIGITS_SEED = 300, 0  # fixed split of sklearn's 1,797 digits: 1,497 train / 300 val


def _pack_digits(cache: Path) -> Path:
    """scikit-learn's bundled digits as shards under <cache>/digits (once; atomic, so racing processes are fine)."""
    out = cache / "digits"
    if (out / "dataset.json").is_file():
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    order = _rng(DIGITS_SEED).permutation(len(images))
    splits = {"train": order[DIGITS_NUM_VAL:], "val": order[:DIGITS_NUM_VAL]}
    mean, std = _pixel_stats([np.repeat(images[splits["train"]][..., None], 3, axis=-1)])
    try:
        _write_dataset(out, name="digits", classes=[str(c) for c in digits.target_names], image_size=(8, 8),
                       mean=mean, std=std, shard_size=5000, read=lambda i: ("png", _png(images[i])),
                       splits={k: [(int(i), int(digits.target[i])) for i in v] for k, v in splits.items()})
    except FileExistsError:
        pass
    return out
