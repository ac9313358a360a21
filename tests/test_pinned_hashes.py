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

from mae_lab.study.identity import RunContext, hashes
from mae_lab.study.planning import binder, plan, resolve_data
from mae_lab.study.spec import StudyError

ROOT = Path(__file__).resolve().parent.parent
PINS = json.loads((ROOT / "tests" / "fixtures" / "study_hashes.json").read_text())


def digest(values: list[str]) -> str:
    return hashlib.sha256(" ".join(values).encode()).hexdigest()[:16]


def test_every_shipped_study_is_pinned():
    assert sorted(PINS) == sorted(p.stem for p in (ROOT / "studies").glob("*.toml"))


@pytest.mark.parametrize("name", sorted(PINS))
def test_a_studys_hashes_are_pinned(workdir, name):
    pin = PINS[name]
    study, trials = plan(ROOT / "studies" / f"{name}.toml", None, True)
    as_written = [hashes(t.spec, RunContext())[0] for t in trials]  # the spec alone (what expansion once recorded)
    assert (len(trials), digest(as_written)) == (pin["n"], pin["expand"])
    try:
        infos = resolve_data(study, trials, SHARED_DATA, False)
    except StudyError as exc:  # CIFAR-10 shards are not everywhere (resolve_data names the key); the digits are
        pytest.skip(f"{name}: its data is not here ({exc})")
    bind = binder(infos, "cpu", 1)
    assert digest([bind(t).hash for t in trials]) == pin["dry_run"]
