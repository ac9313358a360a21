"""Masked Autoencoder (He et al., 2022) on timm's ViT blocks, with the official state_dict layout.

The module reads like the official `models_mae.py`: forward_encoder -> forward_decoder -> forward_loss, and
forward returns (loss, pred, mask) with mask 1 = removed, 0 = kept. Parameter names match the official
checkpoints, and the encoder's names load into timm's VisionTransformer.
"""

from collections.abc import Callable
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer

from mae_lab.study.presets import MAEConfig
from mae_lab.train.masking import ids_from_noise, sample_mask_ids

# --------------------------------------------------------------------------------------------------------------
# 2-D sin-cos position embedding, as in the official util/pos_embed.py (MoCo v3)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): [sin | cos] with frequencies 1 / 10000^(2i / embed_dim)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2) outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
    """(grid_h * grid_w [+1], embed_dim) table; the first half of the channels encodes the column (w) index.

    The grid is built with meshgrid(grid_w, grid_h) as in the official code; the cls row (first) is zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding; got {embed_dim}")
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0)  # (2, H, W): grid[0] is the w index, here w goes first
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2) (named emb_h officially)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    pos_embed = np.concatenate([emb_w, emb_h], axis=1)  # (H*W, D)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)  # (1+H*W, D)
    return pos_embed


# --------------------------------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder and a light ViT decoder; state_dict keys equal the official MaskedAutoencoderViT."""

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = c = config
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        block = partial(Block, mlp_ratio=c.mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        L = c.num_patches

        # encoder
        self.patch_embed = PatchEmbed(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans,
                                      embed_dim=c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, c.embed_dim), requires_grad=False)  # fixed sin-cos
        if c.mask_token_in_encoder:
            self.enc_mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.blocks = nn.ModuleList([block(dim=c.embed_dim, num_heads=c.num_heads) for _ in range(c.depth)])
        self.norm = norm_layer(c.embed_dim)

        # decoder (mask_token is unused when mask_token_in_encoder: the encoder already returns all L tokens)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, c.decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [block(dim=c.decoder_embed_dim, num_heads=c.decoder_num_heads) for _ in range(c.decoder_depth)]
        )
        self.decoder_norm = norm_layer(c.decoder_embed_dim)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self, generators: Callable[[str], torch.Generator | None] = lambda name: None):
        """Official init: sin-cos tables, xavier_uniform Linear and patch conv, LayerNorm 1/0, tokens N(0, 0.02).

        ``generators(parameter name)``: the generator each random parameter draws from (``rng.init_generators``:
        arms whose parameters share a name and shape start equal); by default torch's global RNG, as officially.
        """
        gen = generators
        g = self.config.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], g, g, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dec_pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], g, g, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dec_pos).float().unsqueeze(0))

        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]), generator=gen("patch_embed.proj.weight"))  # nn.Linear fan
        nn.init.normal_(self.cls_token, std=0.02, generator=gen("cls_token"))
        nn.init.normal_(self.mask_token, std=0.02, generator=gen("mask_token"))
        if self.config.mask_token_in_encoder:
            nn.init.normal_(self.enc_mask_token, std=0.02, generator=gen("enc_mask_token"))
        names = {id(m): name for name, m in self.named_modules()}
        self.apply(lambda m: self._init_weights(m, gen(f"{names[id(m)]}.weight")))  # apply's order, as officially

    @staticmethod
    def _init_weights(m: nn.Module, generator: torch.Generator | None = None):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def unused_parameters(self) -> list[str]:
        """Names of the trainable parameters that get no gradient by design: the decoder's mask_token when the
        encoder puts [M] in itself (the decoder then receives all L tokens). DistributedDataParallel needs
        find_unused_parameters exactly when this is not empty."""
        return ["mask_token"] if self.config.mask_token_in_encoder else []

    # ----------------------------------------------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), channels last inside a patch (official nchpwq -> nhwpqc)."""
        p, C = self.config.patch_size, self.config.in_chans
        N, h, w = imgs.shape[0], imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W), the inverse of patchify."""
        p, C, g = self.config.patch_size, self.config.in_chans, self.config.grid_size
        N = x.shape[0]
        x = x.reshape(N, g, g, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(N, C, g * p, g * p)

    def mask_ids(self, batch: int, mask_ratio: float, noise=None, generator=None, device=None):
        """(ids_keep (N, K), ids_restore (N, L), mask (N, L)) on `device`.

        With `noise` (N, L): the official argsort masking of that noise, whatever config.mask_sampling says.
        Otherwise config.mask_sampling draws from `generator`, by default a fresh CPU generator seeded from
        torch's global RNG (so torch.manual_seed makes it deterministic).
        """
        if noise is not None:
            return ids_from_noise(noise, mask_ratio)
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        g = self.config.grid_size
        ids = sample_mask_ids(self.config.mask_sampling, batch, g, g, mask_ratio, generator)
        return tuple(t.to(device, non_blocking=True) for t in ids)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise=None, generator=None):
        """(latent (N, 1+K, D) or (N, 1+L, D) with [M] in the encoder, mask (N, L), ids_restore (N, L))."""
        x = self.patch_embed(imgs)  # (N, L, D)
        x = x + self.pos_embed[:, 1:, :]  # add pos embed w/o cls token, before masking
        N, L, D = x.shape

        ids_keep, ids_restore, mask = self.mask_ids(N, mask_ratio, noise, generator, x.device)
        if self.config.mask_token_in_encoder:  # [M] + pos at removed positions, all L tokens stay
            removed = mask.bool().unsqueeze(-1)  # (N, L, 1)
            x = torch.where(removed, self.enc_mask_token + self.pos_embed[:, 1:, :], x)  # (N, L, D)
        else:
            x = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, K, D)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # (1, 1, D)
        x = torch.cat([cls_token.expand(N, -1, -1), x], dim=1)  # (N, 1+K, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent (N, 1+K, D) -> pred (N, L, p*p*C) in patchify order."""
        x = self.decoder_embed(x)  # (N, 1+K, Dd)
        N, _, Dd = x.shape
        if not self.config.mask_token_in_encoder:  # append mask tokens and unshuffle
            L = ids_restore.shape[1]
            mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)  # (N, L-K, Dd)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd) no cls token
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
            x = torch.cat([x[:, :1, :], x_], dim=1)  # (N, 1+L, Dd) cls back in front
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (N, 1+L, p*p*C)
        return x[:, 1:, :]  # drop the cls slot

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE averaged over removed patches; norm_pix_loss normalizes each target patch."""
        target = self.patchify(imgs)  # (N, L, p*p*C)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L) mean loss per patch
        return (loss * mask).sum() / mask.sum().clamp(min=1)  # mean over removed patches

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise=None, generator=None):
        """(loss, pred (N, L, p*p*C), mask (N, L)); mask_ratio None means config.mask_ratio."""
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise=noise, generator=generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # ----------------------------------------------------------------------------------------------------------
    # the encoder alone, for probing and fine-tuning

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder: (N, C, H, W) -> (N, 1+L, D), equal to timm VisionTransformer.forward_features."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (N, 1+L, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's entries (cls_token, pos_embed, patch_embed.*, blocks.*, norm.*): timm ViT names."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in ENCODER_PREFIXES}


def load_encoder(model: MaskedAutoencoder, state_dict: dict) -> dict[str, list[str]]:
    """Load an encoder-only state_dict (e.g. a released mae_pretrain_vit_*.pth "model" dict) into `model`.

    Returns {"missing": [...], "unexpected": []}; the missing keys are the decoder's (and enc_mask_token).
    Raises ValueError for keys the model does not have or for missing encoder keys.
    """
    own = model.state_dict()
    unexpected = sorted(k for k in state_dict if k not in own)
    if unexpected:
        raise ValueError(f"state_dict has keys the model does not: {unexpected}")
    missing_encoder = sorted(k for k in model.encoder_state_dict() if k not in state_dict)
    if missing_encoder:
        raise ValueError(f"state_dict lacks encoder keys: {missing_encoder}")
    msg = model.load_state_dict(state_dict, strict=False)
    return {"missing": list(msg.missing_keys), "unexpected": list(msg.unexpected_keys)}


def build_timm_vit(config: MAEConfig, num_classes: int, global_pool: Literal["token", "avg"] = "token",
                   drop_path_rate: float = 0.0) -> VisionTransformer:
    """timm VisionTransformer matching the encoder; global_pool "avg" uses fc_norm (official fine-tuning).

    Load `MaskedAutoencoder.encoder_state_dict()` with strict=False: the head (and fc_norm for "avg", where
    timm's final norm is an Identity, so norm.* are unexpected) stay at their init.
    """
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg'; got {global_pool!r}")
    return VisionTransformer(
        img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
        num_classes=num_classes, global_pool=global_pool, embed_dim=config.embed_dim, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=True, class_token=True,
        fc_norm=global_pool == "avg", norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate,
    )


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def encoder_flops_per_image(config: MAEConfig) -> float:
    """GFLOPs of one masked forward_encoder pass at config.mask_ratio (FlopCounterMode: 2 per multiply-add).

    The model is built on the meta device, so no memory is allocated even for ViT-H.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = MaskedAutoencoder(config)
        imgs = torch.empty(1, config.in_chans, config.img_size, config.img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_encoder(imgs, config.mask_ratio, generator=torch.Generator().manual_seed(0))
    return counter.get_total_flops() / 1e9
