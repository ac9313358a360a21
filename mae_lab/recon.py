"""Reconstructions like the paper's Figure 2: original, masked input, reconstruction, reconstruction with the
visible patches pasted back, for the first ``NUM_IMAGES`` validation images and a mask drawn from ``MASK_SEED``.

With ``norm_pix_loss`` the model predicts each patch normalized by its own mean and variance; ``reconstruct``
de-normalizes every predicted patch with the original patch's mean and (unbiased) variance, as the loss defined
them, and the figure's caption says so. Images are shown de-normalized with the dataset's mean and std.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.engine import Engine
from torch import Tensor

from mae_lab import db
from mae_lab.data import DatasetInfo
from mae_lab.model import MaskedAutoencoder
from mae_lab.atomic import write_atomic
from mae_lab.spec import TrialSpec

NUM_IMAGES = 8
MASK_SEED = 0
GRAY = 0.5  # the fill of removed patches in the masked input
COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


class ReconError(ValueError):
    """No reconstruction can be made or found (no artifact, no checkpoint, bad axis)."""


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


def val_images(spec: TrialSpec, info: DatasetInfo, n: int = NUM_IMAGES) -> Tensor:
    """The first ``n`` validation images, resized and normalized as for evaluation: (n, C, S, S)."""
    from mae_lab.loaders import eval_loader

    imgs, _ = next(iter(eval_loader(spec, info, "val", batch_size=n, max_samples=n)))
    return imgs[:n]


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
    import textwrap

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


def _title(spec: TrialSpec) -> str:
    m = spec.model
    return (f"mask {m.mask_ratio:.0%} {m.mask_sampling}, decoder {m.decoder_depth}x{m.decoder_embed_dim}, "
            f"{'norm-pix' if m.norm_pix_loss else 'pixel'} target, seed {spec.seed}")


def save_trial_recon(model: MaskedAutoencoder, spec: TrialSpec, info: DatasetInfo, path: str | Path) -> str:
    """Write the trial's reconstruction grid to ``path`` (atomically); return the file's sha256."""
    png = recon_png(reconstruct(model, val_images(spec, info), info.mean, info.std), _title(spec))
    write_atomic(path, png)
    return hashlib.sha256(png).hexdigest()


def _artifact(engine: Engine, trial_id: int, kind: str) -> db.ArtifactRow | None:
    _, _, arts = db.trial_details(engine, trial_id)
    return next((a for a in arts if a.kind == kind), None)


def trial_recon_png(engine: Engine, row: db.TrialRow, *, data_root: str | None = None) -> bytes:
    """The trial's reconstruction PNG: its recorded "recon" artifact (sha256 checked), else made from its pretraining
    checkpoint and the validation images of its dataset (``data_root`` as for ``mae-lab run``)."""
    art = _artifact(engine, row.id, "recon")
    if art is not None and Path(art.path).is_file():
        data = Path(art.path).read_bytes()
        if hashlib.sha256(data).hexdigest() == art.sha256:
            return data
    from mae_lab.checkpoint import CheckpointError, load_checkpoint
    from mae_lab.data import DataError, resolve_dataset
    from mae_lab.expand import mae_config

    ckpt = db.get_checkpoint(engine, row.pretrain_hash)
    if ckpt is None or not Path(ckpt.path).is_file():
        raise ReconError(f"trial {row.hash[:12]} ({row.label}) has no reconstruction artifact and no pretraining "
                         f"checkpoint (status {row.status})")
    spec = TrialSpec.model_validate_json(row.spec_json)
    try:
        state = load_checkpoint(ckpt.path, sha256=ckpt.sha256)
        d = spec.data
        info = resolve_dataset(None if d.train else d.dataset, train=d.train, val=d.val, data_root=data_root)
    except (CheckpointError, DataError) as exc:
        raise ReconError(str(exc)) from None
    model = MaskedAutoencoder(mae_config(spec))
    model.load_state_dict(state["model"])
    return recon_png(reconstruct(model, val_images(spec, info), info.mean, info.std), _title(spec))


def _axis_key(row: db.TrialRow, axis: str) -> str:
    keys = list(json.loads(row.axes_json))
    if axis in keys:
        return axis
    near = [k for k in keys if k.split(".")[-1] == axis]
    if len(near) == 1:
        return near[0]
    raise ReconError(f"trial {row.hash[:12]} has no axis {axis!r} (its axes: {', '.join(keys) or 'none'})")


def siblings(engine: Engine, row: db.TrialRow, axis: str) -> list[db.TrialRow]:
    """The trials of ``row``'s study with its seed and its values of every other axis, sorted by ``axis``."""
    key = _axis_key(row, axis)
    mine = json.loads(row.axes_json)
    out = []
    for t, _ in db.study_trials(engine, row.study_id):
        axes = json.loads(t.axes_json)
        if t.seed == row.seed and all(axes.get(k) == v for k, v in mine.items() if k != key) and key in axes:
            out.append(t)
    return sorted(out, key=lambda t: (str(type(json.loads(t.axes_json)[key])), json.loads(t.axes_json)[key]))


def side_by_side(pngs: list[bytes], titles: list[str], suptitle: str = "") -> bytes:
    """Lay PNG images side by side at their own resolution, each under its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    images = [mpimg.imread(io.BytesIO(p), format="png") for p in pngs]
    dpi = 100
    head = 0.6  # inches above the images for the titles
    h = max(im.shape[0] for im in images) / dpi + head
    w = sum(im.shape[1] for im in images) / dpi * 1.02
    fig, axes = plt.subplots(1, len(images), figsize=(w, h), dpi=dpi, squeeze=False,
                             gridspec_kw={"width_ratios": [im.shape[1] for im in images]})
    for ax, im, t in zip(axes[0], images, titles):
        ax.imshow(im, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(t, fontsize=9, fontweight="bold")
    fig.suptitle(suptitle, fontsize=9, y=1 - 0.05 / h, va="top")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - head / h, wspace=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def show_recon(engine: Engine, row: db.TrialRow, out: str | Path, *, across: str | None = None,
               data_root: str | None = None) -> list[str]:
    """What ``mae-lab show TRIAL --recon OUT [--across AXIS]`` does: write the trial's reconstruction grid, or the
    grids of the trials that differ from it only in ``across`` (same seed), side by side. Returns their labels."""
    if across is None:
        write_atomic(out, trial_recon_png(engine, row, data_root=data_root))
        return [row.label]
    key = _axis_key(row, across)
    trials = siblings(engine, row, key)
    pngs = [trial_recon_png(engine, t, data_root=data_root) for t in trials]
    titles = [f"{key.split('.')[-1]}={json.loads(t.axes_json)[key]}" for t in trials]
    write_atomic(out, side_by_side(pngs, titles, f"reconstructions across {key.split('.')[-1]} (seed {row.seed})"))
    return [t.label for t in trials]


def study_recon_png(engine: Engine, report) -> bytes | None:
    """For a study page: the recorded reconstructions across the study's first axis (first seed), side by side;
    None when its trials have no "recon" artifacts (pages never need the data or a checkpoint)."""
    if not report.axes or not report.rows or not report.rows[0].trial_ids:
        return None
    first = next((t for t, _ in db.study_trials(engine, db.get_study(engine, report.name).id)
                  if t.id == report.rows[0].trial_ids[0]), None)
    if first is None:
        return None
    trials = siblings(engine, first, report.axes[0])
    arts = [_artifact(engine, t.id, "recon") for t in trials]
    pairs = [(t, a) for t, a in zip(trials, arts) if a is not None and Path(a.path).is_file()]
    if not pairs:
        return None
    key = report.axes[0]
    return side_by_side([Path(a.path).read_bytes() for _, a in pairs],
                        [f"{key.split('.')[-1]}={json.loads(t.axes_json)[key]}" for t, _ in pairs],
                        f"reconstructions across {key.split('.')[-1]} (seed {first.seed})")
