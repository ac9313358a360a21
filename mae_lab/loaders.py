"""The one place that maps a TrialSpec onto data.py: which split, transform, batch size, shuffling and subset.

`data.train_samples = N` keeps the first N training samples in shard order (a fixed subset for small-data
ablations): they are decoded once per process and served from memory, shuffled and augmented per (seed, epoch)
exactly like the streaming loaders (DataLoader workers are not used for such a subset; it is already decoded).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from mae_lab.data import DatasetInfo, ImageTransform, eval_transform, make_loader, pretrain_transform
from mae_lab.spec import TrialSpec


def _seed(*ints: int) -> int:
    """A 63-bit seed from integers (independent streams for different tuples)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _as_is(img: Tensor) -> Tensor:
    return img


@functools.lru_cache(maxsize=4)
def first_samples(pattern: str, num_samples: int, n: int) -> tuple[Tensor, Tensor]:
    """The first `n` samples of a split in shard order, decoded: (uint8 (n, 3, H, W), long (n,)); cached."""
    loader = make_loader(pattern, num_samples=num_samples, transform=_as_is, batch_size=256, shuffle=False)
    images, labels, have = [], [], 0
    for x, y in loader:  # (B, 3, H, W) uint8, (B,)
        images.append(x[: n - have])
        labels.append(y[: n - have])
        have += len(labels[-1])
        if have >= n:
            break  # stop reading: only the first n are needed
    return torch.cat(images), torch.cat(labels)


class MemoryLoader:
    """Iterable of (images float (B, 3, S, S), labels long (B,)) over decoded uint8 images, for one epoch.

    With `shuffle`, a permutation seeded by (seed, epoch); rank r takes every world_size-th index. Augmentation
    runs on a private torch RNG stream seeded by (seed, epoch, rank), so batches are a function of those alone.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, transform: ImageTransform, batch_size: int, shuffle: bool,
                 seed: int, epoch: int, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.images, self.labels, self.transform, self.batch_size = images, labels, transform, batch_size
        self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, seed, epoch, drop_last
        self.rank, self.world_size = rank, world_size

    def _mine(self) -> Tensor:
        n = len(self.labels)
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, self.epoch)))
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.labels[self.rank :: self.world_size])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        mine = self._mine()
        rng_state = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank, 2)).get_state()
        for b in range(len(self)):
            idx = mine[b * self.batch_size : (b + 1) * self.batch_size]  # (B,)
            with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
                torch.set_rng_state(rng_state)
                x = torch.stack([self.transform.augment(im) for im in self.images[idx]])  # (B, 3, S, S) uint8
                rng_state = torch.get_rng_state()
            yield self.transform.normalize(x), self.labels[idx]


def _train_loader(spec: TrialSpec, info: DatasetInfo, transform: ImageTransform, *, batch_size: int, shuffle: bool,
                  epoch: int, drop_last: bool, rank: int = 0, world_size: int = 1, max_samples: int | None = None):
    """Loader over the train split, or over its first `data.train_samples` (and at most `max_samples`) samples."""
    d = spec.data
    limit = min(n for n in (d.train_samples, max_samples, info.num_train) if n is not None)
    if limit < info.num_train:
        images, labels = first_samples(info.train, info.num_train, limit)
        return MemoryLoader(images, labels, transform=transform, batch_size=batch_size, shuffle=shuffle,
                            seed=spec.seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last)
    return make_loader(info.train, num_samples=info.num_train, transform=transform, batch_size=batch_size,
                       shuffle=shuffle, seed=spec.seed, epoch=epoch, num_workers=d.num_workers, rank=rank,
                       world_size=world_size, drop_last=drop_last, in_memory=d.in_memory)


def pretrain_loader(spec: TrialSpec, info: DatasetInfo, epoch: int, *, rank: int = 0, world_size: int = 1):
    """Shuffled, augmented (`data.augmentation`) train batches of `pretrain.batch_size`; drop_last (official)."""
    transform = pretrain_transform(spec.data.augmentation, spec.model.img_size, info.mean, info.std)
    return _train_loader(spec, info, transform, batch_size=spec.pretrain.batch_size, shuffle=True, epoch=epoch,
                         drop_last=True, rank=rank, world_size=world_size)


def eval_loader(spec: TrialSpec, info: DatasetInfo, split: str, batch_size: int, *,
                max_samples: int | None = None):
    """Unshuffled, unaugmented batches of "train" (honouring `data.train_samples`) or "val"; keeps every sample."""
    transform = eval_transform(spec.model.img_size, info.mean, info.std)
    if split == "train":
        return _train_loader(spec, info, transform, batch_size=batch_size, shuffle=False, epoch=0, drop_last=False,
                             max_samples=max_samples)
    if split != "val":
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    if max_samples is not None and max_samples < info.num_val:
        images, labels = first_samples(info.val, info.num_val, max_samples)
        return MemoryLoader(images, labels, transform=transform, batch_size=batch_size, shuffle=False,
                            seed=spec.seed, epoch=0)
    return make_loader(info.val, num_samples=info.num_val, transform=transform, batch_size=batch_size,
                       shuffle=False, num_workers=spec.data.num_workers, in_memory=spec.data.in_memory)


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize, keeping 0 bits (a black image) as old Pillow did: Pillow >= 12 refuses bits < 1, which
    timm's 'inc1' RandAugment asks for at magnitude 10."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def finetune_transform(img_size: int, mean, std, randaug: str | None, *, min_crop_scale: float = 0.08,
                       flip: bool = True) -> ImageTransform:
    """Fine-tuning augmentation: RandomResizedCrop(scale min_crop_scale-1, bicubic) + flip, then timm RandAugment
    if given (the official recipe is scale 0.08 with flips; tiny images such as 8x8 digits want milder settings).

    uint8 (3, H, W) -> uint8 (3, S, S); normalisation happens per batch. RandAugment's translation is 45% of the
    image side and its fill the dataset mean, as in timm's `create_transform`.
    """
    from torchvision.transforms import v2

    size = (img_size, img_size)
    steps = [v2.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                  antialias=True)] + ([v2.RandomHorizontalFlip()] if flip else [])
    if randaug:
        from timm.data import auto_augment

        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        randaugment = auto_augment.rand_augment_transform(randaug, hparams)
        for op in randaugment.ops:
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
        steps += [v2.ToPILImage(), randaugment, v2.PILToTensor()]
    return ImageTransform(v2.Compose(steps), tuple(mean), tuple(std))


def finetune_loader(spec: TrialSpec, info: DatasetInfo, epoch: int, *, rank: int = 0, world_size: int = 1):
    """Shuffled train batches of `eval.finetune.batch_size` with the fine-tuning augmentation; drop_last."""
    ft = spec.eval.finetune
    transform = finetune_transform(spec.model.img_size, info.mean, info.std, ft.randaug,
                                   min_crop_scale=ft.min_crop_scale, flip=ft.flip)
    return _train_loader(spec, info, transform, batch_size=ft.batch_size, shuffle=True, epoch=epoch,
                         drop_last=True, rank=rank, world_size=world_size)
