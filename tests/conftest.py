"""Shared fixtures: an isolated working folder per test, and one packed copy of the embedded digits."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """A cache folder holding the packed digits, shared by the whole session."""
    from mae_lab.data import resolve_dataset

    cache = tmp_path_factory.mktemp("cache")
    resolve_dataset("digits", cache_dir=cache)
    return cache


@pytest.fixture
def workdir(tmp_path, monkeypatch, digits_cache) -> Path:
    """Run in a fresh folder with its own database and artifacts, the shared digits cache, no stray env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAE_LAB_CACHE", str(digits_cache))
    for var in ("MAE_LAB_DB", "MAE_LAB_DATA", "MAE_LAB_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def dump_db(path: Path) -> list[str]:
    """Every row of a SQLite file, as SQL text (compares contents regardless of WAL files)."""
    if not path.exists():
        return []
    with sqlite3.connect(path) as c:
        return list(c.iterdump())
