"""The main job through Typer's CliRunner and a real SQLite file: dry run, run, skip, rerun, report."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from sqlmodel import Session, select
from typer.testing import CliRunner

from cli import app
from mae_lab.store.engine import connect
from mae_lab.store.reads import get_result, get_study, study_trials, trial_details
from mae_lab.store.records import from_db
from mae_lab.store.tables import ArtifactRow, MetricRow, ResultRow, TrialRow

STUDY = """# mae-lab run tiny.toml
[study]
name = "tiny"
paper = "fig5"
seeds = [0, 1]

[model]
preset = "vit_digits"
mask_ratio = 0.75

[pretrain]
epochs = 2
batch_size = 128

[eval]
linear = { epochs = 2, warmup_epochs = 1 }
finetune = { epochs = 1, batch_size = 128, warmup_epochs = 0 }

[grid]
"model.mask_ratio" = [0.5, 0.75]
"""

runner = CliRunner()


def invoke(*args: str):
    res = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return res


def rows(engine, model):
    with Session(engine) as s:
        return s.exec(select(model)).all()


def test_dry_run_lists_trials_and_writes_nothing(workdir: Path):
    (workdir / "tiny.toml").write_text(STUDY)
    res = invoke("run", "tiny.toml", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "4 trials" in res.output
    assert res.output.count("pending") == 4
    assert "mask_ratio=0.5" in res.output and "mask_ratio=0.75" in res.output
    assert not (workdir / "db" / "mae_lab.db").exists()


def test_run_records_skips_reruns_and_reports(workdir: Path):
    (workdir / "tiny.toml").write_text(STUDY)
    res = invoke("run", "tiny.toml")
    assert res.exit_code == 0, res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    trials = rows(engine, TrialRow)
    assert [t.status for t in trials] == ["done"] * 4
    assert all(t.git_commit is None or len(t.git_commit) == 40 for t in trials)
    assert {t.torch_version for t in trials} == {torch.__version__} and all(t.device == "cpu" for t in trials)
    results = rows(engine, ResultRow)
    assert len(results) == 4
    assert all(0.0 <= r.linear_top1 <= 1.0 and 0.0 <= r.finetune_top1 <= 1.0 for r in results)
    metrics = rows(engine, MetricRow)
    pre = [(m.trial_id, m.epoch) for m in metrics if m.stage == "pretrain" and m.name == "loss"]
    assert sorted(pre) == sorted((t.id, e) for t in trials for e in (1, 2))
    arts = rows(engine, ArtifactRow)
    assert len(arts) == 8 and {a.kind for a in arts} == {"checkpoint", "recon"}
    assert all(Path(a.path).exists() for a in arts)

    # a second run does nothing
    res = invoke("run", "tiny.toml")
    assert res.exit_code == 0, res.output
    assert "4 already done" in res.output
    assert [t.ended_at for t in rows(engine, TrialRow)] == [t.ended_at for t in trials]
    assert len(rows(engine, MetricRow)) == len(metrics)

    # the dry run now shows them done
    res = invoke("run", "tiny.toml", "--dry-run")
    assert res.output.count("done") == 4

    # report: mean and std over seeds match the recorded values
    res = invoke("report", "tiny")
    assert res.exit_code == 0, res.output
    by_trial = {r.trial_id: r for r in results}
    for ratio in (0.5, 0.75):
        vals = [by_trial[t.id].linear_top1 for t in trials if json.loads(t.axes_json)["model.mask_ratio"] == ratio]
        cell = f"{100 * statistics.fmean(vals):.1f} ± {100 * statistics.stdev(vals):.1f} (n=2)"
        assert cell in res.output, (cell, res.output)
    assert "(default)" in res.output  # 0.75 is the study's base value

    res = invoke("list")
    assert "tiny" in res.output
    res = invoke("show", trials[0].hash[:10])
    assert res.exit_code == 0 and trials[0].hash in res.output

    # --rerun runs every trial again, replacing (not duplicating) its rows
    res = invoke("run", "tiny.toml", "--rerun", "--max-trials", "1")
    assert res.exit_code == 0, res.output
    again = rows(engine, TrialRow)
    assert sum(t.status == "done" for t in again) == 1 and sum(t.status == "pending" for t in again) == 3
    res = invoke("run", "tiny.toml")
    assert res.exit_code == 0
    assert len(rows(engine, ResultRow)) == 4
    assert len(rows(engine, MetricRow)) == len(metrics)
    # trials that differ only in evaluation share the pretraining: same seeds -> same results on CPU
    new = {r.trial_id: r for r in rows(engine, ResultRow)}
    for t in trials:
        assert abs(new[t.id].linear_top1 - by_trial[t.id].linear_top1) < 1e-9


def test_eval_only_axis_pretrains_once(workdir: Path):
    text = STUDY.replace('[grid]\n"model.mask_ratio" = [0.5, 0.75]', '[grid]\n"eval.finetune.last_k_blocks" = [0, 1]')
    text = text.replace("seeds = [0, 1]", "seeds = [0]")
    (workdir / "evalonly.toml").write_text(text)
    res = invoke("run", "evalonly.toml")
    assert res.exit_code == 0, res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    trials = rows(engine, TrialRow)
    assert len(trials) == 2 and len({t.pretrain_hash for t in trials}) == 1
    results = rows(engine, ResultRow)
    assert sorted(r.pretrain_reused for r in results) == [False, True]
    assert len(list((workdir / "db" / "artifacts" / "pretrain").glob("*.pt"))) == 1


def test_a_trial_done_in_another_study_is_copied_not_run_again(workdir: Path):
    """Two studies whose grids share the default point (mask ratio 0.75): the second copies that trial's result,
    metrics and artifacts from the first instead of probing it again, marked as a copy."""
    one = STUDY.replace("seeds = [0, 1]", "seeds = [0]").replace('"model.mask_ratio" = [0.5, 0.75]',
                                                                   '"model.mask_ratio" = [0.75, 0.9]')
    (workdir / "one.toml").write_text(one)
    (workdir / "two.toml").write_text(one.replace('name = "tiny"', 'name = "two"')
                                      .replace("[0.75, 0.9]", "[0.5, 0.75]"))
    assert invoke("run", "one.toml").exit_code == 0
    res = invoke("run", "two.toml")
    assert res.exit_code == 0, res.output
    assert "done before in study 'tiny'; its result is copied, nothing runs" in res.output
    assert "2 trials: 0 already done, 1 copied from another study, 1 done" in res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    by_label = {}
    for study in ("tiny", "two"):
        for t, r in study_trials(engine, get_study(engine, study).id):
            by_label[study, t.label] = (t, r, trial_details(engine, t.id))
    (src, src_r, (src_m, _, src_a)), (cp, cp_r, (cp_m, _, cp_a)) = by_label["tiny", "mask_ratio=0.75"], \
        by_label["two", "mask_ratio=0.75"]
    assert cp.hash == src.hash and cp.status == "done" and cp.device_name == src.device_name
    assert cp_r.result_copied and not src_r.result_copied and not by_label["two", "mask_ratio=0.5"][1].result_copied
    assert cp_r.linear_top1 == src_r.linear_top1 and cp_r.linear_wall_s == src_r.linear_wall_s
    assert [(m.stage, m.epoch, m.name, m.value) for m in cp_m] == [(m.stage, m.epoch, m.name, m.value) for m in src_m]
    assert {(a.kind, a.path) for a in cp_a} == {(a.kind, a.path) for a in src_a} and cp_a
    # the published records say which result is a copy: compute_spent counts its minutes as 0 (test_report)
    assert [t["result_copied"] for t in from_db(engine, "two").trials] == [False, True]
    # --rerun means run again: nothing is copied then
    res = invoke("run", "two.toml", "--rerun")
    assert res.exit_code == 0 and "copied" not in res.output
    assert not get_result(engine, cp.id).result_copied


def test_failed_trial_is_recorded_and_study_goes_on(workdir: Path):
    text = STUDY.replace("[pretrain]\nepochs = 2", "[pretrain]\nepochs = 2\nbase_lr = 1e12")
    text = text.replace("seeds = [0, 1]", "seeds = [0]")
    (workdir / "diverge.toml").write_text(text)
    res = invoke("run", "diverge.toml")
    assert res.exit_code == 1, res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    trials = rows(engine, TrialRow)
    assert {t.status for t in trials} == {"diverged"}
    assert all("step" in t.error for t in trials)
    assert rows(engine, ResultRow) == []


def test_data_override_runs_the_study_on_other_shards(workdir: Path, digits_cache: Path):
    from mae_lab.data import resolve_dataset

    info = resolve_dataset("digits", cache_dir=digits_cache)
    text = STUDY.replace("seeds = [0, 1]", "seeds = [0]").replace('[0.5, 0.75]', '[0.75]')
    (workdir / "tiny.toml").write_text(text)
    res = invoke("run", "tiny.toml", "--data", f"train={info.train},val={info.val}")
    assert res.exit_code == 0, res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    (trial,) = rows(engine, TrialRow)
    assert trial.status == "done", trial.error
    spec = json.loads(trial.spec_json)["data"]
    assert spec["dataset"] is None and spec["train"] == info.train
