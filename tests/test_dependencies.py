"""Declared dependencies equal imported ones: every third-party module that mae_lab/ or cli.py imports (at the top
or inside a function) is declared in pyproject.toml - in [project.dependencies], or in the extra of the optional
feature that imports it - and every declared dependency is imported, save the few another package loads for us."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIST = {"PIL": "pillow", "sklearn": "scikit-learn", "mlflow": "mlflow-skinny"}  # import name -> distribution
# distribution -> the extra that declares it
OPTIONAL = {"tensorboard": "tensorboard", "mlflow-skinny": "mlflow", "ray": "ray"}
INDIRECT = {"cmaes": "optuna's CmaEsSampler imports it (search.sampler = 'cmaes')"}


def name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported(paths: list[Path]) -> set[str]:
    """The distributions of the third-party modules these files import."""
    mods: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                mods.add(node.module.split(".")[0])
    third = {m for m in mods if m not in sys.stdlib_module_names and m not in ("mae_lab", "cli", "__future__")}
    return {MODULE_DIST.get(m, m).lower().replace("_", "-") for m in third}


def declared(pyproject: dict) -> tuple[set[str], dict[str, set[str]]]:
    project = pyproject["project"]
    extras = {k: {name(r) for r in v} for k, v in project.get("optional-dependencies", {}).items()}
    return {name(r) for r in project["dependencies"]}, extras


def problems(uses: set[str], base: set[str], extras: dict[str, set[str]]) -> list[str]:
    out = [f"{d} is imported but not declared" + (f" in [{OPTIONAL[d]}]" if d in OPTIONAL else "")
           for d in sorted(uses) if d not in base and d not in extras.get(OPTIONAL.get(d, ""), set())]
    out += [f"{d} is declared but never imported" for d in sorted(base - uses) if d not in INDIRECT]
    return out


def test_declared_dependencies_are_the_imported_ones():
    uses = imported([*(ROOT / "mae_lab").rglob("*.py"), ROOT / "cli.py"])
    base, extras = declared(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8")))
    assert problems(uses, base, extras) == []


def test_the_check_finds_both_kinds_of_mismatch():
    base, extras = {"torch", "cmaes", "scipy"}, {"mlflow": {"mlflow-skinny"}}
    assert problems({"torch", "scipy", "mlflow-skinny"}, base, extras) == []
    assert problems({"torch", "safetensors", "tensorboard"}, base, extras) == [
        "safetensors is imported but not declared", "tensorboard is imported but not declared in [tensorboard]",
        "scipy is declared but never imported"]
