"""Writing datasets: shards + dataset.json, atomically; ImageFolder packing and CIFAR download."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mae_lab.data.loading import _rng
from mae_lab.data.shards import IMAGE_EXTS, DataError

DOWNLOADABLE = ("cifar10", "cifar100")


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


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same samples give byte-identical shards
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_split(folder: Path, prefix: str, split: str, samples: list, shard_size: int,
                 read: Callable[[object], tuple[str, bytes]]) -> tuple[dict, dict[str, str]]:
    """Write (source, label) samples as `prefix-split-NNNNNN.tar` shards; `read(source)` gives (ext, bytes)."""
    num_shards = max(1, -(-len(samples) // shard_size))
    digests = {}
    for s in range(num_shards):
        path = folder / f"{prefix}-{split}-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(len(samples), (s + 1) * shard_size)):
                source, label = samples[i]
                ext, data = read(source)
                _tar_add(tar, f"{split}_{i:06d}.{ext}", data)
                _tar_add(tar, f"{split}_{i:06d}.cls", str(label).encode())
        digests[path.name] = _sha256(path)
    shards = f"{prefix}-{split}-{{000000..{num_shards - 1:06d}}}.tar"
    return {"samples": len(samples), "shards": shards}, digests


def _write_dataset(out: Path, *, name: str, classes: list[str], image_size: tuple[int, int], mean, std,
                   splits: dict[str, list], shard_size: int, read: Callable[[object], tuple[str, bytes]]) -> dict:
    """Pack splits into shards + dataset.json inside `out`, atomically; return the dataset.json dict."""
    meta = {"name": name, "classes": list(classes), "image_size": list(image_size), "splits": {}, "sha256": {},
            "mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std]}
    try:
        with _atomic_dir(out) as tmp:
            for split, samples in splits.items():
                meta["splits"][split], digests = _write_split(tmp, name, split, samples, shard_size, read)
                meta["sha256"].update(digests)
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        if (out / "dataset.json").is_file():
            raise FileExistsError(str(out)) from e  # someone else finished first (or it existed already)
        raise DataError(f"cannot write dataset to {out} ({e})") from None
    return meta


def _png(array: np.ndarray) -> bytes:
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
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_image_file(path: Path) -> tuple[str, bytes]:
    """jpg/jpeg/png bytes as they are; other formats PIL reads become RGB PNG."""
    from PIL import Image

    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return ext, path.read_bytes()
    with Image.open(path) as im:
        return "png", _png(np.array(im.convert("RGB")))


def pack_imagefolder(src: Path, out: Path, *, shard_size: int = 5000, name: str | None = None,
                     val_fraction: float = 0.0, seed: int = 0) -> dict:
    """Pack an ImageFolder tree (class folders, or src/train + src/val|test) into shards + dataset.json in `out`.

    Samples are shuffled once (seeded) so every shard mixes classes; with no val folder, `val_fraction` of them
    becomes a "val" split. mean/std are estimated from up to 2,000 train images. Written atomically.
    """
    from PIL import Image

    src, out = Path(src), Path(out)
    name = name or out.name
    roots = {"train": src / "train"}
    for val in ("val", "test"):
        if (src / val).is_dir():
            roots[val] = src / val
            break
    if not roots["train"].is_dir() or len(roots) == 1:
        roots = {"train": src}
    classes = sorted({d.name for root in roots.values() for d in root.iterdir() if d.is_dir()})
    if not classes:
        raise DataError(f"{src}: no class folders (expected <class>/<image> or train/<class>/<image>)")
    rng = _rng(seed)
    splits = {}
    for split, root in roots.items():
        items = [(p, classes.index(d.name)) for d in sorted(root.iterdir()) if d.is_dir() for p in _folder_images(d)]
        splits[split] = [items[i] for i in rng.permutation(len(items))]
    if len(roots) == 1 and val_fraction > 0:
        n_val = int(round(len(splits["train"]) * val_fraction))
        splits = {"train": splits["train"][n_val:], "val": splits["train"][:n_val]}
    if not splits["train"]:
        raise DataError(f"{src}: no images found")
    sizes = Counter()
    for split in splits.values():
        for path, _ in split:
            try:
                with Image.open(path) as im:
                    sizes[(im.height, im.width)] += 1
            except Exception as e:
                raise DataError(f"{path}: not an image PIL can read ({e})") from None
    def rgb(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))

    mean, std = _pixel_stats(rgb(path) for path, _ in splits["train"][:2000])  # train is shuffled: a random sample
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; remove it or pick another output folder")
    try:
        return _write_dataset(out, name=name, classes=classes, image_size=sizes.most_common(1)[0][0], mean=mean,
                              std=std, splits=splits, shard_size=shard_size, read=_read_image_file)
    except FileExistsError:
        raise DataError(f"{out} was written by someone else meanwhile") from None


def get_dataset(name: str, data_root: str | Path | None = None) -> Path:
    """Download CIFAR-10/100 with torchvision and pack it as shards + dataset.json under <data_root>/<name>/."""
    if name not in DOWNLOADABLE:
        raise DataError(f"cannot fetch {name!r}: known datasets are {', '.join(DOWNLOADABLE)}; "
                        "pack your own ImageFolder with pack_imagefolder ('mae-lab data pack')")
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
        rng = _rng(0)  # shuffled once, so every shard mixes all classes
        splits = {split: [((split, int(i)), int(ds.targets[i])) for i in rng.permutation(len(ds.targets))]
                  for split, ds in parts.items()}
        try:
            _write_dataset(out, name=name, classes=list(parts["train"].classes), image_size=(32, 32), mean=mean,
                           std=std, splits=splits, shard_size=5000, read=lambda s: ("png", _png(data[s[0]][s[1]])))
        except FileExistsError:
            pass
    return out
