"""`mae-lab export`: a real trial's encoder, loaded back by timm and by transformers, gives the same features."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import bound, dump_db
from typer.testing import CliRunner

from cli import app
from mae_lab.run.export import trial_encoder
from mae_lab.store.engine import connect
from mae_lab.store.reads import get_study, study_trials
from mae_lab.store.writes import sync_study
from mae_lab.study.planning import plan, trial_rows

STUDY = """
[study]
name = "exp"
[data]
dataset = "digits"
augmentation = "none"
train_samples = 256
[model]
preset = "vit_digits"
depth = 2
[pretrain]
epochs = {epochs}
batch_size = 64
warmup_epochs = 0
[eval]
linear = {{ enabled = false }}
finetune = {{ enabled = false }}
"""


def _run(tmp: Path, epochs: int = 1, name: str = "exp") -> str:
    path = tmp / f"{name}.toml"
    path.write_text(STUDY.format(epochs=epochs).replace('"exp"', f'"{name}"'))
    res = CliRunner().invoke(app, ["run", str(path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    engine = connect(None, create=False)
    study = get_study(engine, name)
    return study_trials(engine, study.id)[0][0].hash


@pytest.fixture(scope="module")
def trial(tmp_path_factory, digits_cache):
    """One done trial (1 epoch, 2 blocks) in a module-wide folder: (folder, trial hash, images)."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("export")
    mp.chdir(tmp)
    mp.setenv("MAE_LAB_CACHE", str(digits_cache))
    for var in ("MAE_LAB_DB", "MAE_LAB_DATA", "MAE_LAB_ARTIFACTS"):
        mp.delenv(var, raising=False)
    yield tmp, _run(tmp), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mp.undo()


def _ours(trial_hash: str, imgs: torch.Tensor) -> torch.Tensor:
    _, model = trial_encoder(connect(None, create=False), trial_hash[:10])
    with torch.no_grad():
        return model.forward_features(imgs)  # (N, 1+L, D)


def test_timm_round_trip(trial):
    import timm

    tmp, h, imgs = trial
    out = tmp / "timm_export"
    res = CliRunner().invoke(app, ["export", h[:10], "--to", "timm", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_args"]["depth"] == 2
    vit = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        theirs = vit.forward_features(imgs)
    ours = _ours(h, imgs)
    assert ours.shape == theirs.shape == (4, 17, 64)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[0], ours[1])  # the features depend on the image


def test_hf_round_trip(trial):
    transformers = pytest.importorskip("transformers")

    tmp, h, imgs = trial
    out = tmp / "hf_export"
    res = CliRunner().invoke(app, ["export", h[:10], "--to", "hf", str(out)])
    assert res.exit_code == 0, res.output
    vit, info = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    with torch.no_grad():
        theirs = vit.eval()(pixel_values=imgs).last_hidden_state  # (N, 1+L, D)
    torch.testing.assert_close(theirs, _ours(h, imgs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["unknown_format", "not_done", "no_trial", "out_not_empty"])
def test_bad_export_exits_2_writes_nothing(trial, case):
    tmp, h, _ = trial
    engine = connect(None, create=False)
    target, fmt, out = h[:10], "timm", tmp / f"bad_{case}"
    if case == "unknown_format":
        fmt = "onnx"
    elif case == "not_done":
        path = tmp / "pending.toml"  # a real trial of another study, recorded but never run
        path.write_text(STUDY.format(epochs=2).replace('"exp"', '"pending"'))
        study, trials = plan(path)
        sync_study(engine, name="pending", description="", paper=None, path=str(path), spec_text=study.text,
                      spec_hash="x", trials=trial_rows(study, bound(trials)))
        target = bound(trials)[0].hash[:10]
    elif case == "no_trial":
        target = "ffffffffff"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = dump_db(tmp / "db" / "mae_lab.db")
    res = CliRunner().invoke(app, ["export", target, "--to", fmt, str(out)])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error:")
    assert {"unknown_format": "onnx", "not_done": "not 'done'", "no_trial": "ffffffffff",
            "out_not_empty": str(out)}[case] in line
    assert dump_db(tmp / "db" / "mae_lab.db") == before
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(f".bad_{case}")]  # no temp folder left
