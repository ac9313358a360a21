
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import official_random_masking

from mae_lab.study.presets import PRESETS, MAEConfig, config_from_preset
from mae_lab.train.model import (
    MaskedAutoencoder,
    build_timm_vit,
    count_params,
    encoder_flops_per_image,
    get_2d_sincos_pos_embed,
    load_encoder,
)

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(**overrides) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(MAEConfig(**{**TINY, **overrides})).eval()


def official_keys(depth: int, decoder_depth: int) -> set[str]:
    """The state_dict keys of the official MaskedAutoencoderViT, from the documented pattern."""
    block = [f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for t in ("weight", "bias")]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


# ---------------------------------------------------------------------------------------------------------------
# configuration and layout


def test_vit_base_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = MaskedAutoencoder(config_from_preset("mae_vit_base_patch16"))
    sd = model.state_dict()
    assert set(sd) == official_keys(12, 8)
    shapes = {
        "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
        "blocks.0.attn.qkv.weight": (2304, 768), "blocks.11.mlp.fc1.weight": (3072, 768),
        "blocks.11.mlp.fc2.weight": (768, 3072), "norm.weight": (768,), "decoder_embed.weight": (512, 768),
        "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 197, 512), "decoder_blocks.7.attn.qkv.weight": (1536, 512),
        "decoder_norm.bias": (512,), "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert sum(v.numel() for k, v in sd.items() if "pos_embed" not in k) == count_params(model, trainable_only=True)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_official_keys(name):
    config = config_from_preset(name)
    with torch.device("meta"):
        model = MaskedAutoencoder(config)
    assert set(model.state_dict()) == official_keys(config.depth, config.decoder_depth)
    assert model.pos_embed.shape == (1, config.num_patches + 1, config.embed_dim)


def test_presets_and_config_validation():
    c = config_from_preset("mae_vit_huge_patch14", mask_ratio=0.5)
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.mask_ratio) == (1280, 32, 16, 14, 0.5)
    assert config_from_preset("vit_digits").num_patches == 16
    with pytest.raises(ValueError, match="vit_tiny_patch4_32"):
        config_from_preset("vit_gigantic")
    with pytest.raises(ValueError, match="bad override"):
        config_from_preset("vit_digits", dropout=0.1)
    bad = [dict(num_heads=5), dict(decoder_num_heads=3), dict(img_size=18), dict(mask_ratio=1.0),
           dict(mask_ratio=-0.1), dict(mask_sampling="checkerboard"), dict(mask_sampling="grid", mask_ratio=0.6)]
    for kw in bad:
        with pytest.raises(ValueError):
            MAEConfig(**{**TINY, **kw})
    with pytest.raises(ValueError, match="0.8889"):
        MAEConfig(**{**TINY, "mask_sampling": "grid", "mask_ratio": 0.6})


def test_mask_token_in_encoder_adds_one_key():
    assert set(tiny(mask_token_in_encoder=True).state_dict()) - set(tiny().state_dict()) == {"enc_mask_token"}
    assert set(tiny().state_dict()) == official_keys(2, 1)


def official_get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Inline copy of the official util/pos_embed.py (np.float -> np.float64), cls_token=True."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64)
        omega /= d / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_pos_embed_fixed_sincos():
    model = tiny()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"pos_embed", "decoder_pos_embed"}
    expected = torch.from_numpy(official_get_2d_sincos_pos_embed(32, 4)).float()
    assert torch.equal(model.pos_embed[0], expected)
    # first half of the channels encodes the column (w), second half the row (h); cls row zeros
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))
    table = torch.from_numpy(get_2d_sincos_pos_embed(8, 3, 5, cls_token=False)).view(3, 5, 8)  # non-square
    assert torch.equal(table[:, :, :4], table[:1, :, :4].expand(3, -1, -1))  # constant down a column
    assert torch.equal(table[:, :, 4:], table[:, :1, 4:].expand(-1, 5, -1))  # constant along a row
    assert not torch.equal(table[0, 0, :4], table[0, 1, :4])
    assert get_2d_sincos_pos_embed(8, 3, 5).shape == (16, 8)


def test_official_init():
    model = tiny(embed_dim=64, decoder_embed_dim=64)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = (6 / (m.in_features + m.out_features)) ** 0.5
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound
            assert (m.bias == 0).all()
        elif isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-6 and (m.weight == 1).all() and (m.bias == 0).all()
    w = model.patch_embed.proj.weight.flatten(1)  # xavier over (D, C*p*p)
    bound = (6 / sum(w.shape)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    assert 0.01 < model.cls_token.std() < 0.03 and 0.01 < model.mask_token.std() < 0.03


# ---------------------------------------------------------------------------------------------------------------
# patchify, loss, masking


def test_patchify_order_and_roundtrip():
    model = tiny()
    imgs = torch.randn(2, 3, 16, 16)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 48)
    patch = imgs[1, :, 4:8, 8:12]  # row 1, column 2 -> index 1 * 4 + 2, channels last inside the patch
    assert torch.equal(x[1, 6], patch.permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(x), imgs)


def test_loss_only_on_removed_patches():
    model = tiny()
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75)
    kept = (mask == 0).unsqueeze(-1)
    perturbed = torch.where(kept, pred + 100.0, pred)
    assert torch.allclose(model.forward_loss(imgs, perturbed, mask), loss)
    expected = ((pred - model.patchify(imgs)) ** 2).mean(-1)[mask.bool()].mean()
    assert torch.allclose(loss, expected)


def test_norm_pix_loss_uses_unbiased_var():
    model = tiny(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, 48)
    mask = (torch.rand(2, 16) < 0.5).float()
    t = model.patchify(imgs)
    unbiased = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6) ** 0.5
    biased = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6) ** 0.5
    loss = model.forward_loss(imgs, pred, mask)
    assert torch.allclose(loss, (((pred - unbiased) ** 2).mean(-1) * mask).sum() / mask.sum())
    assert not torch.allclose(loss, (((pred - biased) ** 2).mean(-1) * mask).sum() / mask.sum())


def test_noise_reproduces_official_encoder_and_decoder():
    model = tiny()
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise=noise)
        # official forward_encoder
        x = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
        x, mask_ref, ids_restore_ref = official_random_masking(x, 0.75, noise)
        cls = (model.cls_token + model.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in model.blocks:
            x = blk(x)
        x = model.norm(x)
        # official forward_decoder
        y = model.decoder_embed(x)
        mask_tokens = model.mask_token.repeat(y.shape[0], ids_restore_ref.shape[1] + 1 - y.shape[1], 1)
        y_ = torch.cat([y[:, 1:, :], mask_tokens], dim=1)
        y_ = torch.gather(y_, dim=1, index=ids_restore_ref.unsqueeze(-1).repeat(1, 1, y.shape[2]))
        y = torch.cat([y[:, :1, :], y_], dim=1) + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            y = blk(y)
        pred_ref = model.decoder_pred(model.decoder_norm(y))[:, 1:, :]
        pred = model.forward_decoder(latent, ids_restore)
    assert latent.shape == (2, 1 + 4, 32)
    assert torch.equal(mask, mask_ref) and torch.equal(ids_restore, ids_restore_ref)
    assert torch.allclose(latent, x, atol=1e-6) and torch.allclose(pred, pred_ref, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(mask_sampling="random"), dict(mask_sampling="block", mask_ratio=0.5),
                                dict(mask_sampling="grid"), dict(mask_token_in_encoder=True),
                                dict(mask_token_in_encoder=True, mask_sampling="block"),
                                dict(norm_pix_loss=True)])
def test_forward_backward_batch2(kw):
    model = tiny(**kw).train()
    imgs = torch.randn(2, 3, 16, 16)
    loss, pred, mask = model(imgs)
    K = int(16 * (1 - model.config.mask_ratio))
    assert pred.shape == (2, 16, 48) and mask.shape == (2, 16) and torch.isfinite(loss)
    assert (mask.sum(1) == 16 - K).all()
    loss.backward()
    unused = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unused == ({"mask_token"} if model.config.mask_token_in_encoder else set())
    latent, _, _ = model.forward_encoder(imgs, model.config.mask_ratio)
    assert latent.shape[1] == 1 + (16 if model.config.mask_token_in_encoder else K)


def test_mask_token_in_encoder_uses_enc_mask_token():
    model = tiny(mask_token_in_encoder=True)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        a, mask, _ = model.forward_encoder(imgs, 0.75, noise=noise)
        # removed patches do not reach the encoder: changing their pixels changes nothing
        b, _, _ = model.forward_encoder(imgs + 5 * model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48)), 0.75,
                                        noise=noise)
        model.enc_mask_token.add_(1.0)
        c, _, _ = model.forward_encoder(imgs, 0.75, noise=noise)
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)


def test_masking_seeded():
    model = tiny(mask_sampling="block", mask_ratio=0.5)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(imgs)
        torch.manual_seed(3)
        b = model(imgs)
        c = model(imgs, generator=torch.Generator().manual_seed(7))
        d = model(imgs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0]) and torch.equal(c[2], d[2])


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and the timm encoder


def test_state_dict_roundtrip_strict():
    a, b = tiny(), MaskedAutoencoder(MAEConfig(**TINY))
    b.load_state_dict(a.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(a(imgs, noise=noise)[0], b(imgs, noise=noise)[0])


def test_load_encoder_only_dict():
    src, dst = tiny(), MaskedAutoencoder(MAEConfig(**TINY))
    enc = src.encoder_state_dict()
    assert set(enc) == {k for k in official_keys(2, 1) if not k.startswith(("decoder", "mask_token"))}
    report = load_encoder(dst, enc)
    assert report["unexpected"] == []
    assert set(report["missing"]) == set(official_keys(2, 1)) - set(enc)
    assert all(k.startswith(("decoder_", "mask_token")) for k in report["missing"])
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(src.forward_features(imgs), dst.forward_features(imgs))
    with pytest.raises(ValueError, match="head.weight"):
        load_encoder(dst, {**enc, "head.weight": torch.zeros(10, 32)})
    with pytest.raises(ValueError, match="blocks.1.norm1.weight"):
        load_encoder(dst, {k: v for k, v in enc.items() if k != "blocks.1.norm1.weight"})


def test_timm_vit_equivalence():
    model = tiny()
    vit = build_timm_vit(model.config, num_classes=10).eval()
    msg = vit.load_state_dict(model.encoder_state_dict(), strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias"} and msg.unexpected_keys == []
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ours = model.forward_features(imgs)
        assert ours.shape == (2, 17, 32)
        assert torch.allclose(vit.forward_features(imgs), ours, atol=1e-5)
        assert vit(imgs).shape == (2, 10)
    # global average pooling: fc_norm replaces the final norm, as in the official fine-tuning
    vit_avg = build_timm_vit(model.config, num_classes=10, global_pool="avg", drop_path_rate=0.1)
    msg = vit_avg.load_state_dict(model.encoder_state_dict(), strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(msg.unexpected_keys) == {"norm.weight", "norm.bias"}
    # the official state_dict layout of a base-sized encoder maps onto timm's, key for key and shape for shape
    with torch.device("meta"):
        base = MaskedAutoencoder(config_from_preset("mae_vit_base_patch16"))
        timm_base = build_timm_vit(base.config, num_classes=1000)
    enc = {k: tuple(v.shape) for k, v in base.encoder_state_dict().items()}
    tsd = {k: tuple(v.shape) for k, v in timm_base.state_dict().items() if not k.startswith("head")}
    assert enc == tsd


def test_flops_and_params():
    config = MAEConfig(**TINY)
    full = encoder_flops_per_image(MAEConfig(**{**TINY, "mask_ratio": 0.0}))
    masked = encoder_flops_per_image(config)
    with_m = encoder_flops_per_image(MAEConfig(**{**TINY, "mask_token_in_encoder": True}))
    assert 0 < masked < full and abs(with_m - full) / full < 0.01
    assert isinstance(masked, float)
    model = tiny()
    assert count_params(model) == count_params(model, trainable_only=True) + model.pos_embed.numel() + \
        model.decoder_pos_embed.numel()
