"""Adaptive seeds: next_round on synthetic per-seed results whose effects are known, and the seeds table's errors."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import study_toml

from mae_lab.study.adaptive import decide, decision_level, is_decided, next_round, point_decisions
from mae_lab.study.spec import StudyError, parse_study
from mae_lab.study.tables import SeedPlan

PLAN = SeedPlan(min=2, max=8, min_effect=1.0)


def simulate(effects: dict[str, float], plan: SeedPlan, noise: float, seed: int = 0
             ) -> tuple[dict[str, list[int]], dict, int]:
    """Run rounds to the end on a synthetic study: top-1 of point p, seed s = 70 + effect[p] + u_s + e_{p,s}, where
    u_s (sd 3) is the seed's effect shared by every arm (common random numbers) and e (sd ``noise``) is not."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 3, 64)
    own = {p: rng.normal(0, noise, 64) for p in effects}

    def value(p: str, s: int) -> float:
        return 70 + effects[p] + shared[s] + own[p][s]

    seeds = {p: list(range(plan.min)) for p in effects}
    rounds = 0
    while True:
        values = {p: {"linear": {s: value(p, s) for s in ss}} for p, ss in seeds.items()}
        new = next_round(plan, seeds, values, "default")
        if new == seeds:
            return seeds, values, rounds
        assert all(set(seeds[p]) <= set(new[p]) for p in seeds)
        seeds, rounds = new, rounds + 1


def test_a_known_effect_is_decided_and_the_rounds_stop():
    effects = {"default": 0.0, "big": 4.0, "none": 0.0, "tiny": 0.3}
    seeds, values, rounds = simulate(effects, PLAN, noise=0.5)
    decisions = {p: point_decisions(PLAN, values[p], values["default"]) for p in effects if p != "default"}
    big = decisions["big"][0]
    assert big.decided and big.why == "excludes 0" and big.interval.low > 0  # the right direction
    assert len(seeds["big"]) == 2  # the seed's shared effect cancels in the pairs: two seeds suffice
    for p in ("none", "tiny"):  # no effect of interest: the interval shrinks inside +-min_effect, then it stops
        d = decisions[p][0]
        assert d.decided and d.why == "within ±min_effect" and d.interval.largest_bound <= 1.0
        assert 2 < len(seeds[p]) <= PLAN.max
    # the default holds every seed any point was given, so each pair shares its seed
    assert seeds["default"] == sorted(set().union(*seeds.values()))
    assert 0 < rounds <= PLAN.max - PLAN.min
    assert all(s == list(range(len(s))) for s in seeds.values())


def test_an_undecidable_point_stops_at_max():
    effects = {"default": 0.0, "noisy": 0.5}
    plan = SeedPlan(min=2, max=5, min_effect=0.2)
    seeds, values, _ = simulate(effects, plan, noise=3.0, seed=1)
    assert len(seeds["noisy"]) == 5 and seeds["default"] == [0, 1, 2, 3, 4]
    assert not is_decided(point_decisions(plan, values["noisy"], values["default"]))


def test_missing_results_no_default_and_the_first_round():
    plan = SeedPlan(min=3, max=6, min_effect=1.0)
    assert next_round(plan, {"d": [], "p": [0]}, {}, "d") == {"d": [0, 1, 2], "p": [0, 1, 2]}
    undecided = {"p": {"linear": {0: 70.0, 1: 75.0, 2: 68.0}}, "d": {"linear": {0: 70.0, 1: 70.0, 2: 70.0}}}
    assert next_round(plan, {"d": [0, 1, 2], "p": [0, 1, 2]}, undecided, "d") == {"d": [0, 1, 2, 3],
                                                                                  "p": [0, 1, 2, 3]}
    waiting = {"p": {"linear": {0: 70.0, 1: 75.0}}, "d": undecided["d"]}  # seed 2 of p failed or still runs
    assert next_round(plan, {"d": [0, 1, 2], "p": [0, 1, 2]}, waiting, "d") == {"d": [0, 1, 2], "p": [0, 1, 2]}
    assert next_round(plan, {"q": [0, 1, 2], "p": [0, 1, 2]}, undecided, None) == {"q": [0, 1, 2], "p": [0, 1, 2]}
    # a metric the study does not evaluate does not hold a point back; one it does must be decided too
    both = SeedPlan(min=2, max=4, min_effect=1.0, metrics=["linear", "finetune"])
    lin_only = {"p": {"linear": {0: 75.0, 1: 76.0}}, "d": {"linear": {0: 70.0, 1: 70.9}}}
    assert next_round(both, {"d": [0, 1], "p": [0, 1]}, lin_only, "d") == {"d": [0, 1], "p": [0, 1]}
    with_ft = {"p": {**lin_only["p"], "finetune": {0: 80.0, 1: 84.0}}, "d": {**lin_only["d"],
                                                                              "finetune": {0: 82.0, 1: 82.0}}}
    assert next_round(both, {"d": [0, 1], "p": [0, 1]}, with_ft, "d") == {"d": [0, 1, 2], "p": [0, 1, 2]}


def test_decide_names_its_reason():
    assert decide({0: 72.0, 1: 73.0}, {0: 70.0, 1: 71.2}, 1.0).why == "excludes 0"
    assert decide({0: 70.0}, {0: 70.0}, 1.0).why == "no interval"
    assert decide({0: 70.1, 1: 69.9, 2: 70.0}, {0: 70.0, 1: 70.0, 2: 70.0}, 1.0).why == "within ±min_effect"
    assert decide({0: 73.0, 1: 67.0}, {0: 70.0, 1: 70.0}, 1.0).why == "undecided"


STUDY = '[study]\nname = "s"\nseeds = {}\n'


@pytest.mark.parametrize("table, key, words", [
    ("{ min = 5, max = 3, min_effect = 1.0 }", "study.seeds.max", "below min 5"),
    ("{ min = 2, max = 40, min_effect = 1.0 }", "study.seeds.max", "32"),
    ('{ until = "forever", min_effect = 1.0 }', "study.seeds.until", "decided"),
    ("{ min = 2, max = 8 }", "study.seeds.min_effect", "missing"),
    ("{ min = 1, min_effect = 1.0 }", "study.seeds.min", "2"),
    ("{ min = 2, min_effect = 0 }", "study.seeds.min_effect", "0"),
    ("{ mn = 2, min_effect = 1.0 }", "study.seeds.mn", "unknown key"),
])
def test_a_bad_seeds_table_names_its_key(table, key, words):
    with pytest.raises(StudyError) as exc:
        parse_study(STUDY.format(table), "bad.toml")
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"bad.toml: {key}: ") and words in line


@pytest.mark.parametrize("alpha, words", [("0.5", "outside (0, 0.5)"), ("0", "outside (0, 0.5)"),
                                          ("-0.1", "outside (0, 0.5)"), ('"5%"', "a number")])
def test_a_bad_alpha_names_its_key(alpha, words):
    with pytest.raises(StudyError) as exc:
        parse_study(STUDY.format("[0, 1]") + f"alpha = {alpha}\n", "bad.toml")
    line = str(exc.value)
    assert "\n" not in line and line.startswith("bad.toml: study.alpha: ") and words in line


def test_alpha_sets_the_decision_level():
    s = parse_study(STUDY.format("{ min = 2, max = 6, min_effect = 1.0 }") + "alpha = 0.1\n", "ok.toml")
    assert s.study.alpha == 0.1 and decision_level(s.study.adaptive, s.study.alpha) == pytest.approx(0.98)
    s = parse_study(STUDY.format("[0, 1]"), "ok.toml")
    assert s.study.alpha == 0.05 and decision_level(None, s.study.alpha) == pytest.approx(0.95)


def test_a_bad_seeds_table_ends_the_run_with_exit_2_and_leaves_the_database_alone(workdir):
    from conftest import dump_db
    from typer.testing import CliRunner

    from cli import app
    from mae_lab.store.engine import connect

    connect("sqlite:///db/mae_lab.db")  # an existing database
    before = dump_db(workdir / "db" / "mae_lab.db")
    for table, key in (("{ min = 4, max = 3, min_effect = 1.0 }", "study.seeds.max"),
                       ("{ max = 33, min_effect = 1.0 }", "study.seeds.max"),
                       ('{ until = "tired", min_effect = 1.0 }', "study.seeds.until"),
                       ("{ min_effect = -1.0 }", "study.seeds.min_effect"),
                       ("{ min_effect = 1.0 }\nalpha = 0.7", "study.alpha")):
        (workdir / "bad.toml").write_text(STUDY.format(table))
        res = CliRunner().invoke(app, ["run", "bad.toml", "--device", "cpu"])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and f"bad.toml: {key}: " in res.output, res.output
        assert dump_db(workdir / "db" / "mae_lab.db") == before


def test_a_seeds_table_and_a_list_both_parse():
    s = parse_study(STUDY.format('{ min = 3, max = 6, until = "decided", min_effect = 0.5 }'), "ok.toml")
    assert s.study.seeds == [0, 1, 2] and s.study.adaptive == SeedPlan(min=3, max=6, min_effect=0.5)
    s = parse_study(STUDY.format("[4, 7]"), "ok.toml")
    assert s.study.seeds == [4, 7] and s.study.adaptive is None


ADAPTIVE = study_toml("adaptive", study={"seeds": {"min": 2, "max": 3, "until": "decided", "min_effect": 0.001}},
                      pretrain={"epochs": 1, "batch_size": 256, "warmup_epochs": 0},
                      linear={"epochs": 1, "warmup_epochs": 0}, tail='[grid]\n"model.mask_ratio" = [0.5, 0.75]\n')


def test_a_real_adaptive_study_runs_round_after_round_and_resumes(workdir):
    from mae_lab.run.runner import run_study
    from mae_lab.store.engine import connect
    from mae_lab.store.reads import get_study, study_trials

    (workdir / "adaptive.toml").write_text(ADAPTIVE)
    first = run_study("adaptive.toml", device="cpu", max_trials=5)  # stopped inside the second round
    assert first.ok and len(first.ran) == 5
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    study = get_study(engine, "adaptive")

    def seeds() -> dict[float, list[int]]:
        out: dict[float, list[int]] = {}
        for t, _ in study_trials(engine, study.id):
            out.setdefault(t.axes["model.mask_ratio"], []).append(t.seed)
        return {k: sorted(v) for k, v in out.items()}

    # an effect of interest of 0.001 points cannot be ruled out by 2 seeds: both points get seed 2
    assert seeds() == {0.5: [0, 1, 2], 0.75: [0, 1, 2]}
    second = run_study("adaptive.toml", device="cpu")  # the rerun recomputes the round from the database
    assert second.ok and len(second.ran) == 1 and second.skipped == 5
    assert seeds() == {0.5: [0, 1, 2], 0.75: [0, 1, 2]}  # max = 3: no fourth seed
    assert all(t.status == "done" for t, _ in study_trials(engine, study.id))
    third = run_study("adaptive.toml", device="cpu")
    assert third.ran == [] and third.skipped == 6
    # the report shows n and whether each point is decided, from the same decision rule
    from mae_lab.report.formats import render_text
    from mae_lab.report.study_report import summarize

    rep = summarize(engine, "adaptive")
    other = next(r for r in rep.rows if not r.is_default)
    assert [r.n for r in rep.rows] == [3, 3] and other.decided is not None
    assert other.decided == (other.decisions[0].why == "excludes 0")  # 0.001 points cannot be ruled out
    from mae_lab.report.site import run_state

    assert ("1 decided, 0 undecided at" if other.decided else "0 decided, 1 undecided at") in run_state([rep])
    assert run_state([rep]).endswith("The run is complete.")
    md = render_text(rep, "md")
    assert "| n | decided |" in md and "adaptive seeds: 2 to 3 per point" in md


def test_rounds_1_runs_one_round_per_call(workdir):
    """What `make results` does breadth-first: each `run --rounds 1` adds the next round the results call for."""
    from typer.testing import CliRunner

    from cli import app
    from mae_lab.store.engine import connect
    from mae_lab.store.reads import get_study, study_trials

    (workdir / "adaptive.toml").write_text(ADAPTIVE)

    def run_once() -> list[int]:
        res = CliRunner().invoke(app, ["run", "adaptive.toml", "--device", "cpu", "--rounds", "1"])
        assert res.exit_code == 0, res.output
        engine = connect("sqlite:///db/mae_lab.db", create=False)
        trials = study_trials(engine, get_study(engine, "adaptive").id)
        assert all(t.status == "done" for t, _ in trials)
        return sorted(t.seed for t, _ in trials)

    assert run_once() == [0, 0, 1, 1]  # the first round only: min = 2 seeds per point
    from mae_lab.report.site import run_state
    from mae_lab.report.study_report import summarize

    state = run_state([summarize(connect("sqlite:///db/mae_lab.db", create=False), "adaptive")])
    assert "1 points compared with their study's default: 0 decided, 0 undecided at their maximum" in state
    assert "1 undecided with seeds still due. The run is in progress" in state
    assert run_once() == [0, 0, 1, 1, 2, 2]  # 0.001 points cannot be ruled out: each point's seed 2
    assert run_once() == [0, 0, 1, 1, 2, 2]  # max = 3: nothing more


def test_a_search_refuses_adaptive_seeds():
    text = STUDY.format("{ min = 2, min_effect = 1.0 }") + '[search.space]\n"model.mask_ratio" = ' \
        '{ type = "float", low = 0.5, high = 0.9 }\n'
    with pytest.raises(StudyError) as exc:
        parse_study(text, "s.toml")
    assert str(exc.value).startswith("s.toml: study.seeds: adaptive seeds are for grid studies")
