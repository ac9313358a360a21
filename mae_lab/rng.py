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
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from mae_lab.rng_streams import STREAMS, numpy_rng, stream_seed

__all__ = ["STREAMS", "GlobalStream", "generator", "init_generators", "numpy_rng", "seed_globals", "seeded",
           "stream_seed"]


def generator(seed: int, name: str, *keys: int | str) -> torch.Generator:
    """A fresh CPU torch.Generator on the stream."""
    return torch.Generator().manual_seed(stream_seed(seed, name, *keys))


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
