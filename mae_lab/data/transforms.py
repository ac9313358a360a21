"""Image transforms: uint8 (3, H, W) -> augmented uint8, normalised once per batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mae_lab.data.shards import DataError

AUGMENTATIONS = ("none", "fixed_crop", "random_resized_crop", "rrc_color_jitter")


@dataclass(frozen=True)
class ImageTransform:
    """uint8 image (3, H, W) -> float (3, S, S): `augment` (uint8 -> uint8, per image), then `normalize`.

    Loaders call `augment` per image and `normalize` once per batch (vectorised); calling the object does both.
    """

    augment: Callable[[Tensor], Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) -> float32 (..., 3, H, W), (x / 255 - mean) / std, on x's device."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1).to(x.device) * 255
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1).to(x.device) * 255
        return (x.float() - mean) / std

    def __call__(self, img) -> Tensor:
        if not isinstance(img, Tensor):  # a PIL image
            from torchvision.transforms.v2.functional import pil_to_tensor

            img = pil_to_tensor(img.convert("RGB"))
        return self.normalize(self.augment(img))


def pretrain_transform(mode: str, img_size: int, mean, std) -> ImageTransform:
    """Pretraining augmentation of MAE Table 1e.

    none: resize only. fixed_crop: resize, then RandomCrop(img_size, padding=img_size // 8) + flip, i.e. the standard
    CIFAR "pad 4, crop 32" (a fixed-size crop; at ImageNet scale the paper's fixed crop is a center-size crop, which
    at 32 px would leave nothing to vary). random_resized_crop (default): RRC(scale 0.2-1, bicubic) + flip.
    rrc_color_jitter: the previous + ColorJitter(0.4, 0.4, 0.4). Flips are kept for 8x8 digits too (same code path).
    """
    from torchvision.transforms import v2

    bicubic = v2.InterpolationMode.BICUBIC
    size = (img_size, img_size)
    resize = v2.Resize(size, interpolation=bicubic, antialias=True)
    rrc = v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=bicubic, antialias=True)
    steps = {
        "none": [resize],
        "fixed_crop": [resize, v2.RandomCrop(size, padding=img_size // 8), v2.RandomHorizontalFlip()],
        "random_resized_crop": [rrc, v2.RandomHorizontalFlip()],
        "rrc_color_jitter": [rrc, v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.4)],
    }
    if mode not in steps:
        raise DataError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return ImageTransform(v2.Compose(steps[mode]), tuple(mean), tuple(std))


def eval_transform(img_size: int, mean, std) -> ImageTransform:
    """Evaluation: resize to img_size x img_size (a no-op when already that size), then normalise."""
    from torchvision.transforms import v2

    resize = v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return ImageTransform(resize, tuple(mean), tuple(std))
