import pytest
import torch
from conftest import official_random_masking
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_lab.train.masking import (
    block_masking_ids,
    grid_k,
    grid_masking_ids,
    ids_from_noise,
    random_masking_ids,
    sample_mask_ids,
)

CASES = [  # (kind, batch, h, w, ratio)
    ("random", 4, 14, 14, 0.75), ("random", 3, 4, 4, 0.4), ("random", 2, 6, 9, 0.5), ("random", 2, 8, 8, 0.0),
    ("block", 4, 14, 14, 0.75), ("block", 4, 14, 14, 0.5), ("block", 3, 4, 4, 0.75), ("block", 2, 6, 9, 0.3),
    ("block", 2, 8, 8, 0.9), ("block", 2, 8, 8, 0.0),
    ("grid", 4, 14, 14, 0.75), ("grid", 3, 6, 9, 1 - 1 / 9), ("grid", 2, 8, 8, 0.9375), ("grid", 2, 4, 4, 0.75),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_ids(ids_keep, ids_restore, mask, batch, L, ratio):
    K = int(L * (1 - ratio))
    assert ids_keep.shape == (batch, K) and ids_keep.dtype == torch.long
    assert ids_restore.shape == (batch, L) and ids_restore.dtype == torch.long
    assert mask.shape == (batch, L) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == L - K).all()  # exact count in every sample
    # the shuffle is a permutation with kept ids first; ids_restore undoes it
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(batch, L))
    assert torch.equal(ids_shuffle[:, :K], ids_keep)
    # mask agrees with ids_keep: 0 exactly at the kept ids
    assert (torch.gather(mask, 1, ids_keep) == 0).all()
    expected = torch.ones(batch, L).scatter_(1, ids_keep, 0.0)
    assert torch.equal(mask, expected)
    # mask in original order == shuffled [0]*K + [1]*(L-K) unshuffled, as in the official code
    shuffled = torch.cat([torch.zeros(batch, K), torch.ones(batch, L - K)], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), mask)


@pytest.mark.parametrize("kind,batch,h,w,ratio", CASES)
def test_samplers_exact_and_consistent(kind, batch, h, w, ratio):
    ids = sample_mask_ids(kind, batch, h, w, ratio, gen(0))
    check_ids(*ids, batch, h * w, ratio)
    assert all(t.device.type == "cpu" for t in ids)


@pytest.mark.parametrize("kind,batch,h,w,ratio", [c for c in CASES if 0 < c[4] < 0.9])
def test_samplers_seeded(kind, batch, h, w, ratio):
    a = sample_mask_ids(kind, batch, h, w, ratio, gen(1))
    b = sample_mask_ids(kind, batch, h, w, ratio, gen(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    masks = [sample_mask_ids(kind, batch, h, w, ratio, gen(s))[2] for s in range(2, 8)]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


def test_samplers_consume_generator():
    g = gen(0)
    for kind, ratio in [("random", 0.75), ("block", 0.5), ("grid", 0.75)]:
        a = sample_mask_ids(kind, 8, 8, 8, ratio, g)[2]
        b = sample_mask_ids(kind, 8, 8, 8, ratio, g)[2]
        assert not torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["random", "block"]), batch=st.integers(1, 5), h=st.integers(1, 16),
       w=st.integers(1, 16), ratio=st.floats(0.0, 0.99), seed=st.integers(0, 2**31))
def test_random_and_block_property(kind, batch, h, w, ratio, seed):
    check_ids(*sample_mask_ids(kind, batch, h, w, ratio, gen(seed)), batch, h * w, ratio)


def test_ids_from_noise_matches_official():
    noise = torch.rand(3, 49, generator=gen(0))
    x = torch.randn(3, 49, 5)
    x_masked, mask, ids_restore = official_random_masking(x, 0.75, noise)
    ids_keep, ids_restore2, mask2 = ids_from_noise(noise, 0.75)
    assert torch.equal(ids_restore, ids_restore2) and torch.equal(mask, mask2)
    assert torch.equal(torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 5)), x_masked)
    # random_masking_ids draws exactly that noise from the generator
    drawn = random_masking_ids(3, 7, 7, 0.75, gen(0))
    assert all(torch.equal(a, b) for a, b in zip(drawn, (ids_keep, ids_restore, mask)))


@pytest.mark.parametrize("k,h,w", [(2, 14, 14), (3, 6, 9), (4, 8, 8)])
def test_grid_is_regular_lattice(k, h, w):
    ratio = 1 - 1 / k**2
    assert grid_k(ratio) == k
    _, _, mask = grid_masking_ids(16, h, w, ratio, gen(0))
    offsets = set()
    for m in mask.view(16, h, w):
        rows, cols = (m == 0).nonzero(as_tuple=True)
        dy, dx = int(rows.min()), int(cols.min())
        assert dy < k and dx < k
        lattice = {(i, j) for i in range(dy, h, k) for j in range(dx, w, k)}
        assert set(zip(rows.tolist(), cols.tolist())) == lattice
        offsets.add((dy, dx))
    assert len(offsets) > 1  # the offset is drawn per sample


def test_grid_bad_ratio_and_shape():
    with pytest.raises(ValueError, match=r"1 - 1/k\^2 .*got 0.6"):
        grid_masking_ids(2, 8, 8, 0.6, gen(0))
    with pytest.raises(ValueError, match="divisible"):
        grid_masking_ids(2, 7, 8, 0.75, gen(0))
    assert grid_k(0.75) == 2 and grid_k(8 / 9) == 3 and grid_k(0.9375) == 4
    assert grid_k(0.6) is None and grid_k(0.0) is None and grid_k(0.5) is None and grid_k(0.8889) is None


def components(m):
    """Number of 4-connected components of the True cells of a 2-D bool tensor."""
    h, w = m.shape
    seen, n = set(), 0
    for start in zip(*m.nonzero(as_tuple=True)):
        start = (int(start[0]), int(start[1]))
        if start in seen:
            continue
        n, stack = n + 1, [start]
        seen.add(start)
        while stack:
            i, j = stack.pop()
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < h and 0 <= b < w and m[a, b] and (a, b) not in seen:
                    seen.add((a, b))
                    stack.append((a, b))
    return n


def test_block_masks_are_blocks():
    # masked patches are a union of few rectangles: far more clustered than random masking at the same ratio
    _, _, block = block_masking_ids(32, 14, 14, 0.5, gen(0))
    _, _, rand = random_masking_ids(32, 14, 14, 0.5, gen(0))
    n_block = sum(components(m.view(14, 14).bool()) for m in block) / 32
    n_rand = sum(components(m.view(14, 14).bool()) for m in rand) / 32
    assert n_block < 4 and n_rand > 3 * n_block
    # low ratio: the masked region is a single rectangle in most samples
    _, _, small = block_masking_ids(32, 8, 8, 1 - 58 / 64, gen(1))  # 6 patches masked, min block area 5
    rect = 0
    for m in small.view(32, 8, 8).bool():
        rows, cols = m.nonzero(as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        rect += int(box == m.sum())
    assert rect >= 16


def test_unknown_kind():
    with pytest.raises(ValueError, match="random, block, grid"):
        sample_mask_ids("checkerboard", 2, 4, 4, 0.5, gen(0))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_masking_ids(2, 4, 4, 1.0, gen(0))
