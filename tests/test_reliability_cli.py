"""The CLI's boundary: bad input of every kind ends in one line on stderr and exit 2, never a traceback; the few
inputs that look odd but are fine (a UTF-8 byte-order mark, a large grid with --allow-large-grid) are accepted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, dump_db, study_toml
from typer.testing import CliRunner

from cli import app

STUDY = study_toml("combo", study={"seeds": [0, 1]}, model={}, pretrain={"epochs": 2, "warmup_epochs": 0},
                   linear={"epochs": 2, "warmup_epochs": 0}, tail="""[grid]
"model.decoder_depth" = [1, 2]
[[cases]]
"model.mask_sampling" = "random"
"model.mask_ratio" = 0.75
[[cases]]
"model.mask_sampling" = "block"
"model.mask_ratio" = 0.5
""")


def one_line_error(res, *want: str) -> str:
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for w in want:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_a_byte_order_mark_is_read_as_utf8(workdir: Path):
    (workdir / "plain.toml").write_text(STUDY, encoding="utf-8")
    (workdir / "bom.toml").write_bytes(b"\xef\xbb\xbf" + STUDY.encode())
    runner = CliRunner()
    res = runner.invoke(app, ["validate", "bom.toml"])
    assert res.exit_code == 0, res.output
    plain = runner.invoke(app, ["run", "--dry-run", "plain.toml"]).output
    bom = runner.invoke(app, ["run", "--dry-run", "bom.toml"]).output
    assert plain.replace("plain.toml", "") == bom.replace("bom.toml", "")  # the same trials, the same hashes


def test_every_case_is_crossed_with_every_grid_point(workdir: Path):
    from mae_lab.study.expand import expand
    from mae_lab.study.spec import parse_study

    trials = expand(parse_study(STUDY, "combo.toml"))
    points = [(t.spec.model.mask_sampling, t.spec.model.mask_ratio, t.spec.model.decoder_depth, t.spec.seed)
              for t in trials]
    assert points == [(s, r, d, seed) for s, r in (("random", 0.75), ("block", 0.5)) for d in (1, 2)
                      for seed in (0, 1)]


def test_a_large_grid_runs_with_its_flag(workdir: Path):
    large = Path(__file__).parent / "bad_studies" / "large_by_seeds.toml"
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["validate", str(large)]), "12,000 trials", "--allow-large-grid")
    res = runner.invoke(app, ["validate", "--allow-large-grid", str(large)])
    assert res.exit_code == 0 and "ok (12000 trials)" in res.output, res.output
    res = runner.invoke(app, ["run", "--dry-run", "--allow-large-grid", str(large)])
    assert res.exit_code == 0, res.output
    assert len(res.output.splitlines()) == 12_000 + 2  # a title, a header, one line per trial
    assert not (workdir / "db").exists()  # a dry run writes nothing


def test_missing_and_unreadable_paths_are_one_line(workdir: Path):
    runner = CliRunner()
    one_line_error(runner.invoke(app, ["data", "pack", "no_such_dir", "out"]), "no_such_dir")
    assert not (workdir / "out").exists()
    one_line_error(runner.invoke(app, ["validate", "no_such.toml"]), "no_such.toml")
    (workdir / "folder.toml").mkdir()
    one_line_error(runner.invoke(app, ["validate", "folder.toml"]), "folder.toml")
    (workdir / "latin1.toml").write_bytes(b'[study]\nname = "caf\xe9"\n')
    one_line_error(runner.invoke(app, ["validate", "latin1.toml"]), "latin1.toml")
    one_line_error(runner.invoke(app, ["run", "folder.toml"]), "folder.toml")
    assert dump_db(workdir / "db" / "mae_lab.db") == []


def _validate_as_nobody(out) -> None:
    """In a forked child: validate a readable copy first (every module the command needs loads while still root: the
    interpreter's own files may be closed to others), drop root for the unprivileged 'nobody', validate the file."""
    import pwd

    assert CliRunner().invoke(app, ["validate", "readable.toml"]).exit_code == 0
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    res = CliRunner().invoke(app, ["validate", "locked.toml"])
    out.put((res.exit_code, res.output + (repr(res.exception) if res.exit_code not in (0, 2) else "")))


def test_a_study_without_read_permission_is_one_line(workdir: Path):
    """Root reads any file: as root (CI), the command runs in a child that became the unprivileged 'nobody'."""
    import multiprocessing as mp

    (workdir / "locked.toml").write_text(STUDY)
    (workdir / "locked.toml").chmod(0)
    if os.geteuid() != 0:
        res = CliRunner().invoke(app, ["validate", "locked.toml"])
    else:
        workdir.chmod(0o755)  # nobody may enter the folder, not read the file
        (workdir / "readable.toml").write_text(STUDY)
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_validate_as_nobody, args=(out,))
        child.start()
        code, output = out.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0
        res = SimpleNamespace(exit_code=code, output=output, exception=None)
    one_line_error(res, "locked.toml", "Permission")


@pytest.mark.slow
def test_allow_pipe_works_from_the_cli(workdir: Path, digits_cache: Path):
    """'pipe:' shards are refused with a hint naming --allow-pipe, and with the flag the study runs to done."""
    shards = digits_cache / "digits-v2"
    (workdir / "pipe.toml").write_text(f"""[study]
name = "pipe"
[data]
train = "pipe:cat {shards / 'digits-train-000000.tar'}"
val = "pipe:cat {shards / 'digits-val-000000.tar'}"
[pretrain]
epochs = 1
warmup_epochs = 0
batch_size = 128
[eval]
linear = {{ epochs = 1, warmup_epochs = 0 }}
finetune = {{ enabled = false }}
""")
    runner = CliRunner()
    for command in ("validate", "run"):
        one_line_error(runner.invoke(app, [command, "pipe.toml"]), "pipe.toml", "pass --allow-pipe")
    assert dump_db(workdir / "db" / "mae_lab.db") == []
    res = runner.invoke(app, ["validate", "pipe.toml", "--allow-pipe"])  # the flag the hint names exists here too
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "pipe.toml", "--allow-pipe", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "1 trials: 0 already done, 1 done" in res.output


@pytest.mark.parametrize("content", [b"", b"short", b"e\nplain text, not a tar archive\n" * 100],
                         ids=["empty", "short", "text"])
def test_a_shard_that_is_not_a_tar_archive_is_named(workdir: Path, content: bytes):
    (workdir / "plain.tar").write_bytes(content)
    one_line_error(CliRunner().invoke(app, ["data", "info", "plain.tar"]), "plain.tar", "not a tar archive")
    (workdir / "s.toml").write_text('[study]\nname = "s"\n[data]\ntrain = "plain.tar"\nval = "plain.tar"\n')
    for args in (["validate", "s.toml"], ["run", "s.toml"]):
        one_line_error(CliRunner().invoke(app, args), "s.toml", "plain.tar", "not a tar archive")
    assert dump_db(workdir / "db" / "mae_lab.db") == []


def test_a_reader_that_leaves_ends_the_output_quietly(tmp_path: Path):
    """`mae-lab run --help | head -20`: head leaves after its lines, the next write fails with EPIPE, and the command
    ends with click's quiet exit 1, not an 'error:' line (exit 2) or a traceback."""
    cmd = f"'{sys.executable}' -m cli run --help 2>err.txt | head -20 >/dev/null; echo ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"})
    assert proc.stdout.strip() == "1", proc.stdout
    assert (tmp_path / "err.txt").read_text() == ""


def test_the_sigterm_handler_is_set_only_while_a_command_runs_and_only_from_the_main_thread(workdir: Path):
    """The command line turns SIGTERM into an interrupt while it runs (tests/test_resume.py), and gives the caller's
    handler back after; called from another thread (where Python allows no handler) it runs without one."""
    (workdir / "s.toml").write_text(STUDY)
    mine = lambda signum, frame: None  # noqa: E731 - a caller's own handler
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert CliRunner().invoke(app, ["validate", "s.toml"]).exit_code == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        results = []
        thread = threading.Thread(target=lambda: results.append(CliRunner().invoke(app, ["validate", "s.toml"])))
        thread.start()
        thread.join()
        assert results[0].exit_code == 0, results[0].output
    finally:
        signal.signal(signal.SIGTERM, previous)
