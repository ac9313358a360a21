"""The trial hashes of every shipped study are pinned (tests/fixtures/study_hashes.json, computed at a89d2d5 before
the third pass over the house; long_pretrain, added after it, at 47afc0f): expanding a study, and the hashes a dry
run prints (bound to the data, one process, the CPU), give the same trials whatever is refactored around them. A
changed study file or a changed identity shows here first: update the pins only when the numbers should change."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from mae_lab.data import DataError
from mae_lab.study.planning import bind_trials, plan, resolve_data

ROOT = Path(__file__).resolve().parent.parent
PINS = json.loads((ROOT / "tests" / "fixtures" / "study_hashes.json").read_text())


def digest(trials) -> str:  # noqa: ANN001
    return hashlib.sha256(" ".join(t.hash for t in trials).encode()).hexdigest()[:16]


def test_every_shipped_study_is_pinned():
    assert sorted(PINS) == sorted(p.stem for p in (ROOT / "studies").glob("*.toml"))


@pytest.mark.parametrize("name", sorted(PINS))
def test_a_studys_hashes_are_pinned(workdir, name):
    pin = PINS[name]
    study, trials = plan(ROOT / "studies" / f"{name}.toml", None, True)
    assert (len(trials), digest(trials)) == (pin["n"], pin["expand"])
    try:
        infos = resolve_data(study, trials, SHARED_DATA, False)
    except DataError as exc:  # CIFAR-10 shards are not everywhere; the digits are
        pytest.skip(f"{name}: its data is not here ({exc})")
    assert digest(bind_trials(trials, infos=infos, device="cpu", world_size=1)) == pin["dry_run"]
