"""Every shipped study validates, opens with the command that runs it, and mirrors a paper table."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA
from typer.testing import CliRunner

from cli import app

STUDIES = sorted((REPO / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_study_validates(path: Path, workdir: Path):
    text = path.read_text()
    verb = "search" if "\n[search]" in text else "run"  # a study with a [search] table opens with 'mae-lab search'
    assert text.startswith(f"# mae-lab {verb} studies/{path.name}")
    if "cifar10" in text and not (SHARED_DATA / "cifar10").exists():
        pytest.skip("the shared CIFAR-10 shards are not here")
    res = CliRunner().invoke(app, ["validate", str(path), "--data-root", str(SHARED_DATA)])
    assert res.exit_code == 0, res.output
    assert "ok (" in res.output


def test_all_paper_ablations_are_shipped():
    names = {p.stem for p in STUDIES}
    assert {"quickstart", "mask_ratio", "decoder_depth", "decoder_width", "mask_token", "recon_target",
            "augmentation", "mask_sampling"} <= names
