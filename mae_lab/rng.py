"""Named random streams: every random draw of a trial comes from a stream named for what it draws.

A stream is ``(seed, name, *keys)``, e.g. ``("data_order", epoch)``, ``("augment", epoch, sample)``,
``("mask", epoch)``, ``("init", "blocks.0.attn.qkv.weight")``. Its 63-bit seed is a hash of the name and keys, so
streams never collide the way bare integer ids did (``(seed, epoch, 2)`` meant augmentation in one module and a
rank's mask stream in another), and no stream depends on how the work runs (loader workers, device, compile,
process count). Two arms of a study with the same seed draw the same numbers from a stream of the same name and
keys: that is what makes their comparison one of common random numbers (paired).

Torch draws on a CPU ``torch.Generator`` wherever the call takes one; code that only reads the global RNGs
(torchvision transforms, timm's mixup and drop path) runs inside ``global_stream``, which swaps the stream's state
in and the caller's back out.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

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


def generator(seed: int, name: str, *keys: int | str) -> torch.Generator:
    """A fresh CPU torch.Generator on the stream."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *keys))


def numpy_rng(seed: int, name: str, *keys: int | str) -> np.random.Generator:
    """A fresh numpy Generator on the stream."""
    return np.random.default_rng(stream_seed(seed, name, *keys))


def seed_globals(seed: int, name: str, *keys: int | str) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` from the stream: for code that reads the global
    RNGs and runs for a whole stage (fine-tuning's augmentation, mixup and drop path)."""
    s = stream_seed(seed, name, *keys)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


class GlobalStream:
    """A private torch CPU RNG state for code that reads torch's global RNG (torchvision transforms): each
    ``active()`` swaps the stream in and the caller's state back, so the stream continues where it stopped."""

    def __init__(self, seed: int, name: str, *keys: int | str):
        self.state = generator(seed, name, *keys).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)


def init_generators(seed: int) -> Callable[[str], torch.Generator]:
    """Per parameter name, a generator on ``("init", name)``: arms of a study whose parameters share a name and a
    shape start from the same values (a decoder-width arm still shares the whole encoder)."""
    return functools.partial(generator, seed, "init")


@contextmanager
def seeded(seed: int, name: str, *keys: int | str) -> Iterator[None]:
    """Run the block on torch's global CPU RNG seeded from the stream, and give the caller's state back after: for
    one sample's augmentation (keyed by the sample, so neither loader workers nor ranks change its draws)."""
    saved = torch.get_rng_state()
    torch.default_generator.manual_seed(stream_seed(seed, name, *keys))  # CPU only: torch.manual_seed costs 90 us
    try:
        yield
    finally:
        torch.set_rng_state(saved)
