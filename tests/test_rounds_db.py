"""Adaptive rounds over a hand-filled database: which points get another seed, computed by ``rounds.current_trials``
from results written as the runner writes them (top-1 as fractions in ``mae_results``; the rule reads points).

Mask ratio 0.75 is the default point. 0.5 is 40 points worse on every seed (a difference any rule detects); 0.9 is
within 3 points either way on 3 seeds, an interval far wider than the 1-point effect of interest, so it cannot be
decided yet: it gets seed 3, with the default (its pair), and 0.5 gets none. Read as fractions, 0.9's spread would be
0.03 "points" and look decided: the units mutation (``100.0 * value`` -> ``value``) fails this test."""
from __future__ import annotations

from pathlib import Path

from conftest import bound, study_toml

from mae_lab.store.engine import connect
from mae_lab.store.queue import claim_of, claim_trial
from mae_lab.store.reads import study_trials
from mae_lab.store.writes import finish_trial, sync_study
from mae_lab.study import planning, rounds

STUDY = study_toml("rounds", study={"seeds": {"min": 3, "max": 5, "until": "decided", "min_effect": 1.0}},
                   model={"preset": "vit_digits", "mask_ratio": 0.75},
                   pretrain={"epochs": 1, "batch_size": 256, "warmup_epochs": 0},
                   linear={"epochs": 1, "warmup_epochs": 0}, tail='[grid]\n"model.mask_ratio" = [0.75, 0.5, 0.9]\n')
LINEAR_TOP1 = {0.75: [0.500, 0.520, 0.510],  # the default
               0.5: [0.100, 0.121, 0.109],  # 40 +- 0.1 points worse: decided
               0.9: [0.530, 0.490, 0.510]}  # +3, -3, 0 points: undecided at a 1-point effect of interest


def test_the_undecided_point_and_the_default_get_the_next_seed(workdir: Path):
    (workdir / "rounds.toml").write_text(STUDY)
    study, planned = planning.plan("rounds.toml")
    trials = bound(planned)
    engine = connect("sqlite:///db/mae_lab.db")
    bind = lambda t: bound([t])[0]  # noqa: E731 - a new round's trials, bound as the first round's
    assert rounds.current_trials(engine, study, trials, bind=bind) == trials  # nothing recorded: the first round runs
    row = sync_study(engine, name="rounds", description="", paper=None, path="rounds.toml", spec_text=study.text,
                        spec_hash=planning.study_hash(study), trials=planning.trial_rows(study, trials))
    for t, _ in study_trials(engine, row.id):  # every trial of the first round done, with its hand-set result
        claimed = claim_trial(engine, t.id)
        top1 = LINEAR_TOP1[t.axes["model.mask_ratio"]][t.seed]
        finish_trial(engine, t.id, "done", result={"linear_top1": top1}, claim=claim_of(claimed))

    current = rounds.current_trials(engine, study, trials, bind=bind)
    fresh = sorted((t.axes["model.mask_ratio"], t.spec.seed) for t in current[len(trials):])
    assert fresh == [(0.75, 3), (0.9, 3)]
    assert current[:len(trials)] == trials
