"""Shard patterns and what can be known of shards without torch: brace expansion, tar header scans, labels and
image headers, for checking data before a run and for the loader alike.

Samples are read by the one tar reader (`stream.read_samples`, tarfile) or at the places `tar_index` found; here:
a header-only scan of local shards (`shard_keys`, tarfile's headers) that catches a shard cut at a member boundary,
which a streaming tar reader takes for a normal end; and `decode_pil`, PIL's decoding, which the loader falls back
to where torchvision's decoder refuses an image (so an image PIL decodes is one the loader decodes).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import braceexpand
import numpy as np

from mae_lab.errors import BadInput

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # tried first, in this order; then any other extension PIL decodes
COMPRESSED = (".tar.gz", ".tgz")


class DataError(BadInput, ValueError):
    """Bad data or a bad data argument; the message is one line naming the pattern/shard and sample key.
    `key` is the study key to blame (a setting such as "data.val_holdout"; "data" for the data itself)."""

    def __init__(self, message: str, key: str = "data"):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Subset:
    """Some samples of a shard pattern, named by (shard file name, sample key): `keys` are the only ones read
    (keep=True) or the ones skipped (keep=False). A held-out validation split is one such pair."""

    keys: frozenset[tuple[str, str]]
    keep: bool

    def admits(self, shard: str, key: str) -> bool:
        return ((os.path.basename(shard), key) in self.keys) == self.keep


def base_plus_ext(path: str) -> tuple[str, str] | tuple[None, None]:
    """(key, extensions) of a member name, as webdataset's `tariterators.base_plus_ext` splits it (copied: importing
    any part of webdataset imports torch)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", path)
    return (match.group(1), match.group(2)) if match else (None, None)


def _is_meta(name: str) -> bool:
    """Member names webdataset's reader skips (`__key__`-style metadata)."""
    meta = "/" not in name and name.startswith("__") and name.endswith("__")
    return meta or bool(re.match(r"__[^/]*__($|/)", name))


# ----------------------------------------------------------------------------------------------------------- patterns


def _is_url(pattern: str) -> bool:
    return pattern.startswith(("http://", "https://"))


def _is_local(pattern: str) -> bool:
    return not (_is_url(pattern) or pattern.startswith("pipe:"))


def _check_pipe(pattern: str, allow_pipe: bool) -> None:
    if pattern.startswith("pipe:") and not allow_pipe:
        raise DataError(f"refusing shard pattern {pattern!r}: 'pipe:' runs a shell command; "
                        "pass --allow-pipe to allow it (allow_pipe=True from Python)")


def expand_shards(pattern: str, *, allow_pipe: bool = False) -> list[str]:
    """Brace-expand `pattern` into shard paths/URLs; local shards must all exist."""
    _check_pipe(pattern, allow_pipe)
    if "://" in pattern.split(" ")[0] and not _is_url(pattern):
        raise DataError(f"unsupported shard URL {pattern!r}: use a local path, http(s):// or pipe:")
    shards = list(braceexpand.braceexpand(pattern))
    if not _is_local(pattern):
        return shards
    missing = [s for s in shards if not os.path.isfile(s)]
    if len(missing) == len(shards):
        raise DataError(f"no shards match {pattern!r}")
    if missing:
        found = len(shards) - len(missing)
        raise DataError(f"{pattern!r}: shard {missing[0]!r} is missing ({found} of {len(shards)} found)")
    return shards


# ------------------------------------------------------------------------------------------------------ reading shards


def _why(exn: BaseException) -> str:
    text = str(exn.args[0]) if exn.args else type(exn).__name__
    return re.sub(r"\s*@ <.*$|\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", text.splitlines()[0] if text else "")


def regular_members(path: str, mode: Literal["r:*", "r:"] = "r:*") -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member, read by tarfile opened with ``mode``, member by member (so
    an error comes after the members before it). ``mode`` "r:" refuses a compressed stream, whose offsets are not the
    file's."""
    with tarfile.open(path, mode) as tar:
        for m in tar:
            if m.isreg():
                yield m.name, m.offset_data, m.size


@functools.lru_cache(maxsize=4096)
def _keys_of_local_shard(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    name, last, end = os.path.basename(path), None, 0
    keys: list[str] = []
    try:
        for member, offset, member_size in regular_members(path):
            if (key := base_plus_ext(member)[0]) is not None:
                if key != (keys[-1] if keys else None):
                    keys.append(key)
                last, end = member, offset + -(-member_size // 512) * 512
    except tarfile.ReadError as e:
        if last is None:
            raise DataError(f"{name}: not a tar archive ({_why(e)})") from None
        if "end of data" in _why(e):
            raise DataError(f"{name}: sample {keys[-1]!r}: truncated tar (ends inside {last!r})") from None
        if _why(e) in ("empty header", "truncated header"):  # cut between (pax) headers, or inside one
            raise DataError(f"{name}: sample {keys[-1]!r}: truncated tar (ends in the headers after {last!r})") \
                from None
        raise DataError(f"{name}: sample {keys[-1]!r}: unreadable tar ({_why(e)})") from None
    except (EOFError, OSError) as e:  # a cut .tar.gz
        where = f"{name}: sample {keys[-1]!r}" if keys else name
        raise DataError(f"{where}: truncated ({_why(e)})") from None
    if not path.endswith(COMPRESSED):  # tarfile ends quietly where a cut or corrupt header is: check the marker
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(1024)
        if end > size:
            raise DataError(f"{name}: sample {keys[-1]!r}: truncated tar (ends inside {last!r})")
        if len(marker) < 1024 or marker.count(0) != 1024:
            where = f"{name}: sample {keys[-1]!r}" if keys else name
            detail = "ends before the end-of-archive marker" if len(marker) < 1024 else "corrupt header follows"
            raise DataError(f"{where}: truncated tar ({detail})")
    return tuple(keys)


def shard_keys(shard: str) -> tuple[str, ...] | None:
    """Sample keys of a local shard in order, from tar headers only (cached by path, size, mtime); None if remote.
    A cut or corrupt shard raises DataError naming it and the last good key."""
    if not _is_local(shard):
        return None
    st = os.stat(shard)
    return _keys_of_local_shard(os.path.abspath(shard), st.st_size, st.st_mtime_ns)


def check_end(shard: str) -> None:
    """Cheap check before streaming a local .tar: a tar ends with two zero blocks, so a shard cut at a member boundary
    (which a streaming reader takes for a normal end) shows in its last 1024 bytes; then `shard_keys` names it."""
    if not _is_local(shard) or shard.endswith(COMPRESSED):
        return
    with open(shard, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
        tail = f.read(1024)
    if len(tail) < 1024 or tail.count(0) != 1024:
        shard_keys(shard)  # raises DataError naming the shard and the last good key


# ---------------------------------------------------------------------------------------------- labels and decoding


def _label(shard: str, key: str, files: dict[str, bytes], *, label_key: str = "label", required: bool = True) -> int:
    """The label from `{key}.cls`, else field `label_key` of `{key}.json`; -1 where missing and not required."""
    where = f"{os.path.basename(shard)}: sample {key!r}"
    if "cls" in files:
        value = files["cls"].decode("utf-8", "replace").strip()
    elif "json" in files:
        try:
            value = json.loads(files["json"]).get(label_key)
        except (ValueError, AttributeError):
            raise DataError(f"{where}: {key}.json is not a JSON object") from None
    else:
        value = None
    if value is None:
        if required:
            raise DataError(f"{where}: missing label ('cls' or field {label_key!r} of 'json')")
        return -1
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        label = int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {str(value)[:40]!r} is not an integer") from None
    if label < 0:
        raise DataError(f"{where}: label {label} is negative")
    return label


@functools.lru_cache(maxsize=1)
def _pil_exts() -> frozenset[str]:
    from PIL import Image

    return frozenset(e.lstrip(".").lower() for e in Image.registered_extensions())


def _image_bytes(shard: str, key: str, files: dict[str, bytes]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in files:
            return files[ext]
    for ext in sorted(files):
        if ext in _pil_exts():
            return files[ext]
    found = ", ".join(sorted(files)) or "nothing"
    raise DataError(f"{os.path.basename(shard)}: sample {key!r}: no image (expected jpg, jpeg, png, webp or "
                    f"another format PIL reads; found {found})")


def _undecodable(shard: str, key: str, e: Exception) -> DataError:
    why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__
    return DataError(f"{os.path.basename(shard)}: sample {key!r}: image could not be decoded ({why})")


def decode_pil(shard: str, key: str, files: dict[str, bytes], *, label_key: str = "label",
               need_label: bool = True) -> tuple[np.ndarray, int]:
    """Raw sample -> (uint8 image (H, W, 3) in RGB, label; -1 when missing and not needed), decoded by PIL."""
    from PIL import Image

    label, data = _label(shard, key, files, label_key=label_key, required=need_label), _image_bytes(shard, key, files)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im if im.mode == "RGB" else im.convert("RGB")), label  # gray, RGBA, palette -> RGB
    except Exception as e:  # PIL raises many types for bad data
        raise _undecodable(shard, key, e) from None


def _image_size(shard: str, key: str, files: dict[str, bytes]) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(_image_bytes(shard, key, files))) as im:
            return im.height, im.width
    except DataError:
        raise
    except Exception as e:
        raise _undecodable(shard, key, e) from None
