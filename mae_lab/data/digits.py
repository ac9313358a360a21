"""The embedded default dataset: scikit-learn's bundled 8x8 digits, packed into shards on first use."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from mae_lab.data.pack import _pixel_stats, _png, _write_dataset, pack_imagefolder
from mae_lab.data.shards import DataError, expand_shards
from mae_lab.data.stream import read_samples
from mae_lab.rng_streams import plain_numpy_rng

DIGITS_NUM_VAL, DIGITS_SEED = 300, 0  # fixed split of sklearn's 1,797 digits: 1,497 train / 300 val
# The cache folder: "-v2" since the shards are written by webdataset's TarWriter (another member order than the
# first packing), so a cache of the old packing is never reused and every machine fingerprints the same bytes.
DIGITS_FOLDER = "digits-v2"
UNLABELED_FOLDER = "digits-unlabeled-v1"


def _pack_digits(cache: Path) -> Path:
    """scikit-learn's bundled digits as shards under <cache>/digits-v2 (once; atomic: racing processes are fine)."""
    out = cache / DIGITS_FOLDER
    if (out / "dataset.json").is_file():
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    order = plain_numpy_rng(DIGITS_SEED).permutation(len(images))
    splits = {"train": order[DIGITS_NUM_VAL:], "val": order[:DIGITS_NUM_VAL]}
    mean, std = _pixel_stats([np.repeat(images[splits["train"]][..., None], 3, axis=-1)])
    try:
        _write_dataset(out, name="digits", classes=[str(c) for c in digits.target_names], image_size=(8, 8),
                       mean=mean, std=std, shard_size=5000, read=lambda i: ("png", _png(images[i])),
                       splits={k: [(int(i), int(digits.target[i])) for i in v] for k, v in splits.items()})
    except FileExistsError:
        pass
    return out


def export_images(folder: str | Path, *, cache: str | Path | None = None) -> int:
    """Write the digits' training images (not the val split) as PNG files into `folder`, no labels: an unlabeled
    image folder for `mae-lab data pack` (studies/pretrain_unlabeled.toml). Returns how many were written."""
    src = _pack_digits(Path(cache or os.environ.get("MAE_LAB_CACHE") or "db/cache").resolve())
    pattern = src / json.loads((src / "dataset.json").read_text())["splits"]["train"]["shards"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for shard in expand_shards(str(pattern)):
        for key, files in read_samples(shard):
            (folder / f"{key}.png").write_bytes(files["png"])
            n += 1
    return n


def _pack_digits_unlabeled(cache: Path) -> Path:
    """"digits-unlabeled": the digits' training images as an unlabeled dataset (no .cls, no val images), made by
    `pack_imagefolder` from a folder of their PNG files, as `mae-lab data pack` would; once, under <cache>."""
    out = cache / UNLABELED_FOLDER
    if (out / "dataset.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".digits-images-", dir=out.parent) as tmp:
        export_images(tmp, cache=cache)
        try:
            pack_imagefolder(Path(tmp), out, name="digits-unlabeled", shard_size=5000)
        except DataError:
            if not (out / "dataset.json").is_file():  # not a racing process that finished first
                raise
    return out
