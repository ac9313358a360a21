"""The one tar reader: every shard is read through the standard library's `tarfile`, for training and for the
checks alike, so a shard the checks pass is a shard the loader reads the same way.

`open_shard` opens a local path, an http(s) URL or an (allowed) `pipe:` command; `read_samples` streams any of them
(.tar, .tar.gz, .tgz) and groups members by key as webdataset's reader does (meta names skipped, extensions
lower-cased); `tar_index` reads local uncompressed .tar shards out of order at the places tarfile's headers give.
webdataset's own reader would serve training, but importing it imports torch, and checking data before a run
(`mae-lab validate`, `run --dry-run`) must not; one reader for both is tarfile. Any failure is one DataError line
naming the shard (and the sample).
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from mae_lab.data.shards import DataError, _is_meta, _is_url, _why, base_plus_ext


@contextmanager
def open_shard(shard: str) -> Iterator[IO[bytes]]:
    """A local path, http(s) URL or (already allowed) `pipe:` command, open for one streaming read; closed (and a
    pipe's command ended and reaped) on exit."""
    proc = None
    try:
        if _is_url(shard):
            stream = urllib.request.urlopen(shard, timeout=60)  # noqa: S310 - http(s) only, checked by expand_shards
        elif shard.startswith("pipe:"):
            proc = subprocess.Popen(shard[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - allow_pipe asked
            assert proc.stdout is not None
            stream = proc.stdout
        else:
            stream = open(shard, "rb", buffering=1 << 20)
    except OSError as e:
        raise DataError(f"{os.path.basename(shard)}: cannot open shard ({e})") from None
    try:
        yield stream
    finally:
        stream.close()
        if proc is not None:  # a reader that stopped early: the command need not finish writing
            if proc.poll() is None:
                proc.terminate()
            proc.wait()


def read_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for each sample of a shard, in shard order; any failure is one DataError naming
    the shard (and the sample)."""
    name, member = os.path.basename(shard), None
    key: str | None = None
    files: dict[str, bytes] = {}
    with open_shard(shard) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except (tarfile.ReadError, EOFError, OSError) as e:
            raise DataError(f"{name}: not a tar archive ({_why(e)})") from None
        try:
            for m in tar:
                member = m.name
                if not m.isreg() or _is_meta(m.name):
                    continue
                k, ext = base_plus_ext(m.name)
                if k is None or ext is None:
                    continue
                data = tar.extractfile(m).read()  # type: ignore[union-attr]  # a regular member has a file
                tar.members = []  # type: ignore[attr-defined]  # a stream keeps no index (as webdataset does)
                if k != key:
                    if key is not None:
                        yield key, files
                    key, files = k, {}
                if ext.lower() in files:
                    raise DataError(f"{name}: sample {key!r}: duplicate file {m.name!r}")
                files[ext.lower()] = data
        except (tarfile.ReadError, EOFError, OSError) as e:
            if member is None:
                raise DataError(f"{name}: not a tar archive ({_why(e)})") from None
            at = f"{name}: sample {base_plus_ext(member)[0]!r}"
            if isinstance(e, EOFError) or "end" in _why(e):
                raise DataError(f"{at}: truncated tar (ends inside {member!r})") from None
            raise DataError(f"{at}: unreadable shard ({type(e).__name__}: {_why(e)})") from None
        if key is not None:
            yield key, files
