"""Every broken study under tests/bad_studies/ fails with exit code 2, one line naming the file and the key, and
leaves the database exactly as it was."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bound, dump_db
from typer.testing import CliRunner

from cli import app

BAD = sorted((Path(__file__).parent / "bad_studies").glob("*.toml"))
GOOD = """
[study]
name = "good"
[pretrain]
epochs = 1
warmup_epochs = 0
"""


def expectations(path: Path) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:")]


def test_corpus_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_study_is_refused(path: Path, workdir: Path):
    # a database with one study in it already: the refused run must not touch it
    from mae_lab.store.engine import connect
    from mae_lab.store.writes import sync_study
    from mae_lab.study.planning import plan, trial_rows

    (workdir / "good.toml").write_text(GOOD)
    study, trials = plan(workdir / "good.toml")
    engine = connect("sqlite:///db/mae_lab.db")
    sync_study(engine, name="good", description="", paper=None, path="good.toml", spec_text=GOOD, spec_hash="h",
                  trials=trial_rows(study, bound(trials)))
    engine.dispose()
    before = dump_db(workdir / "db" / "mae_lab.db")

    runner = CliRunner()
    for args in (["validate", str(path)], ["run", str(path)], ["run", "--dry-run", str(path)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        out = res.stderr if hasattr(res, "stderr") else res.output
        lines = [line for line in out.strip().splitlines() if line.strip()]
        assert len(lines) == 1, out
        assert str(path) in lines[0]
        for want in expectations(path):
            assert want in lines[0], (want, lines[0])
    assert dump_db(workdir / "db" / "mae_lab.db") == before
