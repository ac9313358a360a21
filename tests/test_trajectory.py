"""Effects over pretraining: per-epoch linear probes kept in the trial records and trials.csv, each point's Δ to the
default per probed epoch with its paired interval, the sentence saying from which epoch it excludes 0, the plot, and
the probes counted in the compute line; the pages rebuilt from trials.csv equal those built from the database."""
from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from cli import app
from mae_lab.report.study_report import summarize_records
from mae_lab.report.trajectory import Trajectory, study_trajectories
from mae_lab.store.engine import connect
from mae_lab.store.records import COLUMNS, STUDY_COLUMNS, StudyRecords, from_db, read_csv
from mae_lab.study.stats import Interval

STUDY = """
[study]
name = "traj"
seeds = [0, 1]
[data]
dataset = "digits"
augmentation = "none"
train_samples = 256
[model]
preset = "vit_digits"
mask_ratio = 0.75
[pretrain]
epochs = 2
batch_size = 64
base_lr = 1.5e-3
warmup_epochs = 0
probe_every = 1
[eval]
linear = { epochs = 3, batch_size = 128, warmup_epochs = 1, pool = "mean", blocks = [4] }
finetune = { enabled = false }
[grid]
"model.mask_ratio" = [0.75, 0.25]
"""


def _ci(delta: float, low: float | None, high: float | None) -> Interval:
    return Interval(delta, low, high, 1.0 if low is not None else None, 0.95, "paired", 2,
                    "" if low is not None else "n=1")


def test_the_sentence_says_from_which_epoch_the_interval_excludes_0():
    def says(*cis: Interval) -> str:
        return Trajectory("p", list(range(1, len(cis) + 1)), list(cis)).sentence()

    assert "Δ excludes 0 from epoch 2 on" in says(_ci(0.5, -1, 2), _ci(2, 1, 3), _ci(3, 2, 4))
    assert "Δ excludes 0 from epoch 1 on" in says(_ci(-2, -3, -1), _ci(-3, -4, -2))
    assert "Δ excludes 0 at no probed epoch" in says(_ci(0.5, -1, 2), _ci(0.1, -1, 1), _ci(0, None, None))
    assert "Δ excludes 0 at epoch 2, not at the last" in says(_ci(0.5, -1, 2), _ci(2, 1, 3), _ci(0.1, -1, 1))
    assert "from epoch 3 on" in says(_ci(2, 1, 3), _ci(0.1, -1, 1), _ci(2, 1, 3))  # every epoch from E on


ADAPTIVE = """
[study]
name = "ad"
seeds = { min = 2, max = 6, until = "decided", min_effect = 1.0 }
[model]
preset = "vit_digits"
mask_ratio = 0.75
[grid]
"model.mask_ratio" = [0.75, 0.25]
"""


def test_each_epochs_interval_is_the_one_the_verdicts_use():
    """Adaptive seeds: every epoch's interval is at the study's level (Bonferroni over 5 looks), and the last
    epoch's, whose probe is the linear probe, equals the verdict's interval."""
    top1 = {0.75: [(0.50, 0.60), (0.52, 0.61), (0.49, 0.62)], 0.25: [(0.45, 0.50), (0.47, 0.52), (0.46, 0.49)]}
    trials = []
    for ratio, per_seed in top1.items():
        for seed, (first, last) in enumerate(per_seed):
            rec = {c: None for c in COLUMNS if c not in STUDY_COLUMNS}
            rec.update(hash=f"{ratio}-{seed}", seed=seed, label=f"mask_ratio={ratio}", axes={"model.mask_ratio": ratio},
                       spec={}, status="done", linear_val_top1=last, linear_epochs=[[1, first], [2, last]])
            trials.append(rec)
    records = StudyRecords("ad", "", None, ADAPTIVE, trials)
    report = summarize_records(records)
    (tr,) = study_trajectories(report, records)
    assert report.level == 1 - 0.05 / 5 and [ci.level for ci in tr.intervals] == [report.level] * 2
    assert tr.point == "mask_ratio=0.25" and tr.epochs == [1, 2]
    assert tr.intervals[-1] == report.rows[1].linear_diff


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_per_epoch_probes_are_recorded_reported_and_rebuilt_from_trials_csv(workdir):
    (workdir / "traj.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "traj.toml", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    records = from_db(connect(f"sqlite:///{workdir / 'db' / 'mae_lab.db'}", create=False), "traj")
    assert len(records.trials) == 4
    for t in records.trials:  # the last block's val top-1 at each probed epoch, the last one the linear probe's
        assert [e for e, _ in t["linear_epochs"]] == [1, 2]
        assert abs(t["linear_epochs"][-1][1] - t["linear_val_top1"]) < 1e-6

    res = CliRunner().invoke(app, ["report", "--all", "--out", "db_site"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", "--from", "db_site/trials.csv", "--all", "--out", "csv_site"])
    assert res.exit_code == 0, res.output
    assert read_csv(workdir / "db_site" / "trials.csv")[0].trials == records.trials  # the column reads back

    page = (workdir / "db_site" / "traj.md").read_text(encoding="utf-8")
    section = page[page.index("## Effects over pretraining"):]
    assert re.search(r"- mask_ratio=0\.25: Δ excludes 0 (from epoch [12] on|at no probed epoch|at epoch 1, not at "
                     r"the last) \(epoch \d: Δ [+-]\d+\.\d \[", section), section
    assert "at 95%, one look" in section  # the level of the page's verdicts
    assert "![trajectory](traj/trajectory.png)" in section
    assert (workdir / "db_site" / "traj" / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "8 linear probes at pretraining epochs" in page  # the compute line: 4 trials x 2 probed epochs
    summary = (workdir / "db_site" / "summary.md").read_text(encoding="utf-8")
    assert "## Effects over pretraining" in summary and "- [traj](traj.md), mask_ratio=0.25: Δ excludes 0" in summary

    # the probe surface's heatmaps are read from the database only: everything else rebuilds from trials.csv
    db, csv = tree(workdir / "db_site"), tree(workdir / "csv_site")
    surface = [n for n in db if "surface-" in n]
    assert surface and sorted(n for n in db if n not in surface) == sorted(csv)
    assert [n for n in csv if n != "traj.md" and csv[n] != db[n]] == []
    assert page.startswith(csv["traj.md"].decode("utf-8")) and "## Probe surface" in page.removeprefix(
        csv["traj.md"].decode("utf-8"))


def test_a_study_without_per_epoch_probes_gets_no_section(workdir):
    (workdir / "flat.toml").write_text(STUDY.replace('name = "traj"', 'name = "flat"')
                                       .replace("probe_every = 1", "probe_every = 0")
                                       .replace(", blocks = [4]", "").replace("epochs = 2", "epochs = 1"))
    res = CliRunner().invoke(app, ["run", "flat.toml", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", "--all", "--out", "site"])
    assert res.exit_code == 0, res.output
    page = (workdir / "site" / "flat.md").read_text(encoding="utf-8")
    assert "Effects over pretraining" not in page and "at pretraining epochs" not in page
    assert not (workdir / "site" / "flat" / "trajectory.png").exists()
