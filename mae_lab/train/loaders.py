"""The one place that maps a TrialSpec onto mae_lab.data: which split, transform, batch size, shuffling and subset.

`data.train_samples = N` keeps the first N training samples in shard order (a fixed subset for small-data
ablations): they are decoded once per process and served from memory, shuffled and augmented per (seed, epoch)
exactly like the streaming loaders (DataLoader workers are not used for such a subset; it is already decoded).
Whichever loader serves a split, `data.num_workers`, `data.in_memory` and the process count at an equal global
batch do not change the batches (mae_lab.data.loading), which is why the trial hash leaves them out.
Pretraining reads the [data] pretraining source where one is given (labels not needed); the probe and fine-tuning
read the labeled train split, validation reads "val" (the dataset's own, or the held-out part of train).
"""
from __future__ import annotations

import os

from mae_lab import rng
from mae_lab.data import DataError, DatasetInfo
from mae_lab.data.loading import MemoryLoader, first_samples, make_loader
from mae_lab.data.transforms import ImageTransform, eval_transform, pretrain_transform
from mae_lab.study.spec import TrialSpec


def _train_loader(spec: TrialSpec, info: DatasetInfo, transform: ImageTransform, *, batch_size: int, shuffle: bool,
                  epoch: int, drop_last: bool, seed: int | None = None, rank: int = 0, world_size: int = 1,
                  max_samples: int | None = None):
    """Loader over the train split (less a held-out val split), or over its first `data.train_samples` (and at most
    `max_samples`) samples of it."""
    limit = min((n for n in (spec.data.train_samples, max_samples) if n is not None), default=None)
    return _split_loader(spec, info, "train", transform, batch_size=batch_size, shuffle=shuffle, epoch=epoch,
                         drop_last=drop_last, seed=spec.seed if seed is None else seed, rank=rank,
                         world_size=world_size, limit=limit, need_label=True)


def _split_loader(spec: TrialSpec, info: DatasetInfo, split: str, transform, *, batch_size: int, shuffle: bool,
                  epoch: int, drop_last: bool, seed: int, rank: int = 0, world_size: int = 1,
                  limit: int | None = None, need_label: bool = True, device: str | None = None):
    """Loader over one split of `info` ("train", "val", "test"), or over its first `limit` samples (decoded once,
    served from memory)."""
    d = spec.data
    cuda = device is not None and device.startswith("cuda")
    pattern, n, subset = info.split(split)
    if limit is not None and limit < n:
        images, targets = first_samples(pattern, limit, allow_pipe=info.allow_pipe, subset=subset,
                                        label_key=d.label_key, need_label=need_label)
        return MemoryLoader(images, targets, transform=transform, batch_size=batch_size, shuffle=shuffle,
                            seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last,
                            device_batches=cuda)
    return make_loader(pattern, num_samples=n, transform=transform, batch_size=batch_size, shuffle=shuffle, seed=seed,
                       epoch=epoch, num_workers=_workers(d.num_workers, cuda, world_size), rank=rank,
                       world_size=world_size, drop_last=drop_last, in_memory=d.in_memory, allow_pipe=info.allow_pipe,
                       subset=subset, label_key=d.label_key, need_label=need_label, device_batches=cuda)


def _workers(num_workers: int, cuda: bool, world_size: int) -> int:
    """`data.num_workers`, where 0 on a CUDA run means "decode in workers": up to 8 per process, from the cores
    this process may use (a GPU waits on a main process that decodes and augments alone). The batches do not
    depend on it (module docstring)."""
    if num_workers or not cuda:
        return num_workers
    return max(1, min(8, len(os.sched_getaffinity(0)) // max(1, world_size) - 1))


def pretrain_loader(spec: TrialSpec, info: DatasetInfo, epoch: int, *, rank: int = 0, world_size: int = 1,
                    device: str | None = None):
    """Shuffled, augmented (`data.augmentation`) batches of `pretrain.batch_size` from the pretraining data (the
    [data] pretraining source, else the train split); drop_last (official). Labels are not needed. On a CUDA
    `device` the batches come as pinned uint8, to be normalised on the device (`make_loader`'s device_batches),
    and `data.num_workers = 0` means workers (`_workers`)."""
    src = info.pretrain_data
    transform = pretrain_transform(spec.data.augmentation, spec.model.img_size, src.mean, src.std)
    limit = spec.data.train_samples if info.pretrain is None else None
    return _split_loader(spec, src, "train", transform, batch_size=spec.pretrain.batch_size, shuffle=True,
                         epoch=epoch, drop_last=True, seed=spec.seed, rank=rank, world_size=world_size, limit=limit,
                         need_label=False, device=device)


def eval_loader(spec: TrialSpec, info: DatasetInfo, split: str, batch_size: int, *,
                max_samples: int | None = None):
    """Unshuffled, unaugmented batches of "train" (honouring `data.train_samples`), "val" or "test"; keeps every
    sample (the first `max_samples` where given)."""
    transform = eval_transform(spec.model.img_size, info.mean, info.std)
    if split == "train":
        return _train_loader(spec, info, transform, batch_size=batch_size, shuffle=False, epoch=0, drop_last=False,
                             max_samples=max_samples)
    if split not in ("val", "test"):
        raise DataError(f"split must be 'train', 'val' or 'test'; got {split!r}")
    return _split_loader(spec, info, split, transform, batch_size=batch_size, shuffle=False, epoch=0,
                         drop_last=False, seed=spec.seed, limit=max_samples)


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
                         drop_last=True, rank=rank, world_size=world_size,
                         seed=rng.stream_seed(spec.seed, "finetune", "data"))  # not pretraining's streams
