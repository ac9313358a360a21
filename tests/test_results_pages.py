"""The published CIFAR-10 pages (docs/results/) are exactly what `mae-lab report --from docs/results/trials.csv
--all` writes: every page, plot, summary and the trials files themselves, with no database."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli import app

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_committed_results_regenerate_byte_for_byte(tmp_path):
    out = tmp_path / "site"
    res = CliRunner().invoke(app, ["report", "--from", str(RESULTS / "trials.csv"), "--all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    committed, again = tree(RESULTS), tree(out)
    assert sorted(again) == sorted(committed)  # no page missing, none left over from an older release
    assert [name for name in committed if again[name] != committed[name]] == []
