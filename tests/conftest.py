"""Shared fixtures and helpers: an isolated working folder per test, one packed copy of the embedded digits, the
real command line in a subprocess, and the small study TOML the tests share."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The CIFAR-10 shards for the tests that read them (they skip without): MAE_LAB_TEST_DATA (.ci/run sets it for a clone
# that has no ../shared beside it), else the shared folder beside the repository.
SHARED_DATA = Path(os.environ.get("MAE_LAB_TEST_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """A cache folder holding the packed digits, shared by the whole session."""
    from mae_lab.data import resolve_dataset

    cache = tmp_path_factory.mktemp("cache")
    resolve_dataset("digits", cache_dir=cache)
    return cache


@pytest.fixture
def workdir(tmp_path, monkeypatch, digits_cache) -> Path:
    """Run in a fresh folder with its own database and artifacts, the shared digits cache, no stray env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAE_LAB_CACHE", str(digits_cache))
    for var in ("MAE_LAB_DB", "MAE_LAB_DATA", "MAE_LAB_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def bound(trials: list) -> list:
    """Expanded trials with the hashes a one-process fp32 run on their data as named records (what tests that fill
    a database by hand record; ``planning.binder`` binds a real run's trials under their data's fingerprint)."""
    from mae_lab.study.identity import RunContext, bind

    return [bind(t, RunContext(precision="fp32")) for t in trials]


def dump_db(path: Path) -> list[str]:
    """Every row of a SQLite file, as SQL text (compares contents regardless of WAL files)."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as c:
        return list(c.iterdump())


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mae_lab(*args: str, cwd: Path) -> subprocess.Popen:
    """Start the real command line in a subprocess (so it can be killed), output captured. Its SIGINT is at the
    default, as from a terminal: a test run started in the background (`cmd &`, CI under nohup) passes SIGINT on
    ignored, and Python then never turns it into Ctrl-C."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


def study_toml(name: str, *, pretrain: dict, linear: dict, finetune: dict | None = None, study: dict | None = None,
               data: dict | None = None, model: dict | None = None, search: dict | None = None,
               space: dict[str, dict] | None = None, comment: str = "", tail: str = "") -> str:
    """A small study's TOML, the template the tests share: [study] name (then `study`'s keys: seeds, paper ...),
    [data] when given, [model] (preset vit_digits unless given; {} leaves the table out), [pretrain], [eval] with
    linear and finetune (fine-tuning off unless given), [search] and one [search.space."<field>"] per `space` entry
    when given, then `tail` as written ([grid], [[cases]] ...). `comment` is a first line (the command it is for)."""
    model = {"preset": "vit_digits"} if model is None else model
    evals = {"linear": linear, "finetune": {"enabled": False} if finetune is None else finetune}
    tables = {"study": {"name": name, **(study or {})}, "data": data or {}, "model": model, "pretrain": pretrain,
              "eval": evals, "search": search or {}, **{f'search.space."{k}"': v for k, v in (space or {}).items()}}
    parts = [f"# {comment}\n" if comment else ""]
    for table, keys in tables.items():
        if keys:
            parts.append(f"[{table}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items()) + "\n")
    return "".join(parts) + tail


def one_epoch_study(name: str, **data) -> str:
    """One epoch of pretraining and of the linear probe, batches of 8, no fine-tuning, on the given [data] keys."""
    quick = {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}
    return study_toml(name, data=data, pretrain=quick, linear=quick)


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=30) as c:
        return c.execute(sql).fetchall()


def assert_same_as_uninterrupted(db: Path, clean_db: Path, *, trials: int, epochs: int) -> None:
    """After kills and reruns: every trial done once, no duplicate rows, integrity ok, every checkpoint loads, and
    the numbers equal an uninterrupted run (top-1 within 1e-9, final pretraining loss within 1e-6 relative)."""
    from mae_lab.train.checkpoint import load_checkpoint

    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert [s for (s,) in query(db, "SELECT status FROM mae_trials")] == ["done"] * trials
    assert query(db, "SELECT count(*) FROM (SELECT trial_id, stage, epoch, name FROM mae_metrics "
                     "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1)") == [(0,)]
    assert query(db, "SELECT count(*), count(DISTINCT trial_id) FROM mae_results") == [(trials, trials)]
    assert query(db, "SELECT trial_id, count(*) FROM mae_metrics WHERE stage='pretrain' AND name='loss' "
                     "GROUP BY trial_id") == [(t, epochs) for t in range(1, trials + 1)]
    sql = "SELECT linear_top1, finetune_top1, pretrain_loss FROM mae_results ORDER BY trial_id"
    for got, want in zip(query(db, sql), query(clean_db, sql), strict=True):
        assert got[0] == pytest.approx(want[0], abs=1e-9) and got[1] == pytest.approx(want[1], abs=1e-9)
        assert got[2] == pytest.approx(want[2], rel=1e-6)
    for path, sha in query(db, "SELECT path, sha256 FROM mae_artifacts WHERE kind='checkpoint'"):
        assert load_checkpoint(path, sha256=sha)["epoch"] == epochs


def official_random_masking(x, mask_ratio, noise):
    """Inline copy of models_mae.py MaskedAutoencoderViT.random_masking, with the noise passed in."""
    import torch

    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore
