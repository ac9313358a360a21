"""Probe surfaces: top-1 after each listed block, per probe_every epoch, recorded, drawn and noted in the report."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import dump_db
from typer.testing import CliRunner

from cli import app
from mae_lab.data import resolve_dataset
from mae_lab.study.expand import expand, mae_config
from mae_lab.study.spec import parse_study
from mae_lab.train.loaders import eval_loader
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.probe import extract_features
from mae_lab.train.probe_surface import block_features, surface_blocks

REPO = Path(__file__).resolve().parent.parent
STUDY = """
[study]
name = "surf"
[data]
dataset = "digits"
augmentation = "none"
train_samples = 512
[model]
preset = "vit_digits"
[pretrain]
epochs = 2
batch_size = 64
base_lr = 1.5e-3
warmup_epochs = 0
probe_every = 1
[eval]
linear = {{ epochs = 5, batch_size = 128, warmup_epochs = 1, pool = "mean", blocks = {blocks} }}
finetune = {{ enabled = false }}
"""


def test_one_pass_gives_every_block_and_the_last_equals_forward_features(digits_cache):
    spec = expand(parse_study(STUDY.format(blocks="[1, 3]"), "t.toml"))[0].spec
    assert surface_blocks(spec) == [1, 3, 4]
    info = resolve_dataset("digits", cache_dir=digits_cache)
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_config(spec))
    loader = eval_loader(spec, info, "val", 128)
    feats, labels = block_features(model, loader, "cpu", [1, 3, 4], pool="mean")
    want, want_labels = extract_features(model, loader, "cpu", pool="mean")
    torch.testing.assert_close(feats[4], want, rtol=0, atol=0)
    assert torch.equal(labels, want_labels)
    assert feats[1].shape == want.shape and not torch.allclose(feats[1], feats[3])


def test_surface_is_recorded_and_reported(workdir):
    (workdir / "surf.toml").write_text(STUDY.format(blocks="[1, 2]"))
    res = CliRunner().invoke(app, ["run", "surf.toml", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    db = workdir / "db" / "mae_lab.db"
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT epoch, name, value FROM mae_metrics WHERE stage = 'probe_surface' "
                         "ORDER BY epoch, name").fetchall()
        (linear,) = c.execute("SELECT linear_top1 FROM mae_results").fetchone()
    assert [(e, n) for e, n, _ in rows] == [(e, f"block{b}") for e in (1, 2) for b in (1, 2, 4)]
    assert all(0.0 <= v <= 1.0 for _, _, v in rows)
    last = {n: v for e, n, v in rows if e == 2}
    assert last["block4"] == pytest.approx(linear, abs=1e-6)  # the last block is the linear probe itself

    res = CliRunner().invoke(app, ["report", "surf", "--plots", "plots"])
    assert res.exit_code == 0, res.output
    assert "probe surface, default: best block" in res.output
    png = workdir / "plots" / "surface-default.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = CliRunner().invoke(app, ["report", "surf", "--format", "md"])
    assert res.exit_code == 0 and "## Probe surface" in res.output, res.output


@pytest.mark.parametrize("blocks", ["[0]", "[5]", "[2, 2]"])
def test_block_out_of_range_exits_2(workdir, blocks):
    (workdir / "bad.toml").write_text(STUDY.format(blocks=blocks))
    res = CliRunner().invoke(app, ["run", "bad.toml", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: bad.toml: eval.linear.blocks:"), line
    assert not (workdir / "db" / "mae_lab.db").exists() and dump_db(workdir / "db" / "mae_lab.db") == []


def test_the_shipped_study_validates(workdir):
    res = CliRunner().invoke(app, ["validate", str(REPO / "studies" / "probe_surface.toml")])
    assert res.exit_code == 0, res.output
