"""Exit 2 only for anticipated bad input (mae_lab.errors.BadInput, one line); anything else is a bug: exit 1, its
traceback, and a line saying it is a bug (tests run the real commands through Typer's CliRunner)."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from mae_lab.errors import BadInput
from mae_lab.run import views
from mae_lab.store.engine import DbError
from mae_lab.study.spec import StudyError

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "studies" / "quickstart.toml")


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_every_error_of_bad_input_is_one_type():
    assert issubclass(StudyError, BadInput) and issubclass(DbError, BadInput)


@pytest.mark.parametrize("args", [["run", QUICKSTART, "--dry-run", "--device", "cpu", "--data", "nonsense"],
                                  ["run", QUICKSTART, "--dry-run", "--device", "tpu"],
                                  ["report", "--format", "docx", "--from", "no.csv"],
                                  ["report", "nosuch", "--from", str(ROOT / "docs" / "results" / "trials.csv")]])
def test_bad_input_is_one_line_and_exit_2(workdir, args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and len(lines(res.output)) == 1, res.output
    assert lines(res.output)[0].startswith("error: ") and "Traceback" not in res.output


@pytest.mark.parametrize("error", [ValueError, KeyError, AttributeError])
def test_an_unexpected_error_is_a_bug_with_its_traceback_and_exit_1(workdir, monkeypatch, error):
    """A programming error inside a command (here while planning a dry run) is not bad input, whatever its type."""
    def broken(*args, **kwargs):
        raise error("a slip in mae-lab's own code")

    monkeypatch.setattr(views, "plan", broken)
    res = CliRunner().invoke(app, ["run", QUICKSTART, "--dry-run", "--device", "cpu"])
    assert res.exit_code == 1, res.output
    assert "Traceback (most recent call last)" in res.output and "a slip in mae-lab's own code" in res.output
    assert lines(res.output)[-1].startswith(f"error: this is a bug in mae-lab, not in your input (an unexpected "
                                            f"{error.__name__}")
