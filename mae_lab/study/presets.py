"""The model's configuration, torch-free: MAEConfig (every hyperparameter of the MAE) and its size presets as a
literal dict, so validating a study, listing or reporting never imports torch or timm (model.py builds from it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MASK_SAMPLINGS = ("random", "block", "grid")


def grid_k(ratio: float) -> int | None:
    """The cell size k >= 2 with ratio == 1 - 1/k^2 (tolerance 1e-6), or None when there is none."""
    if not 0.0 < ratio < 1.0:
        return None
    k = round((1 / (1 - ratio)) ** 0.5)
    return k if k >= 2 and abs(1 - 1 / k**2 - ratio) <= 1e-6 else None


def config_problem(c: dict[str, Any]) -> tuple[tuple[str, ...], str] | None:
    """The first thing wrong with a full model configuration (MAEConfig's fields; a study's model filled from its
    preset), as (the fields it concerns, the one to blame first; why), or None: the one list of model checks.
    ``MAEConfig`` refuses what it finds; ``expand.resolve_settings`` names the study's key for it."""
    e, h, de, dh, img, p = (c["embed_dim"], c["num_heads"], c["decoder_embed_dim"], c["decoder_num_heads"],
                            c["img_size"], c["patch_size"])
    ratio, sampling = c["mask_ratio"], c["mask_sampling"]
    if e % h:
        return ("num_heads", "embed_dim"), f"embed_dim {e} is not divisible by num_heads {h}"
    if de % dh:
        return ("decoder_num_heads", "decoder_embed_dim"), \
            f"decoder_embed_dim {de} is not divisible by decoder_num_heads {dh}"
    if img % p:
        return ("patch_size", "img_size"), f"img_size {img} is not divisible by patch_size {p}"
    for name in ("embed_dim", "decoder_embed_dim"):
        if c[name] % 4:
            return (name,), f"{name} {c[name]} must be divisible by 4 (2-D sin-cos embedding)"
    if not 0.0 <= ratio < 1.0:
        return ("mask_ratio",), f"mask_ratio must be in [0, 1); got {ratio}"
    if sampling not in MASK_SAMPLINGS:
        return ("mask_sampling",), f"mask_sampling must be one of {', '.join(MASK_SAMPLINGS)}; got {sampling!r}"
    grid = img // p
    if sampling == "grid":
        k = grid_k(ratio)
        if k is None:
            return ("mask_ratio", "mask_sampling"), ("grid masking keeps one patch per k x k cell, so mask_ratio "
                                                     f"must be 1 - 1/k^2 (0.75, 0.8889, 0.9375, ...); got {ratio}")
        if grid % k:
            return ("mask_ratio", "patch_size"), \
                f"grid masking with k={k} needs a patch grid divisible by {k}; got {grid}x{grid}"
    if int(grid * grid * (1 - ratio)) < 1:
        return ("mask_ratio",), f"mask_ratio {ratio} keeps no patch of the {grid}x{grid} grid"
    return None


@dataclass(frozen=True)
class MAEConfig:
    """Every hyperparameter of the model; names follow the official MaskedAutoencoderViT arguments."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    mask_ratio: float = 0.75
    mask_sampling: str = "random"  # "random" | "block" | "grid"
    mask_token_in_encoder: bool = False  # paper Table 1c: encoder sees [M] tokens at removed positions

    def __post_init__(self):
        problem = config_problem(vars(self))
        if problem is not None:
            raise ValueError(problem[1])

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


PRESETS: dict[str, dict] = {
    # official ImageNet sizes (models_mae.py)
    "mae_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large_patch16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge_patch14": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    # 32 px (CIFAR-scale)
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                               decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "vit_tiny_patch2_32": dict(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3,
                               decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4),
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6,
                                decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "vit_small_patch2_32": dict(img_size=32, patch_size=2, embed_dim=384, depth=12, num_heads=6,
                                decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    # a CPU-sized ViT for 32 px studies: 128 wide, 6 blocks (the 2-core recipe of the shipped CIFAR-10 studies)
    "vit_mini_patch4_32": dict(img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6, num_heads=4,
                               decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # the embedded 8 x 8 digits dataset: seconds per epoch on a CPU
    "vit_digits": dict(img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=4, num_heads=4,
                       decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4),
}


def config_from_preset(name: str, **overrides) -> MAEConfig:
    """MAEConfig for a preset in PRESETS, with field overrides (e.g. mask_ratio=0.5)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    try:
        return MAEConfig(**{**PRESETS[name], **overrides})
    except TypeError as e:  # an unknown field name
        raise ValueError(f"bad override for preset {name!r}: {e}") from None
