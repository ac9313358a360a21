"""`mae-lab search`: an Optuna study in the same database, trials run by the same runner, nothing trained twice."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import bound, study_toml
from sqlmodel import Session, select
from typer.testing import CliRunner

from cli import app
from mae_lab.store.engine import artifacts_dir, connect
from mae_lab.store.queue import claim_next
from mae_lab.store.reads import get_study, study_trials, trial_details
from mae_lab.store.tables import MetricRow, ResultRow, TrialRow
from mae_lab.store.writes import sync_study


def tiny(name: str, *, epochs: int = 2, **kw) -> str:
    """The tiny study these tests search over (``epochs`` of pretraining, a kNN probe every epoch)."""
    return study_toml(name, pretrain={"epochs": epochs, "batch_size": 128, "probe_every": 1},
                      linear={"epochs": 2, "warmup_epochs": 1}, **kw)


SEARCH = tiny("tiny_search", comment="mae-lab search tiny_search.toml",
              search={"n_trials": 6, "sampler": "tpe", "pruner": "median"},
              space={"model.mask_ratio": {"type": "float", "low": 0.4, "high": 0.9},
                     "pretrain.base_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})

runner = CliRunner()
URL = "sqlite:///db/mae_lab.db"


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def rows(engine, model):
    with Session(engine) as s:
        return s.exec(select(model)).all()


def optuna_trials(name: str, url: str = URL) -> list[optuna.trial.FrozenTrial]:
    from mae_lab.run.search import storage

    return optuna.load_study(study_name=name, storage=storage(url)).get_trials()


def test_search_records_trials_and_a_rerun_trains_nothing(workdir: Path):
    (workdir / "s.toml").write_text(SEARCH)
    res = invoke("search", "s.toml", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "6 of 6 trials in the study" in res.output and "best #" in res.output

    trials = optuna_trials("tiny_search")
    assert len(trials) == 6
    states = {t.number: t.state for t in trials}
    assert set(states.values()) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    engine = connect(URL)
    trial_rows = rows(engine, TrialRow)
    assert len(trial_rows) == 6 and len(rows(engine, ResultRow)) == 6
    assert sorted(r.optuna_trial for r in trial_rows) == list(range(6))
    for r in trial_rows:  # each row is its Optuna trial: status, params and objective agree
        t = trials[r.optuna_trial]
        assert r.status == ("pruned" if states[r.optuna_trial] == optuna.trial.TrialState.PRUNED else "done")
        assert json.loads(r.axes_json) == {"model.mask_ratio": t.params["model.mask_ratio"],
                                           "pretrain.base_lr": t.params["pretrain.base_lr"]}
        assert t.user_attrs["trial_ids"] == [r.id]
        if r.status == "done":
            assert t.value == pytest.approx(trial_details(engine, r.id)[1].linear_top1)
        assert t.intermediate_values  # the kNN top-1 reported every epoch (probe_every = 1)
    metrics_before = len(rows(engine, MetricRow))

    res = invoke("search", "s.toml", "--trials", "6", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "0 asked" in res.output and "0 trained" in res.output
    assert len(optuna_trials("tiny_search")) == 6
    assert len(rows(engine, ResultRow)) == 6 and len(rows(engine, MetricRow)) == metrics_before

    # the report: the usual table plus best trials and parameter importances
    res = invoke("report", "tiny_search")
    assert res.exit_code == 0, res.output
    assert "best trials" in res.output and "importance" in res.output
    res = invoke("list")
    assert "tiny_search" in res.output


def test_a_pruned_trial_keeps_what_it_measured(workdir: Path):
    """The runner side of pruning: the callback stops pretraining, the row is 'pruned' with its kNN and loss."""
    from mae_lab.data import resolve_dataset
    from mae_lab.run.progress import PlainDisplay
    from mae_lab.run.runner import Pruned, run_trial
    from mae_lab.study.planning import plan, trial_rows

    (workdir / "g.toml").write_text(tiny("g", epochs=3))
    study, trials = plan("g.toml")
    engine = connect(URL)
    srow = sync_study(engine, name="g", description="", paper=None, path="g.toml", spec_text=study.text,
                         spec_hash="h", trials=trial_rows(study, bound(trials)))
    claimed = claim_next(engine, srow.id)
    seen = []

    def prune(m):
        seen.append(m["epoch"])
        if m["epoch"] == 2:
            raise Pruned(2, "pruned at epoch 2")

    status = run_trial(engine, claimed, resolve_dataset("digits"), device="cpu", artifacts=workdir / "art",
                       display=PlainDisplay(), on_pretrain_metrics=prune)
    assert status == "pruned" and seen == [1, 2]
    trial, result = study_trials(engine, srow.id)[0]
    assert trial.status == "pruned" and "epoch 2" in trial.error
    assert result.knn_top1 is not None and result.pretrain_loss is not None and result.linear_top1 is None
    assert claim_next(engine, srow.id) is None  # a pruned trial is final


GRID = tiny("grid", comment="mae-lab run grid.toml", tail="""[grid]
"model.mask_ratio" = [0.5, 0.75]
""")

GRID_SEARCH = tiny("gs", comment="mae-lab search gs.toml", search={"n_trials": 3, "sampler": "grid"},
                   space={"model.mask_ratio": {"type": "categorical", "choices": [0.5, 0.75, 0.6]}})


def test_done_trials_are_prior_observations_and_not_trained_again(workdir: Path):
    (workdir / "grid.toml").write_text(GRID)
    (workdir / "gs.toml").write_text(GRID_SEARCH)
    assert invoke("run", "grid.toml", "--device", "cpu").exit_code == 0
    res = invoke("search", "gs.toml", "--device", "cpu")
    assert res.exit_code == 0, res.output
    # the two grid points were told to Optuna first; the grid sampler asked all three points: two were reused
    assert "2 prior observations" in res.output and "1 trained, 2 reused" in res.output, res.output
    trials = optuna_trials("gs")
    priors = [t for t in trials if "prior" in t.user_attrs]
    assert sorted(t.params["model.mask_ratio"] for t in priors) == [0.5, 0.75]
    engine = connect(URL)
    gs = get_study(engine, "gs")
    searched = study_trials(engine, gs.id)
    assert len(searched) == 3 and all(t.status == "done" for t, _ in searched)
    copies = [r for _, r in searched if r.result_copied]
    assert len(copies) == 2 and all(r.pretrain_reused for r in copies)  # the grid study's results: nothing ran
    assert len(list((artifacts_dir(URL) / "pretrain").glob("*.pt"))) == 3  # 2 for the grid, 1 for the search


def test_run_refuses_a_search_study_and_search_refuses_a_grid(workdir: Path):
    (workdir / "s.toml").write_text(SEARCH)
    (workdir / "grid.toml").write_text(GRID)
    res = invoke("run", "s.toml")
    assert res.exit_code == 2 and "s.toml: search: this study is a search" in res.output
    res = invoke("search", "grid.toml")
    assert res.exit_code == 2 and "grid.toml: search: the study has no [search] table" in res.output
    bad = Path(__file__).parent / "bad_studies" / "search_bound_invalid.toml"
    res = invoke("search", str(bad))
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "search.space.model.mask_ratio.high" in lines[0]


def test_report_shows_the_pareto_front_of_two_objectives(workdir: Path):
    """Report side only: a two-objective Optuna study told by hand (no training) in the study's database."""
    from optuna.distributions import FloatDistribution

    from mae_lab.run.search import storage

    text = SEARCH.replace('pruner = "median"', 'objectives = ["linear", "finetune"]').replace(
        "finetune = { enabled = false }", "finetune = { epochs = 1, warmup_epochs = 0 }")
    engine = connect(URL)
    sync_study(engine, name="tiny_search", description="", paper=None, path="s.toml", spec_text=text,
                  spec_hash="h", trials=[], deactivate_missing=False)
    study = optuna.create_study(study_name="tiny_search", storage=storage(URL), directions=["maximize"] * 2)
    dists = {"model.mask_ratio": FloatDistribution(0.4, 0.9), "pretrain.base_lr": FloatDistribution(1e-4, 1e-2,
                                                                                                     log=True)}
    for ratio, lr, values in ((0.5, 1e-3, [0.30, 0.50]), (0.75, 2e-3, [0.40, 0.45]), (0.6, 1e-4, [0.20, 0.40]),
                              (0.8, 5e-3, [0.35, 0.30])):
        study.add_trial(optuna.trial.create_trial(params={"model.mask_ratio": ratio, "pretrain.base_lr": lr},
                                                  distributions=dists, values=values))
    res = invoke("report", "tiny_search")
    assert res.exit_code == 0, res.output
    assert "Pareto front" in res.output and "importance" in res.output
    front = [line for line in res.output.splitlines() if line.startswith("│ #")]
    assert [line.split()[1] for line in front] == ["#1", "#0"]  # #2 and #3 are dominated
    res = invoke("report", "tiny_search", "--format", "json")
    got = json.loads(res.output)["search"]
    assert got["pareto"] and [b["number"] for b in got["best"]] == [1, 0]
    assert set(got["importances"]) == {"linear", "finetune"}
