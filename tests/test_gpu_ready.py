"""What the CPU can show of a CUDA run (issue 29): the compiled step holds no mask sampler and no graph break, no
silent fall back to eager after many trials in one process, the same masks for any process count, the parameters
DDP must expect unused, a checkpoint without a CUDA RNG state resumes, and --nproc checked against the GPUs."""
from __future__ import annotations

import pytest
import torch
from test_train import make_spec

from mae_lab import rng
from mae_lab.study.expand import mae_config
from mae_lab.study.presets import config_from_preset
from mae_lab.train.checkpoint import commit_checkpoint, load_checkpoint, save_checkpoint
from mae_lab.train.common import compile_module, use_compile
from mae_lab.train.masking import ids_from_noise
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.pretrain import pretrain, step_noise

SAMPLINGS = ["random", "block", "grid"]


@pytest.fixture(scope="module")
def digits(digits_cache):
    from mae_lab.data import resolve_dataset

    return resolve_dataset("digits", cache_dir=digits_cache)


def _loop_calls(spec, digits) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of every forward call the pretraining loop makes (eager, one process)."""
    model = MaskedAutoencoder(mae_config(spec))
    calls: list[tuple[tuple, dict]] = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)
    pretrain(spec, digits, device="cpu", ckpt_path=None, model=model)
    return calls, model


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_the_loops_step_compiles_to_one_graph_without_breaks(digits, sampling):
    """torch._dynamo.explain over the very call the loop makes: one graph, 0 breaks, for every mask sampling (the
    loop used to pass a CPU generator in: 4 breaks with random masking, InternalTorchDynamoError with block)."""
    spec = make_spec(data={"augmentation": "none", "train_samples": 64}, model={"mask_sampling": sampling},
                     pretrain={"epochs": 1, "batch_size": 32, "warmup_epochs": 0})
    calls, model = _loop_calls(spec, digits)
    assert len(calls) == 2
    args, kwargs = calls[0]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_no_eager_fall_back_after_ten_configurations_in_one_process():
    """Ten models (ten mask ratios: ten shapes) compiled one after another in one process, as a study or search
    runs them: each is compiled. Without torch._dynamo.reset() per trial the 9th and 10th run eagerly (Dynamo's
    recompile limit of 8 on the shared forward code), while their throughput would be recorded as compiled."""
    from torch._dynamo.testing import CompileCounter

    frames = []
    for i in range(10):
        c = config_from_preset("vit_digits", mask_ratio=0.05 * (i + 1))
        counter = CompileCounter()
        fwd = compile_module(MaskedAutoencoder(c), backend=counter)
        fwd(torch.randn(2, 3, 8, 8), noise=step_noise(c, 2, torch.Generator().manual_seed(i), torch.device("cpu")))
        frames.append(counter.frame_count)
    assert frames == [1] * 10


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_masks_are_equal_drawn_in_one_place_or_per_rank(sampling):
    """One process drawing with the sampler, one process through step_noise, and each of 2 and 4 ranks taking its
    rows of the global batch's noise: the same masks, ids_keep and ids_restore."""
    c = config_from_preset("vit_digits", mask_sampling=sampling, mask_ratio=0.75)
    model, cpu = MaskedAutoencoder(c), torch.device("cpu")
    one = model.mask_ids(16, 0.75, generator=rng.generator(3, "mask", 1))  # the sampler, in one place
    for world in (1, 2, 4):
        for rank in range(world):
            ids = ids_from_noise(step_noise(c, 16 // world, rng.generator(3, "mask", 1), cpu, rank, world), 0.75)
            for a, b in zip(ids, one):
                assert torch.equal(a, b[rank::world])


def test_ties_in_the_noise_keep_index_order():
    """A stable argsort: tied noise keeps patches in index order on any device (an unstable CPU sort reorders
    ties for rows of 64 or more)."""
    noise = torch.zeros(2, 64)
    noise[:, 32:] = 1.0
    ids_keep, ids_restore, mask = ids_from_noise(noise, 0.5)
    assert torch.equal(ids_keep, torch.arange(32).expand(2, 32))
    assert torch.equal(ids_restore, torch.arange(64).expand(2, 64)) and mask[:, 32:].all() and not mask[:, :32].any()


@pytest.mark.parametrize("in_encoder", [False, True])
def test_unused_parameters_are_the_ones_without_a_gradient(in_encoder):
    """What the model declares unused (DDP's find_unused_parameters follows it) is exactly what a backward leaves
    without a gradient."""
    c = config_from_preset("vit_digits", mask_token_in_encoder=in_encoder)
    model = MaskedAutoencoder(c)
    noise = step_noise(c, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    model(torch.randn(4, 3, 8, 8), noise=noise)[0].backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert no_grad == sorted(model.unused_parameters()) == (["mask_token"] if in_encoder else [])


class Stop(Exception):
    pass


def _stop_after_first(m):
    if m["epoch"] == 1:
        raise Stop  # as a kill after the checkpoint of epoch 1 was written


@pytest.mark.parametrize("cuda_state", ["absent", "old per-GPU list"])
def test_a_checkpoint_without_a_cuda_rng_state_resumes(tmp_path, digits, cuda_state):
    """A checkpoint whose rng has no "cuda" entry (or an old one-per-GPU list) resumes, to the same weights."""
    spec = make_spec(data={"augmentation": "none", "train_samples": 64},
                     pretrain={"epochs": 2, "batch_size": 32, "warmup_epochs": 0})
    full = pretrain(spec, digits, device="cpu", ckpt_path=None)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Stop):
        pretrain(spec, digits, device="cpu", ckpt_path=ckpt, on_epoch=_stop_after_first)
    commit_checkpoint(ckpt)  # as the runner does once the staged checkpoint's sha256 is recorded
    state = load_checkpoint(ckpt)
    if cuda_state == "absent":
        del state["rng"]["cuda"]
    else:
        state["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    save_checkpoint(ckpt, state)
    resumed = pretrain(spec, digits, device="cpu", ckpt_path=ckpt)
    assert resumed.epochs == 2 and resumed.loss_history == full.loss_history
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                  full.model.state_dict().values()))


def test_nproc_is_checked_against_the_visible_gpus(workdir, monkeypatch):
    """--nproc 2 --device cuda where no GPU is visible: one line, exit 2, no process started, nothing written."""
    from test_ddp import STUDY
    from typer.testing import CliRunner

    from cli import app

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (workdir / "ddp.toml").write_text(STUDY.format(epochs=1, batch=32))
    res = CliRunner().invoke(app, ["run", "ddp.toml", "--nproc", "2", "--device", "cuda"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "--nproc 2 --device cuda: 0 GPU(s) visible" in lines[0]
    assert not (workdir / "db").exists()


@pytest.mark.slow
def test_a_compiled_pretraining_with_block_masking_runs(digits):
    """pretrain.compile = true with block masking (InternalTorchDynamoError at the sampler before): one epoch
    through inductor, the same losses as eager up to float reordering."""
    kw = dict(data={"augmentation": "none", "train_samples": 64}, model={"mask_sampling": "block"})
    eager = pretrain(make_spec(**kw, pretrain={"epochs": 1, "batch_size": 32, "warmup_epochs": 0}), digits,
                     device="cpu", ckpt_path=None)
    compiled = pretrain(make_spec(**kw, pretrain={"epochs": 1, "batch_size": 32, "warmup_epochs": 0,
                                                  "compile": True}), digits, device="cpu", ckpt_path=None)
    assert compiled.loss_history == pytest.approx(eager.loss_history, rel=1e-4)


def test_compile_auto_compiles_on_cuda_only(digits):
    """pretrain.compile defaults to "auto": compiled on CUDA, eager on the CPU (where compiling outlasts a short
    run); true and false are kept as given."""
    assert make_spec().pretrain.compile == "auto"
    assert [use_compile(c, torch.device(d)) for c in ("auto", True, False) for d in ("cuda", "cpu")] == \
        [True, False, True, True, False, False]
