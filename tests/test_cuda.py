"""The CUDA paths, for a lent GPU (issue 29; `bash benchmarks/gpu_check.sh` runs them): bf16 forward and backward,
the same masks on CPU and CUDA, 2 epochs of pretraining on digits eager and compiled, probe, probe surface and
fine-tune, a checkpoint resumed across devices, a forced OOM recorded as failed with the next trial run, and
`gpu.py --smoke`. Skipped without CUDA. ``MAE_LAB_CUDA_TESTS_ON=cpu`` runs them on the CPU (not the OOM), to
check the tests themselves where no GPU is."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import REPO, study_toml
from test_train import make_spec

from mae_lab.study.presets import config_from_preset
from mae_lab.train.checkpoint import commit_checkpoint, load_checkpoint
from mae_lab.train.finetune import finetune
from mae_lab.train.masking import ids_from_noise
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.pretrain import pretrain, step_noise
from mae_lab.train.probe import linear_probe
from mae_lab.train.probe_surface import probe_surface

DEV = os.environ.get("MAE_LAB_CUDA_TESTS_ON", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
QUICK = {"augmentation": "none", "train_samples": 512}


@pytest.fixture(scope="module")
def digits(digits_cache):
    from mae_lab.data import resolve_dataset

    return resolve_dataset("digits", cache_dir=digits_cache)


def test_forward_and_backward_in_bf16():
    c = config_from_preset("vit_mini_patch4_32")
    model = MaskedAutoencoder(c).to(DEV)
    x = torch.randn(16, 3, 32, 32, device=DEV)  # (B, C, H, W)
    with torch.autocast(torch.device(DEV).type, dtype=torch.bfloat16):
        loss, pred, mask = model(x, noise=step_noise(c, 16, torch.Generator().manual_seed(0), torch.device(DEV)))
    assert pred.dtype == torch.bfloat16 and mask.device.type == torch.device(DEV).type
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("sampling", ["random", "block", "grid"])
def test_masks_are_equal_on_cpu_and_cuda(sampling):
    c = config_from_preset("mae_vit_base_patch16", mask_sampling=sampling, mask_ratio=0.75)
    noise = step_noise(c, 64, torch.Generator().manual_seed(1), torch.device("cpu"))  # (64, 196)
    ties = torch.zeros(4, 196)
    ties[:, ::3] = 1.0  # many equal values: a stable sort keeps them in index order on both devices
    for n in (noise, ties):
        on_cpu, on_dev = ids_from_noise(n, 0.75), ids_from_noise(n.to(DEV), 0.75)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_dev))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_epochs_of_pretraining(digits, compiled):
    from torch._dynamo.utils import counters

    counters.clear()
    spec = make_spec(data=QUICK, model={"mask_sampling": "block"},
                     pretrain={"epochs": 2, "batch_size": 64, "warmup_epochs": 0, "compile": compiled})
    out = pretrain(spec, digits, device=DEV, ckpt_path=None)
    assert out.epochs == 2 and all(torch.isfinite(torch.tensor(out.loss_history)))
    assert out.loss_history[1] < out.loss_history[0] and out.images_per_s > 0
    if compiled:
        assert not counters["graph_break"], dict(counters["graph_break"])


def test_probe_probe_surface_and_finetune(digits):
    spec = make_spec(data=QUICK, pretrain={"epochs": 1, "batch_size": 64, "warmup_epochs": 0},
                     eval_linear={"epochs": 2, "warmup_epochs": 0, "blocks": [2]},
                     eval_finetune={"epochs": 1, "batch_size": 64, "warmup_epochs": 0})
    model = pretrain(spec, digits, device=DEV, ckpt_path=None).model
    lin = linear_probe(spec, model, digits, device=DEV)
    surface = probe_surface(spec, model, digits, DEV)
    ft = finetune(spec, model, digits, device=DEV)
    assert 0.0 <= lin["top1"] <= 1.0 and 0.0 <= ft["top1"] <= 1.0
    assert surface and all(0.0 <= v <= 1.0 for v in surface.values())


@pytest.mark.skipif(DEV != "cuda", reason="pinned memory needs CUDA")
@pytest.mark.parametrize("train_samples", [512, None], ids=["in-memory", "streamed"])
def test_a_cuda_loader_serves_pinned_uint8_normalised_on_the_device_to_the_same_values(digits, train_samples):
    from mae_lab.train.loaders import pretrain_loader

    spec = make_spec(data={"augmentation": "none", "train_samples": train_samples}, pretrain={"batch_size": 64})
    on_cpu = next(iter(pretrain_loader(spec, digits, 0)))[0]  # (B, 3, 8, 8) float, normalised on the CPU
    loader = pretrain_loader(spec, digits, 0, device=DEV)
    raw = next(iter(loader))[0]
    assert raw.dtype == torch.uint8 and raw.is_pinned()
    on_dev = loader.transform.normalize(raw.to(DEV, non_blocking=True))
    assert torch.allclose(on_dev.cpu(), on_cpu, rtol=0, atol=1e-6)


class Stop(Exception):
    pass


def _stop_after_first(m):
    if m["epoch"] == 1:
        raise Stop


@pytest.mark.parametrize("first,then", [("cpu", DEV), (DEV, "cpu")], ids=["cpu-to-cuda", "cuda-to-cpu"])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, digits, first, then):
    spec = make_spec(data=QUICK, pretrain={"epochs": 2, "batch_size": 64, "warmup_epochs": 0, "amp": "none"})
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Stop):
        pretrain(spec, digits, device=first, ckpt_path=ckpt, on_epoch=_stop_after_first)
    commit_checkpoint(ckpt)  # as the runner does once the staged checkpoint's sha256 is recorded
    out = pretrain(spec, digits, device=then, ckpt_path=ckpt)
    assert out.epochs == 2 and load_checkpoint(ckpt)["epoch"] == 2
    assert next(out.model.parameters()).device.type == torch.device(then).type


@pytest.mark.skipif(DEV != "cuda", reason="a CUDA OOM needs CUDA")
def test_an_oom_is_recorded_with_the_hint_and_the_next_trial_runs(workdir):
    from mae_lab.run.runner import run_study

    text = study_toml("oom", data=QUICK, pretrain={"epochs": 1, "batch_size": 64, "warmup_epochs": 0},
                      linear={"enabled": False}, tail='[grid]\n"model.decoder_embed_dim" = [4096, 32]\n')
    (workdir / "oom.toml").write_text(text)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2 * 2**30 / total))  # 2 GiB: the 4096-wide decoder OOMs
    try:
        summary = run_study(workdir / "oom.toml", device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        rows = c.execute("SELECT label, status, error FROM mae_trials ORDER BY id").fetchall()
    status = {label: (s, error) for label, s, error in rows}
    assert status["decoder_embed_dim=4096"][0] == "failed" and status["decoder_embed_dim=32"][0] == "done", rows
    assert status["decoder_embed_dim=4096"][1].startswith("CUDA out of memory: lower pretrain.batch_size"), rows
    assert summary.count("failed") == 1 and summary.count("done") == 1


def test_gpu_py_smoke():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if DEV == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mae-lab bf16 compiled" in p.stdout and "FAILED" not in p.stdout, p.stdout
