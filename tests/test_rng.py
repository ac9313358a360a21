"""Named RNG streams and common random numbers: for one seed, every arm of a study starts from the same weights
where shapes agree, reads the same batches with the same augmentation, and draws the same masks where the mask ratio
and sampling agree (real training on the embedded digits)."""
from __future__ import annotations

import pytest
import torch
from test_train import make_spec

from mae_lab import rng
from mae_lab.data import resolve_dataset
from mae_lab.study.expand import mae_config
from mae_lab.train.loaders import pretrain_loader
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.pretrain import global_mask_noise, pretrain


@pytest.fixture(scope="module")
def digits(digits_cache):
    return resolve_dataset("digits", cache_dir=digits_cache)


def test_streams_are_named_hashed_and_distinct():
    seeds = {rng.stream_seed(0, name, *keys) for name, keys in [
        ("mask", (0,)), ("mask", (1,)), ("augment", (0,)), ("data_order", (0,)), ("augment", (0, 2)),
        ("augment", (2, 0)), ("init", ("cls_token",)), ("probe", ("head",)), ("finetune", (0,))]}
    assert len(seeds) == 9  # (seed, epoch, 2) used to mean augmentation in one module and rank 0's masks in another
    assert rng.stream_seed(0, "mask", 3) == rng.stream_seed(0, "mask", 3) != rng.stream_seed(1, "mask", 3)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="unknown random stream 'masks'"):
        rng.stream_seed(0, "masks", 0)


def _init(digits, seed: int = 0, **model) -> dict[str, torch.Tensor]:
    spec = make_spec(seed, model=model, pretrain={"epochs": 0})
    return pretrain(spec, digits, device="cpu", ckpt_path=None).model.state_dict()


def test_arms_start_from_the_same_weights_where_names_and_shapes_agree(digits):
    base = _init(digits, decoder_depth=1, mask_ratio=0.75)
    deeper = _init(digits, decoder_depth=2, mask_ratio=0.5, decoder_embed_dim=32)
    wider = _init(digits, decoder_depth=1, decoder_embed_dim=64)
    shared = [k for k in base if k in deeper and base[k].shape == deeper[k].shape]
    assert "decoder_blocks.0.attn.qkv.weight" in shared and "blocks.0.attn.qkv.weight" in shared
    assert [k for k in shared if not torch.equal(base[k], deeper[k])] == []
    encoder = [k for k in base if not k.startswith(("decoder", "mask_token"))]
    assert all(torch.equal(base[k], wider[k]) for k in encoder)  # a wider decoder keeps the whole encoder
    other_seed = _init(digits, seed=1, decoder_depth=1, mask_ratio=0.75)
    assert not torch.equal(base["blocks.0.attn.qkv.weight"], other_seed["blocks.0.attn.qkv.weight"])
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(v, _init(digits, decoder_depth=1, mask_ratio=0.75)[k]) for k, v in base.items())


def _batches(digits, epoch: int = 1, rank: int = 0, world_size: int = 1, batch_size: int = 64, **model):
    spec = make_spec(data={"augmentation": "random_resized_crop", "train_samples": 512}, model=model,
                     pretrain={"epochs": 2, "batch_size": batch_size})
    return list(pretrain_loader(spec, digits, epoch, rank=rank, world_size=world_size))


def test_arms_read_the_same_batches_with_the_same_augmentation(digits):
    a = _batches(digits, mask_ratio=0.75, decoder_depth=1)
    b = _batches(digits, mask_ratio=0.5, decoder_depth=2, norm_pix_loss=True)
    assert len(a) == len(b) == 8
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], _batches(digits, epoch=0)[0][0])  # another epoch, other draws
    # process count at an equal global batch: 2 ranks x 32 interleave into the 1 x 64 batches
    r0 = _batches(digits, rank=0, world_size=2, batch_size=32)
    r1 = _batches(digits, rank=1, world_size=2, batch_size=32)
    for (x, y), (x0, y0), (x1, y1) in zip(a, r0, r1):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


class Masks:
    """A forward hook keeping every mask (N, L) the pretraining loop draws."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, _module, _inputs, outputs):
        self.seen.append(outputs[2].detach().clone())


def _masks(digits, **model) -> list[torch.Tensor]:
    spec = make_spec(data={"augmentation": "none", "train_samples": 256}, model=model,
                     pretrain={"epochs": 2, "batch_size": 64, "warmup_epochs": 0})
    m = MaskedAutoencoder(mae_config(spec))
    hook = Masks()
    m.register_forward_hook(hook)
    pretrain(spec, digits, device="cpu", ckpt_path=None, model=m)
    return hook.seen


def test_arms_draw_the_same_masks_where_ratio_and_sampling_agree(digits):
    base = _masks(digits, mask_ratio=0.75, decoder_depth=1)
    other = _masks(digits, mask_ratio=0.75, decoder_depth=2, decoder_embed_dim=64, norm_pix_loss=True)
    assert len(base) == len(other) == 8
    assert all(torch.equal(a, b) for a, b in zip(base, other))
    assert not torch.equal(base[0], base[4])  # epochs draw from their own streams
    assert not all(torch.equal(a, b) for a, b in zip(base, _masks(digits, mask_ratio=0.5, decoder_depth=1)))


@pytest.mark.parametrize("sampling", ["random", "block", "grid"])
def test_ranks_take_their_rows_of_the_global_batchs_masks(sampling):
    """Under --nproc 2 each rank masks its rows of the masks one process draws for the whole batch."""
    spec = make_spec(model={"mask_sampling": sampling, "mask_ratio": 0.75}, pretrain={"epochs": 2})
    model = MaskedAutoencoder(mae_config(spec))
    one = model.mask_ids(16, 0.75, generator=rng.generator(0, "mask", 1))[2]  # (16, L): one process, batch 16
    noise = global_mask_noise(model.config, 16, rng.generator(0, "mask", 1))  # (16, L): what every rank draws
    ranks = [model.mask_ids(8, 0.75, noise=noise[r::2])[2] for r in range(2)]  # (8, L) each, as in the loop
    assert torch.equal(ranks[0], one[0::2]) and torch.equal(ranks[1], one[1::2])
