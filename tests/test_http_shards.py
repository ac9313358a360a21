"""http(s) shards: a study reads its shards from a real HTTP server on loopback and gets the numbers it gets from
the same shards on disk; a shard the server does not have is one line naming the URL."""
from __future__ import annotations

import functools
import shutil
import sqlite3
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

STUDY = """[study]
name = "{name}"
[model]
preset = "vit_digits"
[pretrain]
epochs = 1
batch_size = 32
warmup_epochs = 0
[eval.linear]
epochs = 2
batch_size = 64
warmup_epochs = 0
[eval.finetune]
enabled = false
"""


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def served(workdir: Path, digits_cache: Path):
    """The digits shards in a folder served over HTTP on 127.0.0.1 (no dataset.json beside them)."""
    folder = workdir / "www"
    folder.mkdir()
    for shard in (digits_cache / "digits-v2").glob("*.tar"):
        shutil.copy(shard, folder / shard.name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _linear_top1(db: Path, study: str) -> float:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT r.linear_top1 FROM mae_results r JOIN mae_trials t ON t.id = r.trial_id "
                         "JOIN mae_studies s ON s.id = t.study_id WHERE s.name = ? AND t.status = 'done'",
                         (study,)).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


def test_a_study_trains_on_http_shards_like_on_local_ones(workdir: Path, served):
    folder, url = served
    runner = CliRunner()
    for name, base in (("over_http", url), ("on_disk", str(folder))):
        (workdir / f"{name}.toml").write_text(STUDY.format(name=name))
        data = f"train={base}/digits-train-000000.tar,val={base}/digits-val-000000.tar"
        res = runner.invoke(app, ["run", f"{name}.toml", "--data", data, "--device", "cpu"])
        assert res.exit_code == 0, res.output
    over_http = _linear_top1(workdir / "db" / "mae_lab.db", "over_http")
    assert over_http == _linear_top1(workdir / "db" / "mae_lab.db", "on_disk")
    assert over_http > 0.3  # ten classes: trained on real digits, not on an empty or misread stream


def test_a_missing_http_shard_is_one_line_naming_it(workdir: Path, served):
    _, url = served
    (workdir / "s.toml").write_text(STUDY.format(name="missing"))
    data = f"train={url}/no-such-shard.tar,val={url}/digits-val-000000.tar"
    res = CliRunner().invoke(app, ["run", "s.toml", "--data", data, "--device", "cpu"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "no-such-shard.tar" in lines[0] and "404" in lines[0]
