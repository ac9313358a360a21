"""Reconstructions like the paper's Figure 2: original, masked input, reconstruction, reconstruction with the
visible patches pasted back, for the first ``NUM_IMAGES`` validation images and a mask drawn from ``MASK_SEED``.

With ``norm_pix_loss`` the model predicts each patch normalized by its own mean and variance; ``reconstruct``
de-normalizes every predicted patch with the original patch's mean and (unbiased) variance, as the loss defined
them, and the figure's caption says so. Images are shown de-normalized with the dataset's mean and std.

This module renders (model and images in, PNG bytes out) and writes a trial's grid when it is done;
``run.recon_figures`` finds what to render for ``show --recon`` in the database, the checkpoints and the datasets, and
``report.recon_page`` lays recorded grids side by side.
"""
from __future__ import annotations

import hashlib
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mae_lab.atomic import write_atomic
from mae_lab.data import DatasetInfo
from mae_lab.study.spec import TrialSpec
from mae_lab.train.loaders import eval_loader
from mae_lab.train.model import MaskedAutoencoder

NUM_IMAGES = 8


MASK_SEED = 0


GRAY = 0.5  # the fill of removed patches in the masked input


COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


@dataclass(frozen=True)
class Recon:
    """Images (N, C, H, W) in [0, 1] display space, and the mask (N, L), 1 = removed."""

    original: Tensor
    masked: Tensor
    recon: Tensor
    pasted: Tensor
    mask: Tensor
    norm_pix: bool
    mask_ratio: float


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, imgs: Tensor, mean, std, *, mask_seed: int = MASK_SEED) -> Recon:
    """Run ``model`` on normalized ``imgs`` (N, C, H, W) with the mask from ``mask_seed``; de-normalize for display."""
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        x = imgs.to(dev)
        _, pred, mask = model(x, generator=torch.Generator().manual_seed(mask_seed))  # (N, L, p*p*C), (N, L)
    finally:
        model.train(was_training)
    target = model.patchify(x)  # (N, L, p*p*C)
    if model.config.norm_pix_loss:  # undo the per-patch normalization of the target
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mu
    m = mask.unsqueeze(-1).to(pred.dtype)  # (N, L, 1)
    pasted = target * (1 - m) + pred * m
    mean_t = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

    def show(t: Tensor) -> Tensor:  # (N, L, p*p*C) normalized patches -> (N, C, H, W) in [0, 1]
        return (model.unpatchify(t.float()) * std_t + mean_t).clamp(0, 1).cpu()

    original = show(target)
    masked = model.unpatchify(model.patchify(original.to(dev)) * (1 - m) + GRAY * m).cpu()
    return Recon(original, masked, show(pred), show(pasted), mask.cpu(), model.config.norm_pix_loss,
                 float(mask.float().mean()))


def caption(recon: Recon) -> str:
    text = f"first {recon.original.shape[0]} validation images, mask seed {MASK_SEED}, " \
           f"{recon.mask_ratio:.0%} of patches removed (gray)"
    if recon.norm_pix:
        text += ("; norm_pix_loss model: each predicted patch is de-normalized with the original patch's mean and "
                 "variance (for removed patches these come from the hidden original, not from the model)")
    return text


def recon_png(recon: Recon, title: str = "") -> bytes:
    """A grid, one row per image: original | masked | reconstruction | reconstruction + visible; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = recon.original.shape[0]
    cell = 1.1
    fig, axes = plt.subplots(n, 4, figsize=(4 * cell, n * cell + 0.9), dpi=100, squeeze=False)
    for i in range(n):
        for j, imgs in enumerate((recon.original, recon.masked, recon.recon, recon.pasted)):
            ax = axes[i][j]
            ax.imshow(imgs[i].permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(COLUMNS[j], fontsize=6)
    fig.suptitle(title, fontsize=7)
    fig.text(0.5, 0.005, "\n".join(textwrap.wrap(caption(recon), 80)), ha="center", va="bottom", fontsize=5)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.45 / (n * cell + 0.9), bottom=0.5 / (n * cell + 0.9),
                        wspace=0.05, hspace=0.05)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def trial_title(spec: TrialSpec) -> str:
    m = spec.model
    return (f"mask {m.mask_ratio:.0%} {m.mask_sampling}, decoder {m.decoder_depth}x{m.decoder_embed_dim}, "
            f"{'norm-pix' if m.norm_pix_loss else 'pixel'} target, seed {spec.seed}")


def val_images(spec: TrialSpec, info: DatasetInfo, n: int = NUM_IMAGES) -> Tensor:
    """The first ``n`` validation images, resized and normalized as for evaluation: (n, C, S, S)."""
    imgs, _ = next(iter(eval_loader(spec, info, "val", batch_size=n, max_samples=n)))
    return imgs[:n]


def save_trial_recon(model: MaskedAutoencoder, spec: TrialSpec, info: DatasetInfo, path: str | Path) -> str:
    """Write the trial's reconstruction grid to ``path`` (atomically); return the file's sha256."""
    png = recon_png(reconstruct(model, val_images(spec, info), info.mean, info.std), trial_title(spec))
    write_atomic(path, png)
    return hashlib.sha256(png).hexdigest()
