"""Pure, seeded mask samplers for MAE (paper Table 1f: random, block, grid).

Every sampler takes (batch, h, w, ratio, generator) for an h x w patch grid (L = h * w) and returns

    ids_keep    (N, K) long   indices of the kept patches, K = int(L * (1 - ratio)) in every sample
    ids_restore (N, L) long   argsort(ids_shuffle): undoes the shuffle (ids_shuffle has kept ids first)
    mask        (N, L) float  1 = removed, 0 = kept, in the original patch order (row-major over the grid)

exactly like `random_masking` in the official code. All randomness comes from the given CPU torch.Generator and
the tensors are created on the CPU; the caller moves them to its device. `mask_noise` turns any sampler's masks into
noise (N, L) whose argsort masking (`ids_from_noise`) gives them back: the training loop draws that noise for the
global batch on the CPU and moves it once, so a compiled step sees one device argsort and no sampler (whose Python
loops and CPU generator would break the graph), and each rank takes its rows of the same masks.
"""

import math
import random

import numpy as np
import torch

from mae_lab.study.presets import MASK_SAMPLINGS as SAMPLERS
from mae_lab.study.presets import grid_k


def num_keep(num_patches: int, ratio: float) -> int:
    """Number of kept patches, as in the official code: int(L * (1 - ratio))."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1); got {ratio}")
    return int(num_patches * (1 - ratio))


def ids_from_noise(noise: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official per-sample random masking from given noise (N, L): the smallest noise is kept."""
    N, L = noise.shape
    len_keep = num_keep(L, ratio)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # (N, L) ascend: small is keep; ties in index order
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (N, K)
    mask = torch.ones(N, L, device=noise.device)  # (N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # (N, L) unshuffle to original order
    return ids_keep, ids_restore, mask


def _ids_from_mask(mask: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids_keep, ids_restore, mask from a (N, L) mask with exactly len_keep zeros per row."""
    kept = (mask == 0).sum(dim=1)
    if not bool((kept == len_keep).all()):
        raise ValueError(f"sampler kept {kept.tolist()} patches per sample, expected {len_keep}")
    ids_shuffle = torch.argsort(mask, dim=1, stable=True)  # (N, L) kept first, each group in grid order
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    return ids_shuffle[:, :len_keep], ids_restore, mask.float()


def random_masking_ids(batch: int, h: int, w: int, ratio: float, generator: torch.Generator):
    """Uniform random masking (the MAE default): per-sample argsort of U(0, 1) noise."""
    noise = torch.rand(batch, h * w, generator=generator)  # (N, L)
    return ids_from_noise(noise, ratio)


def block_masking_ids(batch: int, h: int, w: int, ratio: float, generator: torch.Generator):
    """BEiT-style block-wise masking (BEiT's MaskingGenerator, as in the MAE paper's Table 1f).

    Per sample, rectangles are drawn and masked until L - K patches are masked. A rectangle's area is uniform in
    [min(max(1, L // 12), budget), budget] where budget is the number still to mask (L // 12 gives BEiT's 16 for a
    14 x 14 grid and stays sensible for 4 x 4 or 8 x 8 grids), its aspect ratio is log-uniform in [0.3, 1 / 0.3],
    and its position uniform over the grid. As in BEiT, a rectangle is accepted only when it masks at least one new
    patch and no more than the budget, and the loop stops after 10 rejected draws in a row. The count is then made
    exact: random extra patches are masked (top up) or, if ever over, random masked patches are unmasked (trim).
    The rectangle loop runs on a Python RNG seeded from `generator`, so the result is a function of the generator.
    """
    L = h * w
    len_keep = num_keep(L, ratio)
    target = L - len_keep
    min_area = max(1, L // 12)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    masks = np.zeros((batch, h, w), dtype=bool)
    for m in masks:  # m: (h, w) view, filled in place
        count, misses = 0, 0
        while count < target and misses < 10:
            budget = target - count
            area = rng.uniform(min(min_area, budget), budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = min(h, max(1, round(math.sqrt(area * aspect))))
            bw = min(w, max(1, round(math.sqrt(area / aspect))))
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            new = bh * bw - int(m[top:top + bh, left:left + bw].sum())
            if 0 < new <= budget:
                m[top:top + bh, left:left + bw] = True
                count, misses = count + new, 0
            else:
                misses += 1
        flat = m.reshape(-1)  # (L,) view
        if count < target:  # top up with random unmasked patches
            flat[rng.sample(np.flatnonzero(~flat).tolist(), target - count)] = True
        elif count > target:  # trim: unmask random masked patches
            flat[rng.sample(np.flatnonzero(flat).tolist(), count - target)] = False
    mask = torch.from_numpy(masks.reshape(batch, L)).float()  # (N, L)
    return _ids_from_mask(mask, len_keep)


def grid_masking_ids(batch: int, h: int, w: int, ratio: float, generator: torch.Generator):
    """Regular grid masking: keep one patch of every k x k cell, where ratio == 1 - 1/k^2 (k = 2: 75%).

    The kept patch's offset (dy, dx) inside the cell is drawn per sample and shared by all its cells, so the kept
    patches form a lattice with step k. h and w must be divisible by k.
    """
    k = grid_k(ratio)
    if k is None:
        raise ValueError(
            "grid masking keeps one patch per k x k cell, so mask_ratio must be 1 - 1/k^2 "
            f"(0.75, 0.8889, 0.9375, ...); got {ratio:g}"
        )
    if h % k or w % k:
        raise ValueError(f"grid masking with k={k} (mask_ratio {ratio:g}) needs a patch grid divisible by {k}; "
                         f"got {h} x {w}")
    L = h * w
    len_keep = num_keep(L, ratio)
    if len_keep != L // k**2:
        raise ValueError(f"mask_ratio {ratio!r} keeps int({L} * (1 - ratio)) = {len_keep} patches but a {k} x {k} "
                         f"grid keeps {L // k**2}; pass the ratio as 1 - 1/{k}**2")
    offset = torch.randint(0, k, (batch, 2), generator=generator)  # (N, 2) per-sample (dy, dx)
    rows = torch.arange(h) % k == offset[:, :1]  # (N, h)
    cols = torch.arange(w) % k == offset[:, 1:]  # (N, w)
    keep = rows[:, :, None] & cols[:, None, :]  # (N, h, w)
    mask = (~keep).reshape(batch, L).float()  # (N, L)
    return _ids_from_mask(mask, len_keep)


def sample_mask_ids(kind: str, batch: int, h: int, w: int, ratio: float, generator: torch.Generator):
    """Dispatch to the "random", "block" or "grid" sampler."""
    if kind == "random":
        return random_masking_ids(batch, h, w, ratio, generator)
    elif kind == "block":
        return block_masking_ids(batch, h, w, ratio, generator)
    elif kind == "grid":
        return grid_masking_ids(batch, h, w, ratio, generator)
    raise ValueError(f"unknown mask sampling {kind!r}; expected one of {', '.join(SAMPLERS)}")


def mask_noise(kind: str, batch: int, h: int, w: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """CPU noise (batch, L) whose `ids_from_noise(noise, ratio)` gives exactly the ids and mask that
    `sample_mask_ids(kind, batch, h, w, ratio, generator)` returns, drawing the same numbers from `generator`.

    random: the U(0, 1) noise itself; block / grid: the mask plus a ramp, so kept patches (in [0, 0.5)) sort before
    removed ones (in [1, 1.5)), each group in grid order, as `_ids_from_mask` orders them.
    """
    L = h * w
    if kind == "random":
        return torch.rand(batch, L, generator=generator)  # (N, L)
    _, _, mask = sample_mask_ids(kind, batch, h, w, ratio, generator)  # (N, L) 1 = removed
    return mask + torch.arange(L) / (2 * L)  # (N, L)
