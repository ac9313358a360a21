"""Shared helpers of the benchmark scripts: the machine line, interleaved timing, a matmul peak, a plain table.

Every benchmark times its baseline and its candidates in one process, interleaved round by round, and reports
medians, so a shared, loaded machine slows all of them alike and the ratios stay meaningful.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/X.py` from a checkout
    sys.path.insert(0, str(ROOT))

CIFAR10 = Path(os.environ.get("MAE_LAB_DATA", ROOT.parent / "shared" / "data")) / "cifar10"


def machine() -> str:
    """One line: CPU model, cores, torch threads, torch version, load average (other processes on the machine)."""
    from mae_lab.run.provenance import device_name

    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{device_name('cpu')}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads){gpu}, load average {load}")


def interleaved(fns: dict[str, Callable[[], object]], *, rounds: int, reps: int = 1,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn: `rounds` rounds, each calling every fn `reps` times in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_fn(dtype: torch.dtype, n: int = 2048) -> tuple[Callable[[], object], float]:
    """(a call doing one n x n x n matmul, its FLOPs): the matmul peak, timed among the other candidates."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return (lambda: a @ b), 2.0 * n**3


def mae_train_step(config, batch: int, amp: bool) -> tuple[Callable[[], object], Callable[[], float]]:
    """(one mae-lab training step on a fixed random batch: forward, backward, fused AdamW; the FLOPs of a forward
    + backward of that step, from torch.utils.flop_counter). Seeded: the same model and batch on every call."""
    from mae_lab.train.common import param_groups_weight_decay
    from mae_lab.train.model import MaskedAutoencoder

    torch.manual_seed(0)
    model = MaskedAutoencoder(config)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    x = torch.randn(batch, 3, config.img_size, config.img_size)  # (B, C, H, W)
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(x, generator=gen)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def flops() -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            model(x, generator=torch.Generator().manual_seed(0))[0].backward()
        opt.zero_grad(set_to_none=True)
        return fc.get_total_flops()

    return step, flops


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def header(title: str, command: str) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"command: {command}")


def cifar10_info(val_samples: int | None, tmp_dir: Path):
    """DatasetInfo of the shared CIFAR-10 train shards and a val split of the first `val_samples` test samples
    (copied into one shard under `tmp_dir`, so that evaluation is short), or the full test split for None."""
    import json
    import tarfile

    from mae_lab.data import CIFAR10_MEAN, CIFAR10_STD, DatasetInfo

    meta = json.loads((CIFAR10 / "dataset.json").read_text())
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    val, num_val = str(CIFAR10 / test["shards"]), test["samples"]
    if val_samples is not None:
        val, num_val = str(Path(tmp_dir) / f"val-{val_samples}-000000.tar"), val_samples
        keys: set[str] = set()
        with tarfile.open(CIFAR10 / "cifar10-test-000000.tar") as src, tarfile.open(val, "w") as dst:
            for m in src:
                key = m.name.split(".", 1)[0]
                if key not in keys and len(keys) == val_samples:
                    break
                keys.add(key)
                dst.addfile(m, src.extractfile(m))
    return DatasetInfo(name="cifar10", train=str(CIFAR10 / train["shards"]), val=val, num_train=train["samples"],
                       num_val=num_val, classes=tuple(meta["classes"]), image_size=(32, 32), mean=CIFAR10_MEAN,
                       std=CIFAR10_STD)


def uncached_linear_probe(spec, model, info, *, device: str = "cpu") -> dict:
    """The official probe's cost model: `mae_lab.train.probe.linear_probe`'s recipe (same head, init, optimizer, lr
    schedule and batch order), but the frozen encoder re-encodes the train split every epoch and the val split at every
    evaluation, as a loop that feeds images through encoder + head does. Returns {"top1", "wall_s"}."""
    from mae_lab.train.common import use_bf16
    from mae_lab.train.loaders import eval_loader
    from mae_lab.train.probe import LinearHead, extract_features

    t_start = time.perf_counter()
    lin, dev = spec.eval.linear, torch.device(device)
    amp = use_bf16(spec.pretrain.amp, dev, model.config.embed_dim)
    model.to(dev)
    n = min(spec.data.train_samples or info.num_train, info.num_train)
    probe = LinearHead(lin, model.config.embed_dim, info.num_classes, n, dev, spec.seed)
    top1 = 0.0
    for _ in range(lin.epochs):
        train_x, train_y = extract_features(model, eval_loader(spec, info, "train", lin.batch_size), device,
                                            lin.pool, amp)  # re-encoded every epoch
        probe.train_epoch(train_x, train_y)
        val_x, val_y = extract_features(model, eval_loader(spec, info, "val", lin.batch_size), device, lin.pool, amp)
        top1 = probe.top1(val_x, val_y)
    return {"top1": top1, "wall_s": time.perf_counter() - t_start}
