"""Writing datasets: shards (webdataset's ShardWriter) + dataset.json, atomically; image folders and CIFAR.

Shards are deterministic: members carry mtime 0, fixed owner and mode, and sample keys `{split}_{i:06d}` in a
seeded order, so the same source gives byte-identical shards. Image files are stored as they are (no re-encoding).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mae_lab.data.shards import DataError, _pil_exts
from mae_lab.data.verify import file_sha256
from mae_lab.rng_streams import plain_numpy_rng

DOWNLOADABLE = ("cifar10", "cifar100")
Progress = Callable[[int, int], None]  # (samples written, samples in all)


def _data_root(data_root) -> Path:
    return Path(data_root or os.environ.get("MAE_LAB_DATA") or "db/data").resolve()


@contextmanager
def _atomic_dir(out: Path):
    """Yield a temp folder beside `out`, renamed to `out` on success (atomic; fails if `out` is a non-empty folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_split(folder: Path, prefix: str, split: str, samples: list, shard_size: int,
                 read: Callable[[Any], tuple[str, bytes]], progress: Callable[[], None]) -> tuple[dict, dict]:
    """Write (source, label or None) samples as `prefix-split-NNNNNN.tar`; `read(source)` gives (ext, bytes)."""
    import webdataset as wds  # here, not at the top: webdataset imports torch, and resolving data (which reaches
    # this module for the digits' folder) must not; only writing shards needs it

    pattern = str(folder / f"{prefix}-{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, encoder=False, mtime=0,
                         user="", group="", mode=0o644) as sink:
        for i, (source, label) in enumerate(samples):
            ext, data = read(source)
            sample = {"__key__": f"{split}_{i:06d}", ext: data}
            if label is not None:
                sample["cls"] = str(label).encode()
            sink.write(sample)
            progress()
    names = sorted(p.name for p in folder.glob(f"{prefix}-{split}-*.tar"))
    shards = f"{prefix}-{split}-{{000000..{len(names) - 1:06d}}}.tar"
    return {"samples": len(samples), "shards": shards}, {n: file_sha256(folder / n) for n in names}


def _write_dataset(out: Path, *, name: str, classes: list[str], image_size: tuple[int, int], mean, std,
                   splits: dict[str, list], shard_size: int, read: Callable[[Any], tuple[str, bytes]],
                   sizes: Counter | None = None, progress: Progress | None = None) -> dict:
    """Pack splits into shards + dataset.json inside `out`, atomically; return the dataset.json dict."""
    meta: dict[str, Any] = {"name": name, "classes": list(classes), "image_size": list(image_size), "splits": {},
                            "sha256": {}, "mean": [round(float(m), 4) for m in mean],
                            "std": [round(float(s), 4) for s in std]}
    if sizes:
        meta["image_sizes"] = {"min": [min(h for h, _ in sizes), min(w for _, w in sizes)],
                               "max": [max(h for h, _ in sizes), max(w for _, w in sizes)], "distinct": len(sizes)}
    total, done = sum(len(s) for s in splits.values()), [0]

    def step() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    try:
        with _atomic_dir(out) as tmp:
            for split, samples in splits.items():
                meta["splits"][split], digests = _write_split(tmp, name, split, samples, shard_size, read, step)
                meta["sha256"].update(digests)
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        if (out / "dataset.json").is_file():
            raise FileExistsError(str(out)) from e  # someone else finished first (or it existed already)
        raise DataError(f"cannot write dataset to {out} ({e})") from None
    return meta


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _pixel_stats(images: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (in 0..1) over uint8 (..., 3) arrays, accumulated one array at a time."""
    total, squares, n = np.zeros(3), np.zeros(3), 0
    for image in images:
        x = image.reshape(-1, 3).astype(np.float64) / 255
        total, squares, n = total + x.sum(0), squares + (x * x).sum(0), n + len(x)
    mean = total / n
    return mean, np.sqrt(np.maximum(squares / n - mean * mean, 0))


def _folder_images(folder: Path) -> list[Path]:
    """Image files under `folder` (by extension: any PIL reads), sorted; hidden files skipped."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower().lstrip(".") in _pil_exts())


def _read_image_file(path: Path) -> tuple[str, bytes]:
    """The file's bytes as they are, under its own (lower-case) extension."""
    return path.suffix.lower().lstrip("."), path.read_bytes()


def _layout(src: Path, val_fraction: float, rng: np.random.Generator) -> tuple[list[str], dict[str, list]]:
    """(classes, {split: [(path, label or None)]}) of an ImageFolder tree (class folders, or train/ + val/|test/
    of class folders) or of a folder of images (images at its top, or no class folders: one unlabeled "train"
    split, subfolders included)."""
    roots = {"train": src / "train"}
    for val in ("val", "test"):
        if (src / val).is_dir():
            roots[val] = src / val
            break
    if not roots["train"].is_dir() or len(roots) == 1:
        roots = {"train": src}
    loose = any(p.is_file() and p.suffix.lower().lstrip(".") in _pil_exts() for p in src.iterdir())
    classes = sorted({d.name for root in roots.values() for d in root.iterdir() if d.is_dir() and _folder_images(d)})
    if loose or not classes:  # images at the top: a folder of images (any subfolders too), unlabeled
        items: list[tuple[Path, int | None]] = [(p, None) for p in _folder_images(src)]
        return [], {"train": [items[i] for i in rng.permutation(len(items))]}
    splits = {}
    for split, root in roots.items():
        items = [(p, classes.index(d.name)) for d in sorted(root.iterdir()) if d.is_dir() and d.name in classes
                 for p in _folder_images(d)]
        splits[split] = [items[i] for i in rng.permutation(len(items))]  # every shard mixes the classes
    if len(roots) == 1 and val_fraction > 0:
        n_val = int(round(len(splits["train"]) * val_fraction))
        if n_val:
            splits = {"train": splits["train"][n_val:], "val": splits["train"][:n_val]}
    return classes, splits


def pack_imagefolder(src: Path, out: Path, *, shard_size: int = 5000, name: str | None = None,
                     val_fraction: float = 0.0, seed: int = 0, progress: Progress | None = None) -> dict:
    """Pack an image folder into shards + dataset.json in `out`: class folders, or src/train + src/val|test of class
    folders (labeled), or a folder of images without class folders (an unlabeled "train" split for pretraining).

    Samples are shuffled once (seeded) so every shard mixes classes; with no val folder, `val_fraction` of a labeled
    tree becomes a "val" split. Image files are stored as they are; every one is opened once (its size goes into
    dataset.json's image_sizes) and mean/std are estimated from up to 2,000 train images. Written atomically:
    on any error there is no output folder.
    """
    from PIL import Image

    src, out = Path(src), Path(out)
    name = name or out.name
    if not src.is_dir():
        raise DataError(f"{src}: no such folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; remove it or pick another output folder")
    classes, splits = _layout(src, val_fraction, plain_numpy_rng(seed))
    if not splits["train"]:
        raise DataError(f"{src}: no images found (expected image files, class folders of them, or train/<class>/)")
    sizes: Counter[tuple[int, int]] = Counter()
    for split in splits.values():
        for path, _ in split:
            try:
                with Image.open(path) as im:
                    sizes[(im.height, im.width)] += 1
            except Exception as e:  # PIL raises many types for bad data
                raise DataError(f"{path}: not an image PIL can read ({type(e).__name__})") from None

    def rgb(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))
        except Exception as e:
            raise DataError(f"{path}: image could not be decoded ({type(e).__name__}: {e})") from None

    mean, std = _pixel_stats(rgb(path) for path, _ in splits["train"][:2000])  # train is shuffled: a random sample
    try:
        return _write_dataset(out, name=name, classes=classes, image_size=sizes.most_common(1)[0][0], mean=mean,
                              std=std, splits=splits, shard_size=shard_size, read=_read_image_file, sizes=sizes,
                              progress=progress)
    except FileExistsError:
        raise DataError(f"{out} was written by someone else meanwhile") from None


def get_dataset(name: str, data_root: str | Path | None = None) -> Path:
    """Download CIFAR-10/100 with torchvision and pack it as shards + dataset.json under <data_root>/<name>/."""
    if name not in DOWNLOADABLE:
        raise DataError(f"cannot fetch {name!r}: known datasets are {', '.join(DOWNLOADABLE)}; "
                        "pack your own image folder with 'mae-lab data pack'")
    out = _data_root(data_root) / name
    if (out / "dataset.json").is_file():
        return out
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    with tempfile.TemporaryDirectory(prefix=f"mae-lab-{name}-") as tmp:
        try:
            parts = {split: cls(root=tmp, train=split == "train", download=True) for split in ("train", "test")}
        except Exception as e:  # URLError, socket errors, checksum errors...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"could not download {name} ({msg}); check network access, or copy its shards and "
                            f"dataset.json into {out}") from None
        data = {split: ds.data for split, ds in parts.items()}  # uint8 (N, 32, 32, 3)
        mean, std = _pixel_stats(data["train"][i : i + 5000] for i in range(0, len(data["train"]), 5000))
        rng = plain_numpy_rng(0)  # shuffled once, so every shard mixes all classes
        splits = {split: [((split, int(i)), int(ds.targets[i])) for i in rng.permutation(len(ds.targets))]
                  for split, ds in parts.items()}
        try:
            _write_dataset(out, name=name, classes=list(parts["train"].classes), image_size=(32, 32), mean=mean,
                           std=std, splits=splits, shard_size=5000, read=lambda s: ("png", _png(data[s[0]][s[1]])))
        except FileExistsError:
            pass
    return out
