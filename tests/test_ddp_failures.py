"""DistributedDataParallel where a GPU run would crash or hang (issue 29), shown with 2 gloo processes on the CPU,
each started by hand as torchrun would and each with a bounded wait: [M] in the encoder (the decoder's mask_token
gets no gradient), an OOM on rank 0 in the middle of pretraining, and rank 0 evaluating for longer than the
collectives' timeout while the other rank waits for its next message."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_ddp import STUDY, _free_port

TESTS = Path(__file__).resolve().parent
RANK_MAIN = "import sys; sys.path[:0] = [{tests!r}, {repo!r}]; import test_ddp_failures as t; t.{fn}()"


def _start(fn: str | None, args: list[str], cwd: Path, **env: str) -> list[subprocess.Popen]:
    """Two ranks: ``python -m cli ARGS``, or ``FN()`` of this module (which reads ARGS from MAE_LAB_TEST_ARGS)."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        e = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
             "OMP_NUM_THREADS": "1", "MAE_LAB_TEST_ARGS": "\x1f".join(args), **env}
        cmd = ([sys.executable, "-c", RANK_MAIN.format(tests=str(TESTS), repo=str(REPO), fn=fn)] if fn
               else [sys.executable, "-m", "cli", *args])
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    """(exit code, output) of each rank; a rank still running after `timeout` seconds is killed (code None)."""
    deadline, results = time.monotonic() + timeout, []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((p.returncode, out))
        except subprocess.TimeoutExpired:
            p.kill()
            results.append((None, p.communicate()[0]))
    return results


def mask_token_rank() -> None:
    """One rank of a 2-process pretraining with [M] in the encoder; rank 0 prints the mask_token's change."""
    import torch.distributed as dist
    from test_train import make_spec

    from mae_lab.data import resolve_dataset
    from mae_lab.train.pretrain import pretrain

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    info = resolve_dataset("digits", cache_dir=os.environ["MAE_LAB_CACHE"])
    kw = dict(data={"augmentation": "none", "train_samples": 256}, model={"mask_token_in_encoder": True})
    spec = make_spec(**kw, pretrain={"epochs": 1, "batch_size": 32, "warmup_epochs": 0})  # 4 steps of 2 x 32
    init = pretrain(make_spec(**kw, pretrain={"epochs": 0}), info, device="cpu", ckpt_path=None).model
    out = pretrain(spec, info, device="cpu", ckpt_path=None, rank=rank, world_size=2)
    if rank == 0:
        moved = (out.model.mask_token - init.mask_token).abs().max().item()
        enc = (out.model.enc_mask_token - init.enc_mask_token).abs().max().item()
        print(f"steps {out.steps} mask_token moved {moved} enc_mask_token moved {enc}", flush=True)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_pretrain_with_the_mask_token_in_the_encoder(workdir: Path):
    """Failed at step 2 before ("Expected to have finished reduction in the prior iteration"): the decoder's
    mask_token gets no gradient. Now DDP is told so, it stays at its init (as in one process), [M] trains."""
    results = _wait(_start("mask_token_rank", [], workdir, MAE_LAB_CACHE=os.environ["MAE_LAB_CACHE"]), 240)
    for code, out in results:
        assert code == 0, out
    line = results[0][1].strip().splitlines()[-1]
    assert line.startswith("steps 4 mask_token moved 0.0 enc_mask_token moved "), line
    assert float(line.split()[-1]) > 0


def oom_rank() -> None:
    """``cli run ARGS`` as one rank, where rank 0's second optimizer step raises a CUDA OOM (as a GPU would)."""
    import torch

    from cli import app

    if os.environ["RANK"] == "0":
        step, calls = torch.optim.AdamW.step, [0]

        def failing_step(self, *a, **k):
            calls[0] += 1
            if calls[0] == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (forced)")
            return step(self, *a, **k)

        torch.optim.AdamW.step = failing_step
    app(os.environ["MAE_LAB_TEST_ARGS"].split("\x1f"))


@pytest.mark.slow
def test_an_oom_on_rank_0_mid_pretraining_ends_every_rank(workdir: Path):
    """Rank 0 used to record the OOM and go on to the next trial while rank 1 waited in a collective of the failed
    one (for the 2 h timeout). Now the job ends on both ranks at once, the trial recorded failed with the hint."""
    study = STUDY.format(epochs=2, batch=32).replace('name = "ddp"', 'name = "ddp"\nseeds = [0, 1]')
    (workdir / "ddp.toml").write_text(study)
    args = ["run", "ddp.toml", "--device", "cpu", "--db", f"sqlite:///{workdir}/mae_lab.db"]
    t0 = time.monotonic()
    results = _wait(_start("oom_rank", args, workdir, MAE_LAB_DDP_TIMEOUT_S="600"), 150)
    took = time.monotonic() - t0
    assert all(code is not None for code, _ in results), f"a rank hung: {results}"
    assert all(code != 0 for code, _ in results), results
    with sqlite3.connect(workdir / "mae_lab.db") as c:
        rows = c.execute("SELECT status, error FROM mae_trials ORDER BY id").fetchall()
    assert [s for s, _ in rows] == ["failed", "pending"], rows
    assert rows[0][1].startswith("CUDA out of memory: lower pretrain.batch_size"), rows[0][1]
    print(f"both ranks ended {took:.0f} s after the start")


@pytest.mark.slow
def test_the_control_messages_wait_on_their_own_group(workdir: Path):
    """The collectives' timeout is 5 s, rank 0 then fine-tunes for longer while rank 1 waits for the next message:
    the job still ends well (the wait is on the gloo control group, with its own long timeout)."""
    study = STUDY.format(epochs=1, batch=32).replace("finetune = { enabled = false }",
                                                     "finetune = { epochs = 25, batch_size = 32 }")
    (workdir / "ddp.toml").write_text(study)
    args = ["run", "ddp.toml", "--device", "cpu", "--db", f"sqlite:///{workdir}/mae_lab.db"]
    results = _wait(_start(None, args, workdir, MAE_LAB_DDP_TIMEOUT_S="5"), 300)
    for code, out in results:
        assert code == 0, out
    with sqlite3.connect(workdir / "mae_lab.db") as c:
        (status, ft_wall) = c.execute("SELECT t.status, r.finetune_wall_s FROM mae_trials t "
                                      "JOIN mae_results r ON r.trial_id = t.id").fetchone()
    assert status == "done" and ft_wall > 5, ft_wall  # rank 1 waited longer than the timeout
