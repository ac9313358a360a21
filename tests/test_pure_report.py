"""A report is a function of its records: the default point (and with it every difference and verdict) comes from the
recorded study text and specs, never from files the study named. Moving the ``pretrain.init`` file away after the
trials were recorded leaves every page, and ``report --from trials.csv``, byte for byte as it was."""
from __future__ import annotations

from pathlib import Path

from conftest import bound
from typer.testing import CliRunner

from cli import app
from mae_lab.store.engine import connect
from mae_lab.store.reads import study_trials
from mae_lab.store.writes import finish_trial, sync_study
from mae_lab.study.expand import expand
from mae_lab.study.planning import trial_rows
from mae_lab.study.spec import parse_study

STUDY = """# mae-lab run init.toml
[study]
name = "init"
seeds = [0, 1]

[model]
preset = "vit_digits"

[pretrain]
init = "{init}"

[grid]
"model.mask_ratio" = [0.5, 0.75]
"""


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pages(url: str, out: Path, source: Path | None = None) -> dict[str, bytes]:
    args = ["report", "--all", "--out", str(out)] + (["--from", str(source)] if source else ["--db", url])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return {k: v for k, v in tree(out).items() if not k.endswith(".png")}  # plots: the pixels of the same numbers


def test_the_pages_do_not_read_the_init_file(tmp_path):
    init = tmp_path / "weights.pth"
    init.write_bytes(b"weights: only their sha256 enters the trials' identity")
    text = STUDY.format(init=init)
    study = parse_study(text, "init.toml")
    url = f"sqlite:///{tmp_path}/pure.db"
    engine = connect(url)
    row = sync_study(engine, name="init", description="", paper=None, path="init.toml", spec_text=text,
                     spec_hash="x", trials=trial_rows(study, bound(expand(study))))
    for i, (trial, _) in enumerate(study_trials(engine, row.id)):
        finish_trial(engine, trial.id, "done", result={"linear_top1": 0.5 + 0.01 * i, "pretrain_wall_s": 1.0})
    before = pages(url, tmp_path / "before")
    page = before["init.md"].decode()
    assert "| **0.75** (default) |" in page and "| 0.5 | 50.5 ± 0.7 (n=2) | -2.0 [-5.0, +1.0]" in page  # Δ to it
    init.rename(tmp_path / "moved.pth")
    assert pages(url, tmp_path / "after") == before
    assert pages(url, tmp_path / "from_csv", tmp_path / "before" / "trials.csv") == before
