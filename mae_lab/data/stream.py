"""Reading shards for training: webdataset's own pipeline (`url_opener`-style stream -> `tar_file_expander` ->
`group_by_keys`, which handles .tar, .tar.gz and .tgz) and torchvision's image decoder. Imported by `loading` only:
webdataset imports torch, and checking data before a run (`verify`, `catalog`) must not (`tar_index.iter_samples`).

What webdataset lacks, kept here and small: a `handler` that turns every failure into one DataError line naming
the shard and the sample key (webdataset's exceptions carry neither reliably).
"""

from __future__ import annotations

import os
import tarfile
import urllib.request
import warnings
from collections.abc import Iterator
from typing import BinaryIO

import torch
import webdataset as wds
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from webdataset.tariterators import group_by_keys, tar_file_expander

from mae_lab.data.shards import DataError, _image_bytes, _is_url, _label, _why, base_plus_ext, decode_pil


def _open_shard(shard: str) -> BinaryIO:
    """Open a local path, http(s) URL or (already allowed) pipe: command for streaming reads."""
    try:
        if _is_url(shard):
            return urllib.request.urlopen(shard, timeout=60)  # noqa: S310 - http(s) only, checked above
        if shard.startswith("pipe:"):
            return wds.gopen(shard, "rb")
        return open(shard, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{os.path.basename(shard)}: cannot open shard ({e})") from None


def read_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a shard, read by webdataset; any failure is one DataError."""
    name = os.path.basename(shard)
    member: list[str | None] = [None]  # the member being read: select_files notes it before reading its data

    def note(fname: str) -> bool:
        member[0] = fname
        return True

    def handler(exn: BaseException) -> bool:
        if isinstance(exn, DataError):  # already ours (tar_file_expander hands on what an inner handler raised)
            raise exn
        where = f"{name}: sample {base_plus_ext(member[0])[0]!r}" if member[0] else name
        why = _why(exn)
        if member[0] is None and isinstance(exn, tarfile.ReadError):
            raise DataError(f"{name}: not a tar archive ({why})")
        if isinstance(exn, (EOFError, tarfile.ReadError)) and ("end" in why or isinstance(exn, EOFError)):
            raise DataError(f"{where}: truncated tar (ends inside {member[0]!r})")
        if "duplicate file name" in why:
            raise DataError(f"{where}: duplicate file {why.split(':')[0]!r}")
        raise DataError(f"{where}: unreadable shard ({type(exn).__name__}: {why})")

    stream = _open_shard(shard)
    try:
        files = tar_file_expander([{"url": shard, "stream": stream}], handler=handler, select_files=note)
        for sample in group_by_keys(files, handler=handler):
            key = sample.pop("__key__")
            yield key, {k: v for k, v in sample.items() if not k.startswith("__")}
    finally:
        stream.close()


def _decode(shard: str, key: str, files: dict[str, bytes], *, label_key: str = "label",
            need_label: bool = True) -> tuple[Tensor, int]:
    """Raw sample -> (uint8 image (3, H, W) in RGB, label; -1 when missing and not needed)."""
    label, data = _label(shard, key, files, label_key=label_key, required=need_label), _image_bytes(shard, key, files)
    try:  # torchvision's decoder first (3-4x faster than PIL on small JPEGs; the same pixels), else PIL
        with warnings.catch_warnings():  # it warns on every call that torchcodec will replace it; not a dependency
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return image, label
    except Exception:  # a format or mode it does not take (16-bit PNG, BMP, ...), or bad data: PIL decides
        pass
    arr, _ = decode_pil(shard, key, files, label_key=label_key, need_label=need_label)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1), label


