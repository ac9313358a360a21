"""A whole study through `mae-lab run` (runner.run_study) against its trials run as independent jobs.

    python benchmarks/study.py            # decoder depth [1, 2, 4] and last_k_blocks [0, 1, 2]; 1024 train images
    python benchmarks/study.py --quick    # decoder depth [1, 2] and last_k_blocks [0, 2]; 512 train images

Two CIFAR-10 studies on the shortened schedule below (vit_mini_patch4_32, first N train images, a small val split):
1. decoder depth (every trial pretrains its own MAE): `run_study` end to end (database, checkpoints, cached-feature
   probe, fine-tune, recon image) against the same trials as independent jobs, each `pretrain` + a probe that
   re-encodes every epoch (the official probe) + `finetune`;
2. partial fine-tuning of the last k blocks (axes touch evaluation only): the study must pretrain once.
Both run one after the other in this process (the independent jobs first; both share the decoded images).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import _bench  # noqa: F401
from _bench import CIFAR10, cifar10_info, header, pass_fail, table, uncached_linear_probe

from mae_lab.run.runner import run_study
from mae_lab.study.planning import plan, resolve_data
from mae_lab.train.finetune import finetune
from mae_lab.train.pretrain import pretrain

STUDY = """\
[study]
name = "{name}"
seeds = [0]

[data]
dataset = "cifar10v"
train_samples = {n_train}

[model]
preset = "vit_mini_patch4_32"

[pretrain]
epochs = {epochs}
batch_size = 128
base_lr = 1.5e-3
warmup_epochs = 0.5

[eval]
linear = {{ epochs = {lin_epochs}, batch_size = 128 }}
finetune = {{ epochs = 1, batch_size = 128, warmup_epochs = 0 }}

[grid]
"{axis}" = {values}
"""


def data_root(tmp: Path, n_val: int) -> Path:
    """A data root holding "cifar10v": the shared CIFAR-10 train shards and the first n_val test images as val."""
    folder = tmp / "cifar10v"
    folder.mkdir()
    info = cifar10_info(n_val, folder)
    meta = json.loads((CIFAR10 / "dataset.json").read_text())
    meta.pop("sha256", None)
    meta["name"] = "cifar10"  # its mean / std
    meta["splits"] = {"train": {"samples": info.num_train, "shards": info.train},
                      "val": {"samples": info.num_val, "shards": Path(info.val).name}}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return tmp


def independent_jobs(path: Path, root: Path) -> tuple[float, int]:
    """(wall s, pretrainings) of every trial as its own pretrain + uncached probe + fine-tune job."""
    study, trials = plan(path)
    infos = resolve_data(study, trials, str(root))
    t0 = time.perf_counter()
    for t in trials:
        info = infos[t.spec.data.model_dump_json()]
        model = pretrain(t.spec, info, device="cpu", ckpt_path=None).model
        uncached_linear_probe(t.spec, model, info)
        finetune(t.spec, model, info, device="cpu")
    return time.perf_counter() - t0, len(trials)


def whole_study(path: Path, root: Path, tmp: Path) -> tuple[float, int, bool]:
    """(wall s, pretrainings, all done) of `run_study` on a fresh database."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_study(path, db_url=f"sqlite:///{tmp / path.stem}.db", device="cpu",
                            artifacts=tmp / f"{path.stem}-artifacts", data_root=str(root))
    wall = time.perf_counter() - t0
    pretrainings = len(list((tmp / f"{path.stem}-artifacts" / "pretrain").glob("*.pt")))
    return wall, pretrainings, summary.ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        common = dict(n_train=512, epochs=1, lin_epochs=20)
        depths, ks, n_val = [1, 2], [0, 2], 256
    else:
        common = dict(n_train=1024, epochs=2, lin_epochs=50)
        depths, ks, n_val = [1, 2, 4], [0, 1, 2], 512
    header(f"study end to end vs independent jobs: vit_mini_patch4_32, {common['n_train']} train / {n_val} val "
           f"images, {common['epochs']} pretraining epochs, probe {common['lin_epochs']} epochs, fine-tune 1 epoch",
           "python benchmarks/study.py" + (" --quick" if a.quick else ""))
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = data_root(tmp, n_val)
        studies = {
            "decoder_depth": dict(axis="model.decoder_depth", values=depths),
            "partial_finetune": dict(axis="eval.finetune.last_k_blocks", values=ks),
        }
        for name, axis in studies.items():
            path = tmp / f"{name}.toml"
            path.write_text(STUDY.format(name=name, **common, **axis))
            base_s, base_pre = independent_jobs(path, root)
            study_s, study_pre, done = whole_study(path, root, tmp)
            speedup = base_s / study_s
            once = study_pre == 1 if name == "partial_finetune" else study_pre == len(axis["values"])
            ok &= done and once
            rows.append([f"{name} ({len(axis['values'])} trials)", f"{base_s:.0f}", str(base_pre), f"{study_s:.0f}",
                         str(study_pre), f"{speedup:.1f}x", pass_fail(done and once)])
    table(["study", "independent jobs s", "pretrainings", "mae-lab run s", "pretrainings", "speedup",
           "pretrain count"], rows)
    print(f"RESULT studies done, decoder-depth trials pretrain each, eval-only study pretrains once: {pass_fail(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
