"""Shard patterns and reading samples: brace expansion, the sample reader, labels and image decoding.

Every error is a one-line DataError naming the shard and the sample key.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTS = ("jpg", "jpeg", "png")


class DataError(ValueError):
    """Bad data or a bad data argument; the message is one line naming the pattern/shard and sample key."""



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
    import braceexpand  # a webdataset dependency

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


# ---------------------------------------------------------------------------------------------------------- tar reading

_BLOCK = 512
_NAME_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split: key = path up to first dot


def _open_shard(shard: str) -> BinaryIO:
    """Open a local path, http(s) URL or (already allowed) pipe: command for streaming reads."""
    name = os.path.basename(shard)
    try:
        if _is_url(shard):
            import urllib.request

            return urllib.request.urlopen(shard, timeout=60)  # noqa: S310 - http(s) only, checked above
        if shard.startswith("pipe:"):
            import webdataset

            return webdataset.gopen(shard, "rb")
        return open(shard, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{name}: cannot open shard ({e})") from None


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Read n bytes unless the stream ends first."""
    buf = f.read(n)
    while len(buf) < n:
        more = f.read(n - len(buf))
        if not more:
            break
        buf += more
    return buf


def _skip(f: BinaryIO, n: int) -> bool:
    """Skip n bytes; False if the stream ended first (a seek past the end shows up at the next header read)."""
    if n > 1 << 16 and f.seekable():  # small skips: reading beats seeking a buffered file
        f.seek(n, os.SEEK_CUR)
        return True
    return len(_read_exact(f, n)) == n


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_members(f: BinaryIO, where: Callable[..., str], *, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """Yield (name, data) of each regular file in a tar stream; data None when read=False (skipped by seeking).

    Strict where tarfile is lenient: a stream that ends before the end-of-archive block is an error.
    `where(detail, member=None)` formats an error message naming the shard and the sample.
    """
    long_name, pax = None, {}
    while True:
        header = _read_exact(f, _BLOCK)
        if len(header) < _BLOCK:
            raise DataError(where("truncated tar (ends before the end-of-archive marker)"))
        if header.count(0) == _BLOCK:
            return
        stored = _tar_number(header[148:156])
        if stored != sum(header[:148]) + sum(header[156:]) + 8 * 32:
            raise DataError(where("corrupt tar header (bad checksum)"))
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        size, kind = _tar_number(header[124:136]), header[156:157]
        size = int(pax.get("size", size))
        name = long_name or pax.get("path", name)
        padded = -(-size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x", b"g"):  # GNU long name, pax header, pax global header
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise DataError(where("truncated tar (ends inside a header)"))
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax_records(data[:size])
            continue
        long_name, pax = None, {}
        if kind not in (b"0", b"\0", b"7") or not read:
            if not _skip(f, padded):
                raise DataError(where(f"truncated tar (ends inside {name!r})", name))
            if kind in (b"0", b"\0", b"7"):
                yield name, None
            continue
        data = _read_exact(f, padded)
        if len(data) < padded:
            raise DataError(where(f"truncated tar (ends inside {name!r})", name))
        yield name, data[:size]


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        pos += length
    return out


def _raw_samples(shard: str, *, read: bool = True) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Yield (key, {ext: bytes}) for each sample of a shard, grouping consecutive files that share a key."""
    name = os.path.basename(shard)
    key, files = None, {}

    def where(detail: str, member: str | None = None) -> str:
        m = _NAME_RE.match(member or "")
        k = m.group(1) if m else key
        return f"{name}: sample {k!r}: {detail}" if k is not None else f"{name}: {detail} at the start of the shard"

    with _open_shard(shard) as f:
        for path, data in _tar_members(f, where, read=read):
            m = _NAME_RE.match(path)
            if m is None:
                continue  # a directory-like or extension-less entry: not part of any sample
            k, ext = m.group(1), m.group(2).lower()
            if k != key:
                if key is not None:
                    yield key, files
                key, files = k, {}
            if ext in files:
                raise DataError(where(f"duplicate file {path!r}"))
            files[ext] = data
        if key is not None:
            yield key, files


def _label(shard: str, key: str, files: dict[str, bytes | None]) -> int:
    raw = files.get("cls")
    if raw is None:
        raise DataError(f"{os.path.basename(shard)}: sample {key!r}: missing label ('cls')")
    text = raw.decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{os.path.basename(shard)}: sample {key!r}: label {text[:40]!r} is not an integer") from None
    if label < 0:
        raise DataError(f"{os.path.basename(shard)}: sample {key!r}: label {label} is negative")
    return label


def _image_bytes(shard: str, key: str, files: dict[str, bytes | None]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in files:
            return files[ext]
    found = ", ".join(sorted(files)) or "nothing"
    raise DataError(f"{os.path.basename(shard)}: sample {key!r}: no image (expected jpg, jpeg or png; found {found})")


def _undecodable(shard: str, key: str, e: Exception) -> DataError:
    why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__
    return DataError(f"{os.path.basename(shard)}: sample {key!r}: image could not be decoded ({why})")


def _decode(shard: str, key: str, files: dict[str, bytes | None]) -> tuple[Tensor, int]:
    """Raw sample -> (uint8 image (3, H, W), label)."""
    from PIL import Image

    label, data = _label(shard, key, files), _image_bytes(shard, key, files)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))  # (H, W, 3)
    except Exception as e:  # PIL raises many types for bad data
        raise _undecodable(shard, key, e) from None
    return torch.from_numpy(arr).permute(2, 0, 1), label


def _image_size(shard: str, key: str, files: dict[str, bytes | None]) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(_image_bytes(shard, key, files))) as im:
            return im.height, im.width
    except DataError:
        raise
    except Exception as e:
        raise _undecodable(shard, key, e) from None


@functools.lru_cache(maxsize=4096)
def _count_local_shard(path: str, size: int, mtime_ns: int) -> int:
    """Samples in a local shard, from tar headers only (size/mtime make the cache key)."""
    return sum(1 for _ in _raw_samples(path, read=False))


def _shard_count(shard: str) -> int | None:
    """Samples in a shard if it is a local file (cheap header scan), else None."""
    if not _is_local(shard):
        return None
    st = os.stat(shard)
    return _count_local_shard(os.path.abspath(shard), st.st_size, st.st_mtime_ns)
