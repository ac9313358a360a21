"""Resume, observed through what pretraining does: a trial killed (SIGKILL) or interrupted (Ctrl-C) after epoch k
runs only epochs k+1..N when the study is run again, and ends with the numbers of an uninterrupted run; a
checkpoint whose sha256 does not match the database is set aside and the trial retrains from epoch 1, with the same
numbers. The epochs a run pretrains are read from its own per-epoch output lines, not from a field the runner
copies (`resumed_from_epoch`): a copy of the code that ignored partial checkpoints fails these tests."""
from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import assert_same_as_uninterrupted, mae_lab, query

EPOCHS = 8
STUDY = f"""# mae-lab run kill.toml
[study]
name = "kill"
seeds = [0]

[model]
preset = "vit_digits"

[pretrain]
epochs = {EPOCHS}
batch_size = 64

[eval]
linear = {{ epochs = 3, warmup_epochs = 1 }}
finetune = {{ epochs = 1, batch_size = 128, warmup_epochs = 0 }}
"""


def checkpoint_epoch(db: Path) -> int:
    """The last pretraining epoch whose checkpoint the database recorded (0: none yet)."""
    try:
        return query(db, "SELECT max(epoch) FROM mae_checkpoints")[0][0] or 0
    except sqlite3.OperationalError:
        return 0


def pretrained_epochs(output: str) -> list[int]:
    """The pretraining epochs a run went through, from its per-epoch lines ('  pretrain epoch 5/8 loss=...')."""
    return [int(e) for e in re.findall(r"^\[[ \d.]+s\]\s+pretrain epoch (\d+)/\d+ ", output, flags=re.M)]


def run(cwd: Path) -> str:
    proc = mae_lab("run", "kill.toml", cwd=cwd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def stop_after(cwd: Path, epoch: int, sig: signal.Signals) -> tuple[int, str]:
    """Start the study, send `sig` once the checkpoint of `epoch` is recorded; return (exit code, output)."""
    db = cwd / "db" / "mae_lab.db"
    proc = mae_lab("run", "kill.toml", cwd=cwd)
    deadline = time.time() + 300
    while checkpoint_epoch(db) < epoch:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"pretraining did not reach epoch {epoch}"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


@pytest.fixture(scope="module")
def clean(tmp_path_factory, digits_cache) -> Path:
    """An uninterrupted run of the study (its database)."""
    d = tmp_path_factory.mktemp("clean")
    (d / "kill.toml").write_text(STUDY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAE_LAB_CACHE", str(digits_cache))
        for var in ("MAE_LAB_DB", "MAE_LAB_DATA", "MAE_LAB_ARTIFACTS"):
            mp.delenv(var, raising=False)
        out = run(d)
    assert pretrained_epochs(out) == list(range(1, EPOCHS + 1)), out
    return d / "db" / "mae_lab.db"


@pytest.mark.slow
def test_sigkill_then_rerun_pretrains_only_the_remaining_epochs(workdir: Path, clean: Path):
    (workdir / "kill.toml").write_text(STUDY)
    db = workdir / "db" / "mae_lab.db"
    code, _ = stop_after(workdir, 3, signal.SIGKILL)
    assert code == -signal.SIGKILL
    k = checkpoint_epoch(db)
    assert 3 <= k < EPOCHS and query(db, "SELECT status FROM mae_trials") == [("running",)]  # a dead worker's

    out = run(workdir)
    assert pretrained_epochs(out) == list(range(k + 1, EPOCHS + 1)), out  # epochs k+1..N, not 1..N again
    assert query(db, "SELECT attempts FROM mae_trials") == [(2,)]
    assert_same_as_uninterrupted(db, clean, trials=1, epochs=EPOCHS)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, reason", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_marks_interrupted_and_resumes(workdir: Path, clean: Path, sig, code, reason):
    (workdir / "kill.toml").write_text(STUDY)
    db = workdir / "db" / "mae_lab.db"
    exit_code, out = stop_after(workdir, 2, sig)
    assert exit_code == code, out
    assert "interrupted" in out and "Traceback" not in out, out
    status, error = query(db, "SELECT status, error FROM mae_trials")[0]
    assert status == "interrupted" and reason in error
    k = checkpoint_epoch(db)
    assert 2 <= k < EPOCHS

    out = run(workdir)
    assert pretrained_epochs(out) == list(range(k + 1, EPOCHS + 1)), out
    assert_same_as_uninterrupted(db, clean, trials=1, epochs=EPOCHS)


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_set_aside_and_retrained(workdir: Path, clean: Path):
    (workdir / "kill.toml").write_text(STUDY)
    db = workdir / "db" / "mae_lab.db"
    stop_after(workdir, 3, signal.SIGKILL)
    [(path,)] = query(db, "SELECT path FROM mae_checkpoints")
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the file still loads, only its sha256 tells
    Path(path).write_bytes(bytes(data))

    out = run(workdir)
    assert "set aside" in out, out
    assert pretrained_epochs(out) == list(range(1, EPOCHS + 1)), out  # retrained from scratch
    assert Path(path).with_suffix(".unverified").read_bytes() == bytes(data)  # kept for a look, not deleted
    assert_same_as_uninterrupted(db, clean, trials=1, epochs=EPOCHS)
