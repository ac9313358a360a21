"""`pretrain.init`: official / timm / trial weights at another image size, fine-tuning at its own size, bad inits."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import dump_db
from typer.testing import CliRunner

from cli import app
from mae_lab.data import resolve_dataset
from mae_lab.run.inits import init_source, trial_checkpoint
from mae_lab.store.engine import connect
from mae_lab.study.expand import expand, mae_config
from mae_lab.study.identity import RunContext, hashes
from mae_lab.study.spec import parse_study
from mae_lab.train.finetune import build_classifier, finetune
from mae_lab.train.model import MaskedAutoencoder, build_timm_vit
from mae_lab.train.weights import checkpoint_kind, file_source, init_model, read_state, resize_pos_embed

BASE = """
[study]
name = "{name}"
[data]
dataset = "digits"
augmentation = "none"
[model]
preset = "vit_digits"
depth = 2
img_size = {img}
[pretrain]
epochs = {epochs}
batch_size = 64
base_lr = 1e-4
warmup_epochs = 0
{init}
[eval]
linear = {{ epochs = 15, batch_size = 128, warmup_epochs = 1, pool = "cls" }}
finetune = {finetune}
"""
NO_FT = "{ enabled = false }"


def study_text(name: str, img: int = 8, epochs: int = 0, init: str | None = None, finetune: str = NO_FT) -> str:
    return BASE.format(name=name, img=img, epochs=epochs, finetune=finetune,
                       init=f'init = "{init}"' if init else "")


def spec_of(text: str):
    return expand(parse_study(text, "t.toml"))[0].spec


def _features(model, imgs):
    with torch.no_grad():
        return model.eval().forward_features(imgs)


def test_resize_pos_embed_keeps_cls_and_is_bicubic():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    out = resize_pos_embed(pos, 8)  # (1, 1+64, 8)
    assert out.shape == (1, 65, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)  # the cls token untouched
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)  # (1, D, 4, 4), the official interpolate_pos_embed
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 8)
    torch.testing.assert_close(out[:, 1:], want, rtol=0, atol=1e-6)
    assert resize_pos_embed(pos, 4) is pos  # same grid: as it is


def test_every_format_loads_the_same_encoder(workdir):
    spec = spec_of(study_text("fmt"))
    torch.manual_seed(1)
    src = MaskedAutoencoder(mae_config(spec))
    vit = build_timm_vit(src.config, num_classes=10)
    vit.load_state_dict(src.encoder_state_dict(), strict=False)  # + a head, as a timm classifier has
    files = {"full.pth": {"model": src.state_dict()}, "encoder.pth": {"model": src.encoder_state_dict()},
             "timm.pth": vit.state_dict()}
    for name, obj in files.items():
        torch.save(obj, workdir / name)
    safetensors.torch.save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
                                workdir / "timm.safetensors")
    kinds = {"full.pth": "mae-full", "encoder.pth": "mae-encoder", "timm.pth": "timm", "timm.safetensors": "timm"}
    imgs = torch.randn(3, 3, 8, 8)
    for name, kind in kinds.items():
        assert checkpoint_kind(read_state(workdir / name)) == kind
        s = spec_of(study_text("fmt", init=name))
        assert s.pretrain.init_sha256 is not None and len(s.pretrain.init_sha256) == 64
        torch.testing.assert_close(_features(init_model(s, file_source(s)), imgs), _features(src, imgs), rtol=0, atol=0)
    full_spec = spec_of(study_text("fmt", init="full.pth"))
    full = init_model(full_spec, file_source(full_spec))
    torch.testing.assert_close(full.decoder_pred.weight, src.decoder_pred.weight, rtol=0, atol=0)  # decoder too
    # another image size: the grid is resized, the cls slot kept
    big_spec = spec_of(study_text("fmt", img=16, init="full.pth"))
    big = init_model(big_spec, file_source(big_spec))
    assert big.pos_embed.shape == (1, 65, 64) and big.decoder_pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(big.pos_embed[:, :1], src.pos_embed[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(big.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight, rtol=0, atol=0)


def test_the_init_is_part_of_the_identity(workdir):
    torch.save({"model": MaskedAutoencoder(mae_config(spec_of(study_text("id")))).state_dict()}, workdir / "a.pth")
    study = parse_study(study_text("id", init="a.pth"), "t.toml")
    first = expand(study)[0]
    torch.save({"model": MaskedAutoencoder(mae_config(first.spec)).state_dict()}, workdir / "a.pth")  # new bytes
    second = expand(study)[0]
    assert first.spec.pretrain.init_sha256 != second.spec.pretrain.init_sha256
    one, two = hashes(first.spec, RunContext(precision="fp32")), hashes(second.spec, RunContext(precision="fp32"))
    assert one[0] != two[0] and one[1] != two[1]  # the trial and its pretraining


def _top1(db: Path, study: str) -> float:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT r.linear_top1 FROM mae_results r JOIN mae_trials t ON t.id = r.trial_id "
                         "JOIN mae_studies s ON s.id = t.study_id WHERE s.name = ?", (study,)).fetchone()[0]


@pytest.mark.slow
def test_official_checkpoint_at_another_size_beats_random_init(workdir, digits_cache):
    """Weights trained at 8 px, saved as an official full (visualization) checkpoint, start a 16 px study: its
    probe beats the random init's; its fine-tuning runs at 24 px, an image size of its own."""
    info = resolve_dataset("digits", cache_dir=digits_cache)
    src_spec = spec_of(study_text("src", finetune="{ epochs = 30, batch_size = 64, warmup_epochs = 1, drop_path = 0.0, "
                                              "base_lr = 1e-2, layer_decay = 0.9, min_crop_scale = 0.6, flip = false, "
                                              "label_smoothing = 0.0, global_pool = \"token\" }"))
    torch.manual_seed(0)
    mae = MaskedAutoencoder(mae_config(src_spec))
    vit = finetune(src_spec, mae, info, device="cpu")["model"]  # real training on the digits, 8 px
    enc = {k: v for k, v in vit.state_dict().items() if k in mae.encoder_state_dict()}
    torch.save({"model": {**mae.state_dict(), **enc}}, workdir / "mae_visualize_digits.pth")

    ft24 = "{ epochs = 1, batch_size = 64, warmup_epochs = 0, img_size = 24, flip = false }"
    for name, init in (("random", None), ("released", "mae_visualize_digits.pth")):
        (workdir / f"{name}.toml").write_text(study_text(name, img=16, epochs=1, init=init, finetune=ft24))
        res = CliRunner().invoke(app, ["run", f"{name}.toml", "--device", "cpu"])
        assert res.exit_code == 0, res.output
    db = workdir / "db" / "mae_lab.db"
    random_top1, released_top1 = _top1(db, "random"), _top1(db, "released")
    assert released_top1 > random_top1 + 0.04, (released_top1, random_top1)  # measured: 0.970 vs 0.880
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT count(*) FROM mae_results WHERE finetune_top1 IS NOT NULL").fetchone()[0] == 2


def test_finetune_gets_its_own_image_size():
    spec = spec_of(study_text("ft", finetune="{ img_size = 16 }"))
    model = MaskedAutoencoder(mae_config(spec))
    vit = build_classifier(spec, model, num_classes=10)
    assert vit.pos_embed.shape == (1, 1 + 8 * 8, 64)
    torch.testing.assert_close(vit.pos_embed[:, :1], model.pos_embed[:, :1], rtol=0, atol=0)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("case", ["not_a_checkpoint", "pickled", "width", "patch", "missing_file", "unknown_trial",
                                  "ft_size"])
def test_bad_init_exits_2_and_writes_nothing(workdir, case):
    key, init, extra = "pretrain.init", None, ""
    if case == "not_a_checkpoint":
        (workdir / "notes.pth").write_text("these are not weights\n")
        init, name = "notes.pth", "notes.pth"
    elif case == "pickled":
        torch.save({"model": {}, "args": Path("x")}, workdir / "train.pth")  # pickles a Python object
        init, name = "train.pth", "train.pth"
    elif case in ("width", "patch"):
        field = {"width": "embed_dim = 32", "patch": "patch_size = 4"}[case]
        src = spec_of(study_text("x").replace("depth = 2", f"depth = 2\n{field}"))
        torch.save({"model": MaskedAutoencoder(mae_config(src)).state_dict()}, workdir / "w.pth")
        init, name = "w.pth", "patch_embed.proj.weight" if case == "patch" else "embed_dim 64"
    elif case == "missing_file":
        init, name = "nowhere.pth", "nowhere.pth"
    elif case == "unknown_trial":
        init, name = "0123456789abcdef", "0123456789abcdef"
    else:
        key, name, extra = "eval.finetune.img_size", "9", "{ img_size = 9 }"
    text = study_text("bad", init=init, finetune=extra or NO_FT)
    (workdir / "bad.toml").write_text(text)
    db = workdir / "db" / "mae_lab.db"
    res = CliRunner().invoke(app, ["run", "bad.toml", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: bad.toml:") and key in line and name in line, line
    assert dump_db(db) == [] and not db.exists()  # no database was even created


def test_a_trial_hash_starts_another_study(workdir):
    """A done trial's hash as the init: its checkpoint's encoder, at another image size."""
    no_eval = "{ enabled = false }"
    (workdir / "first.toml").write_text(study_text("first", epochs=1).replace(
        'linear = { epochs = 15, batch_size = 128, warmup_epochs = 1, pool = "cls" }', f"linear = {no_eval}"))
    assert CliRunner().invoke(app, ["run", "first.toml", "--device", "cpu"]).exit_code == 0
    db = workdir / "db" / "mae_lab.db"
    with sqlite3.connect(db) as c:
        (first,) = c.execute("SELECT hash FROM mae_trials").fetchone()
    _, ckpt = trial_checkpoint(connect(f"sqlite:///{db}", create=False), first)
    spec = spec_of(study_text("second", img=16, init=first))
    assert spec.pretrain.init_sha256 is None  # a trial hash is its own identity
    model = init_model(spec, init_source(spec, connect(f"sqlite:///{db}", create=False)))
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, ckpt["model"]["blocks.0.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 65, 64)
    (workdir / "second.toml").write_text(study_text("second", img=16, epochs=1, init=first))
    res = CliRunner().invoke(app, ["run", "second.toml", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT status FROM mae_trials t JOIN mae_studies s ON s.id = t.study_id "
                         "WHERE s.name = 'second'").fetchone() == ("done",)


def test_a_search_with_a_bad_init_exits_2(workdir):
    src = spec_of(study_text("x").replace("depth = 2", "depth = 2\nembed_dim = 32"))
    torch.save({"model": MaskedAutoencoder(mae_config(src)).state_dict()}, workdir / "w.pth")
    text = study_text("s", epochs=1, init="w.pth") + ('[search]\nn_trials = 1\n'
                                                     '[search.space."pretrain.base_lr"]\ntype = "float"\n'
                                                     'low = 1e-4\nhigh = 1e-3\n')
    (workdir / "s.toml").write_text(text)
    res = CliRunner().invoke(app, ["search", "s.toml", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: s.toml: pretrain.init: w.pth:") and "embed_dim 64" in line
    assert not (workdir / "db" / "mae_lab.db").exists()
