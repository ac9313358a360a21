"""Real training on real data, no mocks: the lr schedule, exact resume, divergence, probing and fine-tuning."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import SHARED_DATA

from mae_lab.data import resolve_dataset
from mae_lab.study.expand import expand
from mae_lab.study.spec import TrialSpec, parse_study
from mae_lab.train.checkpoint import FORMAT_KEYS, CheckpointError, commit_checkpoint, load_checkpoint
from mae_lab.train.common import DivergenceError, lr_at
from mae_lab.train.finetune import build_classifier, finetune, param_groups_lrd
from mae_lab.train.pretrain import pretrain
from mae_lab.train.probe import knn_top1, linear_probe

# every MAEConfig field beyond the preset's size, so the tests do not depend on preset defaults
MODEL_FIELDS = {"in_chans": 3, "mlp_ratio": 4.0, "norm_pix_loss": False, "mask_ratio": 0.75,
                "mask_sampling": "random", "mask_token_in_encoder": False}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def make_spec(seed: int = 0, **sections: dict) -> TrialSpec:
    """A resolved TrialSpec from sections, e.g. make_spec(pretrain={"epochs": 1}, eval_linear={"epochs": 5})."""
    sections = {k.replace("_", "."): v for k, v in sections.items()}
    sections["model"] = {**MODEL_FIELDS, **sections.get("model", {})}
    text = f'[study]\nname = "t"\nseeds = [{seed}]\n'
    for name, fields in sections.items():
        text += f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in fields.items())
    return expand(parse_study(text, "t.toml"))[0].spec


@pytest.fixture(scope="module")
def digits(digits_cache):
    return resolve_dataset("digits", cache_dir=digits_cache)


def test_lr_at_warmup_then_half_cosine():
    total, warmup, peak, floor = 100, 10, 1e-3, 1e-5
    lrs = [lr_at(s, total, warmup, peak, floor) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(peak / 2)
    assert max(lrs) == lrs[warmup] == peak  # the peak is at the end of the warmup
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))  # rising during warmup
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))  # then never rising
    assert lrs[warmup + 45] == pytest.approx(floor + (peak - floor) / 2)  # half-way down the cosine
    assert lrs[total] == pytest.approx(floor)
    assert lr_at(0, 10, 0, peak, 0.0) == peak  # no warmup: starts at the peak


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("train_samples", [None, 600], ids=["streamed", "subset"])
def test_resume_gives_the_uninterrupted_weights(tmp_path, digits, train_samples):
    data = {"train_samples": train_samples} if train_samples else {}
    spec = make_spec(data=data, pretrain={"epochs": 2, "batch_size": 128, "base_lr": 1e-3, "warmup_epochs": 1,
                                          "probe_every": 1})
    seen = []
    full = pretrain(spec, digits, device="cpu", ckpt_path=tmp_path / "full.pt", on_epoch=seen.append)
    assert [m["epoch"] for m in seen] == [1, 2]
    assert set(seen[0]) == {"epoch", "loss", "lr", "images_per_s", "peak_mem_mib", "wall_s", "ckpt_sha256",
                            "knn_top1"}
    assert 0.0 <= seen[1]["knn_top1"] <= 1.0
    assert full.epochs == 2 and full.steps == 2 * ((train_samples or digits.num_train) // 128)
    assert full.wall_s > 0 and full.images_per_s > 0 and len(full.loss_history) == 2
    assert 10 < full.peak_mem_mib < 20_000  # a process's peak RSS on CPU, in MiB

    def stop_after_first(m):
        if m["epoch"] == 1:
            raise Interrupt  # as a kill after the checkpoint of epoch 1 was written

    ckpt = tmp_path / "resumed.pt"
    with pytest.raises(Interrupt):
        pretrain(spec, digits, device="cpu", ckpt_path=ckpt, on_epoch=stop_after_first)
    assert not ckpt.exists()  # staged, not yet in place: on_epoch records the sha256 first
    commit_checkpoint(ckpt)  # as the runner does once the sha256 is recorded (settle_checkpoint on resume)
    assert load_checkpoint(ckpt)["epoch"] == 1
    resumed = pretrain(spec, digits, device="cpu", ckpt_path=ckpt)
    assert resumed.steps == full.steps and resumed.loss_history == full.loss_history
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    saved = load_checkpoint(ckpt, sha256=resumed.ckpt_sha256)  # weights_only, hash checked
    assert set(saved) == set(FORMAT_KEYS) and saved["epoch"] == 2 and saved["spec"]["seed"] == 0
    again = pretrain(spec, digits, device="cpu", ckpt_path=ckpt)  # complete: returns at once
    assert again.steps == full.steps and again.images_per_s == 0.0
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in b.items())

    other = make_spec(data=data, pretrain={"epochs": 2, "batch_size": 64})
    written_for = "pretrain.base_lr: the checkpoint was written for 0.001, this trial has 0.00015"
    with pytest.raises(CheckpointError, match=written_for):
        pretrain(other, digits, device="cpu", ckpt_path=ckpt)


def test_zero_epochs_keeps_the_random_init(digits):
    spec = make_spec(pretrain={"epochs": 0})
    a = pretrain(spec, digits, device="cpu", ckpt_path=None).model.state_dict()
    b = pretrain(spec, digits, device="cpu", ckpt_path=None).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same random init every time


def test_divergence_names_the_step(digits):
    spec = make_spec(data={"train_samples": 256},
                     pretrain={"epochs": 2, "batch_size": 64, "base_lr": 1e30, "warmup_epochs": 0})
    with pytest.raises(DivergenceError, match=r"diverged at step \d+") as exc:
        pretrain(spec, digits, device="cpu", ckpt_path=None)
    assert exc.value.step >= 1 and not math.isfinite(exc.value.loss)  # step 0 ran with sane weights


@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "dataset.json").is_file(), reason="no shared CIFAR-10 shards")
def test_cifar_pretraining_lowers_the_loss():
    info = resolve_dataset("cifar10", data_root=SHARED_DATA)
    spec = make_spec(data={"dataset": "cifar10", "train_samples": 2048},
                     model={"preset": "vit_tiny_patch4_32", "embed_dim": 96, "depth": 2, "num_heads": 3,
                            "decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4},
                     pretrain={"epochs": 3, "batch_size": 128, "base_lr": 1.5e-3, "warmup_epochs": 1})
    result = pretrain(spec, info, device="cpu", ckpt_path=None)
    first, last = result.loss_history[0], result.loss_history[-1]
    assert last < 0.8 * first, result.loss_history


# Pretraining beats the random init, as the kNN monitor sees it (same seed, same recipe, common random numbers).
# Measured here on seed 0: kNN top-1 0.57 (random init) -> 0.80 (60 epochs); before the named RNG streams, 0.48 ->
# 0.78. The mean-pool linear probe on 8x8 digits is a weak witness: it gained +3 to +9 points over seeds 0-4 with
# the old draws and +0.7 / -0.3 / -0.3 on seeds 0-2 with the new ones (random-init features already reach 83%), so
# it is run here for its mechanics and the kNN carries the claim.
PROBE_PRETRAIN = {"epochs": 60, "batch_size": 64, "base_lr": 2e-3, "warmup_epochs": 2}
PROBE_LINEAR = {"epochs": 50, "batch_size": 256, "base_lr": 0.1, "pool": "mean"}


@pytest.mark.slow
def test_pretrained_encoder_beats_random_init(digits):
    top1, knn = {}, {}
    for epochs in (0, PROBE_PRETRAIN["epochs"]):
        spec = make_spec(pretrain={**PROBE_PRETRAIN, "epochs": epochs}, eval_linear=PROBE_LINEAR)
        model = pretrain(spec, digits, device="cpu", ckpt_path=None).model
        per_epoch = []
        out = linear_probe(spec, model, digits, device="cpu", on_epoch=per_epoch.append)
        assert out["epochs"] == 50 and len(per_epoch) == 50 and out["top1"] == per_epoch[-1]["top1"]
        assert out["wall_s"] > 0 and out["images_per_s"] > 0
        top1[epochs], knn[epochs] = out["top1"], knn_top1(model, digits, spec, "cpu")
    assert knn[60] > knn[0] + 0.12, knn
    assert min(top1.values()) > 0.5, top1  # both probes learn (ten classes)


def test_finetune_runs_with_mixup_and_randaug(digits):
    spec = make_spec(pretrain={"epochs": 0},
                     eval_finetune={"epochs": 1, "warmup_epochs": 0, "batch_size": 64, "mixup": 0.8, "cutmix": 1.0,
                                    "randaug": "rand-m9-mstd0.5-inc1", "global_pool": "avg"})
    model = pretrain(spec, digits, device="cpu", ckpt_path=None).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    out = finetune(spec, model, digits, device="cpu", on_epoch=seen.append)
    assert 0.0 <= out["top1"] <= 1.0 and out["epochs"] == 1 and len(seen) == 1
    assert out["wall_s"] > 0 and out["images_per_s"] > 0 and math.isfinite(seen[0]["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the MAE is left untouched


def test_finetune_last_k_blocks_zero_trains_only_the_head(digits):
    spec = make_spec(pretrain={"epochs": 0},
                     eval_finetune={"epochs": 1, "warmup_epochs": 0, "batch_size": 128, "last_k_blocks": 0,
                                    "global_pool": "token"})
    model = pretrain(spec, digits, device="cpu", ckpt_path=None).model
    out = finetune(spec, model, digits, device="cpu")
    encoder, tuned = model.encoder_state_dict(), out["model"].state_dict()
    frozen = [k for k in encoder if not k.startswith("norm.")]  # final norm is tuned with the head
    assert all(torch.equal(encoder[k], tuned[k]) for k in frozen)
    assert not torch.equal(encoder["norm.weight"], tuned["norm.weight"])
    assert 0.0 <= out["top1"] <= 1.0


def test_layer_decay_groups_have_the_official_scales(digits):
    spec = make_spec(pretrain={"epochs": 0},
                     eval_finetune={"global_pool": "avg", "layer_decay": 0.75, "weight_decay": 0.05})
    model = pretrain(spec, digits, device="cpu", ckpt_path=None).model
    vit = build_classifier(spec, model, digits.num_classes)
    depth = spec.model.depth
    groups = param_groups_lrd(vit, 0.05, set(vit.no_weight_decay()), 0.75)
    scale, decay = {}, {}
    for g in groups:
        for n in g["names"]:
            scale[n], decay[n] = g["lr_scale"], g["weight_decay"]
    assert set(scale) == {n for n, _ in vit.named_parameters()}
    for n in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert scale[n] == pytest.approx(0.75 ** (depth + 1))
    for i in range(depth):
        assert scale[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(0.75 ** (depth - i))
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert decay["cls_token"] == decay["pos_embed"] == decay["blocks.0.norm1.weight"] == decay["head.bias"] == 0.0
    assert decay["blocks.0.attn.qkv.weight"] == decay["head.weight"] == decay["patch_embed.proj.weight"] == 0.05

    k1 = make_spec(eval_finetune={"last_k_blocks": 1, "global_pool": "avg"})
    trainable = {n for n, p in build_classifier(k1, model, 10).named_parameters() if p.requires_grad}
    assert trainable == {n for n in scale if n.startswith((f"blocks.{depth - 1}.", "fc_norm.", "head."))}


def test_amp_auto_keeps_narrow_models_in_fp32_and_honours_explicit_choices():
    from mae_lab.train.common import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu, 64) and not use_bf16("none", cpu, 1024)
    assert not use_bf16("auto", cpu, 64)  # cast overhead outweighs the gain below width 192
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert use_bf16("auto", cpu, 192) == native


def test_losses_read_in_one_batch_name_the_first_diverged_step():
    from mae_lab.train.common import read_losses

    pending = [(7, torch.tensor(0.5)), (8, torch.tensor(0.25, dtype=torch.bfloat16))]
    assert read_losses(pending) == 0.75 and pending == []
    pending = [(7, torch.tensor(0.5)), (8, torch.tensor(float("nan"))), (9, torch.tensor(float("inf")))]
    with pytest.raises(DivergenceError) as err:
        read_losses(pending)
    assert err.value.step == 8
