"""Property tests for study parsing and expansion (hypothesis)."""
from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mae_lab.expand import expand
from mae_lab.spec import StudyError, TrialSpec, parse_study

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
    assert len({t.hash for t in trials}) == len(trials)  # identities are distinct
    for t in trials:
        for key, value in t.axes.items():
            node = t.spec
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value
        # the identity is a pure function of the resolved spec: a JSON round trip keeps it
        again = TrialSpec.model_validate_json(t.spec.model_dump_json())
        from mae_lab.expand import trial_hash
        assert trial_hash(again) == t.hash
    # trials that differ only in evaluation settings share their pretraining
    by_pre = {}
    for t in trials:
        pre_axes = tuple((k, v) for k, v in sorted(t.axes.items()) if k not in EVAL_ONLY) + (("seed", t.spec.seed),)
        by_pre.setdefault(pre_axes, set()).add(t.pretrain_hash)
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
