"""Search claims, each with a test that fails when the claim is false: the median pruner prunes a deliberately bad
trial (and only it), two `mae-lab search` processes on one PostgreSQL database share one study, and a killed search
resumes its trial from the checkpoint."""
from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import mae_lab, study_toml
from test_resume import checkpoint_epoch, pretrained_epochs
from test_search import SEARCH
from test_workers import finish, pg_rows, pg_url  # noqa: F401 - pg_url is a fixture

# A grid over the kNN memory: 512 and 500 training samples are good, 12 (about one image per class) is deliberately
# bad. With [study] seeds = [0] the grid sampler asks 512, 500, then 12, so the bad point comes after the two
# startup trials the median pruner waits for (a test below fails loudly if the order ever changes).
PRUNE = study_toml("prune", comment="mae-lab search prune.toml", study={"seeds": [0]},
                   pretrain={"epochs": 2, "batch_size": 8, "probe_every": 1},
                   linear={"epochs": 2, "warmup_epochs": 1, "pool": "mean"},
                   search={"n_trials": 3, "sampler": "grid", "pruner": "median"},
                   space={"data.train_samples": {"type": "categorical", "choices": [12, 500, 512]}})


@pytest.mark.slow
def test_the_median_pruner_prunes_a_deliberately_bad_trial(workdir: Path):
    import optuna

    from mae_lab.run.search import storage

    (workdir / "prune.toml").write_text(PRUNE)
    out = finish([mae_lab("search", "prune.toml", "--device", "cpu", cwd=workdir)])[0]
    trials = optuna.load_study(study_name="prune", storage=storage("sqlite:///db/mae_lab.db")).get_trials()
    asked = [t.params["data.train_samples"] for t in trials]
    assert asked == [512, 500, 12], f"the grid sampler's order changed: {asked} (rearrange the choices)"
    states = {t.params["data.train_samples"]: t.state.name for t in trials}
    assert states == {512: "COMPLETE", 500: "COMPLETE", 12: "PRUNED"}, (states, out)
    with sqlite3.connect(workdir / "db" / "mae_lab.db") as c:
        rows = c.execute("SELECT id, status, error, axes_json FROM mae_trials ORDER BY id").fetchall()
        bad = [r for r in rows if '"data.train_samples": 12' in r[3]]
        assert len(bad) == 1 and bad[0][1] == "pruned" and "median pruner after pretraining epoch 1" in bad[0][2]
        # what pretraining did: the bad trial stopped after its first epoch, the good ones ran both
        epochs = dict(c.execute("SELECT trial_id, max(epoch) FROM mae_metrics WHERE stage = 'pretrain' "
                                "GROUP BY trial_id").fetchall())
        assert epochs == {r[0]: 1 if r in bad else 2 for r in rows}, epochs
        knn = dict(c.execute("SELECT trial_id, value FROM mae_metrics WHERE stage = 'pretrain' AND epoch = 1 "
                             "AND name = 'knn_top1'").fetchall())
    assert knn[bad[0][0]] < min(v for k, v in knn.items() if k != bad[0][0])  # it was the worst at epoch 1


@pytest.mark.slow
def test_two_search_processes_share_one_postgres_study(workdir: Path, pg_url: str):  # noqa: F811
    import optuna

    from mae_lab.run.search import storage

    text = SEARCH.replace("n_trials = 6", "n_trials = 4").replace('sampler = "tpe"', 'sampler = "random"')
    (workdir / "s.toml").write_text(text)
    outs = finish([mae_lab("search", "s.toml", "--db", pg_url, "--device", "cpu", cwd=workdir) for _ in range(2)])
    asked = [int(re.search(r"this run: (\d+) asked", out).group(1)) for out in outs]
    assert min(asked) >= 1, (asked, outs)  # both processes asked (and ran) trials of the one study

    summaries = optuna.get_all_study_summaries(storage(pg_url))
    assert [s.study_name for s in summaries] == ["tiny_search"]
    trials = optuna.load_study(study_name="tiny_search", storage=storage(pg_url)).get_trials()
    assert sum(asked) == len(trials) and 4 <= len(trials) <= 5  # each stops at the target (a racing ask may add one)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), [t.state for t in trials]
    rows = pg_rows(pg_url, "SELECT hash, status, attempts, optuna_trial FROM mae_trials")
    assert len({r[0] for r in rows}) == len(rows)  # no spec trained twice
    assert all(r[1] in ("done", "pruned") and r[2] == 1 for r in rows), rows
    assert sorted(r[3] for r in rows) == sorted(t.number for t in trials)
    assert pg_rows(pg_url, "SELECT count(*) FROM mae_studies") == [(1,)]


KILLED = study_toml("ks", comment="mae-lab search ks.toml", study={"seeds": [0]},
                    pretrain={"epochs": 6, "batch_size": 64}, linear={"epochs": 2, "warmup_epochs": 1},
                    search={"n_trials": 2, "sampler": "random"},
                    space={"model.mask_ratio": {"type": "float", "low": 0.5, "high": 0.9}})


@pytest.mark.slow
def test_a_killed_search_resumes_its_trial_from_the_checkpoint(workdir: Path):
    import optuna

    from mae_lab.run.search import storage

    (workdir / "kill.toml").write_text(KILLED)
    db = workdir / "db" / "mae_lab.db"
    proc = mae_lab("search", "kill.toml", "--device", "cpu", cwd=workdir)
    deadline = time.time() + 300
    while checkpoint_epoch(db) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = checkpoint_epoch(db)

    out = finish([mae_lab("search", "kill.toml", "--device", "cpu", cwd=workdir)])[0]
    # the killed point is asked again and resumes at epoch k+1; then the second point trains from epoch 1
    assert pretrained_epochs(out) == list(range(k + 1, 7)) + list(range(1, 7)), out
    trials = optuna.load_study(study_name="ks", storage=storage("sqlite:///db/mae_lab.db")).get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]  # the killed one, retried
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT status, attempts FROM mae_trials ORDER BY id").fetchall()
    assert rows == [("done", 2), ("done", 1)], rows
