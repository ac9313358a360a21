"""Property tests for study parsing and expansion (hypothesis)."""
from __future__ import annotations

import json
import math
from datetime import datetime

import pytest
from conftest import dump_db
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from cli import app
from mae_lab.study.expand import expand
from mae_lab.study.identity import RunContext, hashes
from mae_lab.study.spec import StudyError, TrialSpec, parse_study

AXES = {
    "model.mask_ratio": st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.75, 0.8, 0.9]),
    "model.decoder_depth": st.integers(1, 8),
    "eval.linear.epochs": st.integers(6, 100),  # above the default warmup of 5
    "data.augmentation": st.sampled_from(["none", "fixed_crop", "random_resized_crop", "rrc_color_jitter"]),
    "pretrain.base_lr": st.sampled_from([1e-4, 1.5e-4, 1e-3]),
}
EVAL_ONLY = {"eval.linear.epochs"}


def toml_value(v) -> str:
    return json.dumps(v)


@st.composite
def studies(draw):
    keys = draw(st.lists(st.sampled_from(sorted(AXES)), min_size=1, max_size=3, unique=True))
    grid = {k: draw(st.lists(AXES[k], min_size=1, max_size=3, unique=True)) for k in keys}
    seeds = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=3, unique=True))
    text = f'[study]\nname = "p"\nseeds = {seeds}\n[grid]\n'
    text += "".join(f'"{k}" = [{", ".join(toml_value(v) for v in vs)}]\n' for k, vs in grid.items())
    return text, grid, seeds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(studies())
def test_expansion_is_the_cartesian_product(case):
    text, grid, seeds = case
    trials = expand(parse_study(text, "p.toml"))
    assert len(trials) == math.prod(len(v) for v in grid.values()) * len(seeds)
    ctx = RunContext(fingerprint="f", precision="fp32")
    ids = [hashes(t.spec, ctx) for t in trials]
    assert len({h for h, _ in ids}) == len(trials)  # identities are distinct
    for t, (h, ph) in zip(trials, ids):
        for key, value in t.axes.items():
            node = t.spec
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value
        # the identity is a pure function of the resolved spec: a JSON round trip keeps it
        again = TrialSpec.model_validate_json(t.spec.model_dump_json())
        assert hashes(again, ctx) == (h, ph)
    # trials that differ only in evaluation settings share their pretraining
    by_pre = {}
    for t, (_, ph) in zip(trials, ids):
        pre_axes = tuple((k, v) for k, v in sorted(t.axes.items()) if k not in EVAL_ONLY) + (("seed", t.spec.seed),)
        by_pre.setdefault(pre_axes, set()).add(ph)
    assert all(len(h) == 1 for h in by_pre.values())
    assert len({next(iter(h)) for h in by_pre.values()}) == len(by_pre)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_either_parses_or_raises_a_study_error(text):
    try:
        parse_study(text, "fuzz.toml")
    except StudyError as exc:
        assert str(exc).startswith("fuzz.toml: ") and "\n" not in str(exc)  # one line


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "pretrain", "data", "eval", "grid", "study", "x"]),
                       st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=12),
                                       st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.booleans(),
                                                 st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3)),
                                       max_size=3), max_size=4))
def test_random_tables_raise_only_study_errors(tables):
    text = "".join(f"[{name}]\n" + "".join(f'"{k}" = {json.dumps(v)}\n' for k, v in body.items())
                   for name, body in tables.items())
    try:
        expand(parse_study(text, "r.toml"))
    except StudyError as exc:
        assert str(exc).startswith("r.toml: ") and "\n" not in str(exc)


# --- the CLI under random values: every TOML type in every field, only exit 0 or one line with exit 2 -------------

def _fields(model, prefix: str = "") -> list[str]:
    """Every dotted field of a schema (sub-models walked), e.g. 'eval.linear.warmup_epochs'."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


KEYS = _fields(TrialSpec) + ["study.name", "study.seeds", "study.description", "study.paper", "model.nope", "x.y"]
SCALARS = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**32, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e308, 1e-320]),
    st.booleans(), st.text(max_size=8), st.sampled_from(["", "digits", "none", "random", "pipe:true", "../x"]),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "epochs", "low", "type"]), inner, max_size=2)),
    max_leaves=4)


def toml(v) -> str:
    """A TOML literal for any value hypothesis draws (inline tables for dicts)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml(x)}" for k, x in v.items()) + " }"


def study_text(key: str, value, where: str) -> str:
    """A small valid study with `key` set to `value` in its base settings, as a grid axis or in a case."""
    tables = {"study": {"name": "p"}, "pretrain": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64},
              "eval": {"linear": {"epochs": 2, "warmup_epochs": 0}, "finetune": {"enabled": False}}}
    extra = ""
    if where == "base" or key.startswith("study."):
        node = tables
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    elif where == "grid":
        extra = f"[grid]\n{json.dumps(key)} = {toml(value)}\n"
    else:
        extra = f"[[cases]]\n{json.dumps(key)} = {toml(value)}\n"
    top = "".join(f"{json.dumps(k)} = {toml(v)}\n" for k, v in tables.items() if not isinstance(v, dict))
    text = "".join(f"[{name}]\n" + "".join(f"{json.dumps(k)} = {toml(v)}\n" for k, v in body.items())
                   for name, body in tables.items() if isinstance(body, dict))
    return top + text + extra


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES, where=st.sampled_from(["base", "grid", "case"]))
def test_random_values_give_exit_0_or_one_line_and_no_database_change(workdir, key, value, where):
    path = workdir / "p.toml"
    path.write_text(study_text(key, value, where))
    runner = CliRunner()
    db = workdir / "db" / "mae_lab.db"
    before = dump_db(db)
    for args in (["validate", str(path)], ["run", "--dry-run", str(path)]):
        res = runner.invoke(app, args)
        assert res.exit_code in (0, 2), (path.read_text(), res.output, res.exception)
        assert res.exception is None or isinstance(res.exception, SystemExit), (path.read_text(), res.exception)
        assert "Traceback" not in res.output
        if res.exit_code == 2:
            lines = [line for line in res.output.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), (path.read_text(), res.output)
            res = runner.invoke(app, ["run", str(path)])  # refused before anything is written
            assert res.exit_code == 2, (path.read_text(), res.output)
            assert dump_db(db) == before
