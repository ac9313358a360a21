"""Live views in TensorBoard and MLflow, read back with each tracker's own reader (EventAccumulator, MlflowClient):
the right scalars at the right steps, one MLflow run per trial with its params, tags, metric history and
reconstruction, a killed trial resumed into the same runs with no step twice, a backfill equal to live logging, a
tracker that fails leaving the trials done with one warning, and bad input refused before anything is written."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, mae_lab, query, study_toml
from typer.testing import CliRunner

from cli import app

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

EVERY = 5
STUDY = f"""# mae-lab run tracked.toml
[study]
name = "tracked"
seeds = [0]

[model]
preset = "vit_digits"

[pretrain]
epochs = 3
batch_size = 64
warmup_epochs = 1

[eval]
linear = {{ epochs = 2, warmup_epochs = 1 }}
finetune = {{ enabled = false }}

[log]
trackers = ["tensorboard", "mlflow"]
every = {EVERY}

[grid]
"model.mask_ratio" = [0.5, 0.75]
"""
ENV = ("MAE_LAB_DB", "MAE_LAB_DATA", "MAE_LAB_ARTIFACTS", "MLFLOW_TRACKING_URI")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run folder -> its (step, value) events, as TensorBoard reads them."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_runs(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((root / "db" / "artifacts" / "tensorboard" / "tracked").iterdir())}


def mlflow_runs(db_dir: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{db_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracked")
    return client, client.search_runs([exp.experiment_id])


def metric_history(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def db_rows(db: Path, trial_hash: str, stage: str, name: str) -> list[tuple[int, float]]:
    return query(db, f"SELECT m.epoch, m.value FROM mae_metrics m JOIN mae_trials t ON t.id = m.trial_id "
                     f"WHERE t.hash = '{trial_hash}' AND m.stage = '{stage}' AND m.name = '{name}' ORDER BY m.epoch")


@pytest.fixture(scope="module")
def live(tmp_path_factory, digits_cache) -> Path:
    """The study run once, uninterrupted, logging live to both trackers (its folder: db/ holds both stores)."""
    d = tmp_path_factory.mktemp("live")
    (d / "tracked.toml").write_text(STUDY)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        mp.setenv("MAE_LAB_CACHE", str(digits_cache))
        for var in ENV:
            mp.delenv(var, raising=False)
        res = CliRunner().invoke(app, ["run", "tracked.toml"])
    assert res.exit_code == 0, res.output
    assert "warning" not in res.output, res.output
    return d


def test_tensorboard_holds_every_scalar_at_its_step(live: Path):
    db = live / "db" / "mae_lab.db"
    trials = query(db, "SELECT hash, label FROM mae_trials ORDER BY id")
    runs = tb_runs(live)
    assert sorted(runs) == sorted(f"mask_ratio={label.split('=')[1]}_s0_{h[:8]}" for h, label in trials)
    for h, _ in trials:
        got = scalars(next(p for name, p in runs.items() if name.endswith(h[:8])))
        steps = [s for s, _ in got["pretrain_step/loss"]]
        assert steps == [s for s, _ in db_rows(db, h, "pretrain_step", "loss")]
        assert len(steps) >= 3 and all(s % EVERY == 0 for s in steps) and steps == sorted(set(steps))
        assert [s for s, _ in got["pretrain_step/lr"]] == steps and [s for s, _ in got["pretrain_step/images_per_s"]]\
            == steps
        assert [s for s, _ in got["pretrain/loss"]] == [1, 2, 3]
        assert [s for s, _ in got["linear/top1"]] == [1, 2]
        top1 = query(db, f"SELECT r.linear_top1 FROM mae_results r JOIN mae_trials t ON t.id = r.trial_id "
                         f"WHERE t.hash = '{h}'")[0][0]
        assert got["result/linear_top1"] == [(0, pytest.approx(top1, rel=1e-6))]
        for (s, v), (s2, v2) in zip(got["pretrain_step/loss"], db_rows(db, h, "pretrain_step", "loss")):
            assert s == s2 and v == pytest.approx(v2, rel=1e-6)


def test_tensorboard_hparams_and_reconstruction(live: Path):
    for folder in tb_runs(live).values():
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        assert "recon" in acc.Tags()["images"]
        assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(acc.PluginTagToContent("hparams"))
        start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        assert b"model.mask_ratio" in start and b"seed" in start  # the axes, against result/* scalars


def test_mlflow_one_run_per_trial_with_params_history_tags_and_recon(live: Path):
    db = live / "db" / "mae_lab.db"
    client, runs = mlflow_runs(live / "db")
    trials = query(db, "SELECT hash, seed, mlflow_run_id, git_commit FROM mae_trials ORDER BY id")
    assert len(runs) == len(trials) == 2
    by_hash = {r.data.tags["hash"]: r for r in runs}
    for h, seed, run_id, commit in trials:
        run = by_hash[h]
        assert run.info.run_id == run_id and run.info.status == "FINISHED"  # the run ID is the trial's provenance
        assert run.data.tags["study"] == "tracked" and run.data.tags["seed"] == str(seed)
        assert run.data.tags["commit"] == (commit or "unknown")
        assert run.data.params["model.mask_ratio"] in ("0.5", "0.75") and run.data.params["pretrain.epochs"] == "3"
        history = metric_history(client, run)
        assert history["pretrain_step/loss"] == [(s, pytest.approx(v)) for s, v in
                                                  db_rows(db, h, "pretrain_step", "loss")]
        assert [s for s, _ in history["linear/top1"]] == [1, 2]
        assert [a.path for a in client.list_artifacts(run_id, "recon")] == [f"recon/{h}.png"]
    out = CliRunner().invoke(app, ["show", trials[0][0][:10], "--db", str(db)]).output
    assert f"mlflow run id {trials[0][2]}" in out


def test_backfill_writes_what_live_logging_wrote(live: Path, tmp_path: Path, monkeypatch):
    """The same database copied elsewhere, backfilled into fresh stores: the same scalars at the same steps, the
    same MLflow histories, params and tags; a second backfill adds nothing."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MAE_LAB_ARTIFACTS", raising=False)
    (tmp_path / "db").mkdir()
    with sqlite3.connect(live / "db" / "mae_lab.db") as src, sqlite3.connect(tmp_path / "db" / "mae_lab.db") as dst:
        src.backup(dst)  # (WAL mode: the file alone may not hold the last commits)
    db = str(tmp_path / "db" / "mae_lab.db")
    for _ in range(2):
        res = CliRunner().invoke(app, ["log", "tracked", "--to", "tensorboard,mlflow", "--db", db])
        assert res.exit_code == 0 and "2 done trials" in res.output, res.output
    live_tb, back_tb = tb_runs(live), tb_runs(tmp_path)
    assert sorted(live_tb) == sorted(back_tb)
    for name in live_tb:
        assert scalars(back_tb[name]) == scalars(live_tb[name])  # every tag, step and value (timings too)
    live_client, live_runs = mlflow_runs(live / "db")
    back_client, back_runs = mlflow_runs(tmp_path / "db")
    assert len(back_runs) == 2
    for run in live_runs:
        twin = next(r for r in back_runs if r.data.tags["hash"] == run.data.tags["hash"])
        assert twin.data.params == run.data.params
        assert {k: v for k, v in twin.data.tags.items() if not k.startswith("mlflow.")} == \
            {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        assert metric_history(back_client, twin) == metric_history(live_client, run)
        assert query(Path(db), f"SELECT mlflow_run_id FROM mae_trials WHERE hash = '{run.data.tags['hash']}'") \
            == [(twin.info.run_id,)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failing_trackers_warn_once_and_the_trials_are_done(workdir: Path, monkeypatch):
    """MLflow at a closed port, TensorBoard's folder blocked by a file: each warns once, both trials are done."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    (workdir / "db" / "artifacts").mkdir(parents=True)
    (workdir / "db" / "artifacts" / "tensorboard").write_text("not a folder")
    study = STUDY.replace('name = "tracked"', 'name = "r"').replace("seeds = [0]", "seeds = [0, 1]")
    (workdir / "r.toml").write_text(study.replace("epochs = 3\n", "epochs = 0\n").split("[grid]")[0])  # random init
    res = CliRunner().invoke(app, ["run", "r.toml"])
    assert res.exit_code == 0, res.output
    assert query(workdir / "db" / "mae_lab.db", "SELECT status, mlflow_run_id FROM mae_trials") == [("done", None)] * 2
    assert res.output.count("logging to mlflow failed") == 1, res.output
    assert res.output.count("logging to tensorboard failed") == 1, res.output


def checkpoint_epoch(db: Path) -> int:
    try:
        return query(db, "SELECT max(epoch) FROM mae_checkpoints")[0][0] or 0
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_a_killed_trial_resumes_into_the_same_runs_without_a_step_twice(workdir: Path, live: Path):
    (workdir / "tracked.toml").write_text(STUDY)
    db = workdir / "db" / "mae_lab.db"
    proc = mae_lab("run", "tracked.toml", cwd=workdir)
    deadline = time.time() + 300
    while checkpoint_epoch(db) < 1:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # a few more steps logged past the checkpoint: the resumed run goes over them again
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    first = query(db, "SELECT hash, mlflow_run_id FROM mae_trials WHERE status = 'running'")
    assert len(first) == 1 and first[0][1] is not None, query(db, "SELECT status FROM mae_trials")
    proc = mae_lab("run", "tracked.toml", cwd=workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "warning" not in out, out
    assert query(db, f"SELECT mlflow_run_id, attempts FROM mae_trials WHERE hash = '{first[0][0]}'") == \
        [(first[0][1], 2)]  # the same MLflow run, continued
    clean, resumed = tb_runs(live), tb_runs(workdir)
    assert sorted(clean) == sorted(resumed), out
    for name in clean:
        a, b = scalars(clean[name]), scalars(resumed[name])
        assert sorted(a) == sorted(b)
        for tag in a:  # the same steps, each once, as an uninterrupted run's (values: the resumed run's are equal)
            assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
            if not tag.endswith(("images_per_s", "wall_s", "peak_mem_mib")):
                assert [v for _, v in b[tag]] == pytest.approx([v for _, v in a[tag]], rel=1e-5), tag
    client, runs = mlflow_runs(workdir / "db")
    assert len(runs) == 2
    for run in runs:
        for key, points in metric_history(client, run).items():
            steps = [s for s, _ in points]
            assert steps == sorted(set(steps)), key


BAD = [("[log]\ntrackers = [\"wandb\"]\n", "log.trackers.0"), ("[log]\nevery = 0\n", "log.every"),
       ("[log]\nfolder = \"x\"\n", "log.folder")]


@pytest.mark.parametrize("table, key", BAD)
def test_a_bad_log_table_is_one_line_naming_the_key(workdir: Path, table: str, key: str):
    (workdir / "b.toml").write_text(STUDY.split("[log]")[0] + table)
    res = CliRunner().invoke(app, ["run", "b.toml"])
    assert res.exit_code == 2 and f"b.toml: {key}:" in res.output and len(res.output.strip().splitlines()) == 1, \
        res.output
    assert not (workdir / "db").exists()


def test_an_unknown_tracker_or_a_missing_extra_is_one_line_and_writes_nothing(workdir: Path, monkeypatch):
    (workdir / "t.toml").write_text(STUDY.split("[log]")[0])
    res = CliRunner().invoke(app, ["run", "t.toml", "--log", "tensorboard,wandb"])
    assert res.exit_code == 2 and "--log: unknown tracker 'wandb'" in res.output, res.output
    for name in ("mlflow", "tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the extra were not installed
        res = CliRunner().invoke(app, ["run", "t.toml", "--log", name])
        assert res.exit_code == 2 and f"--log: logging to {name} needs the extra: pip install 'mae-lab[{name}]'" \
            in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (workdir / "db").exists()
    res = CliRunner().invoke(app, ["log", "tracked", "--to", "mlflow"])
    assert res.exit_code == 2 and "mae-lab[mlflow]" in res.output, res.output


def test_logging_is_not_part_of_a_trials_identity(workdir: Path):
    (workdir / "a.toml").write_text(STUDY)
    (workdir / "b.toml").write_text(STUDY.split("[log]")[0] + STUDY.split("every = 5\n")[1])
    plans = [CliRunner().invoke(app, ["run", f, "--dry-run"], env={"COLUMNS": "200"}).output
             for f in ("a.toml", "b.toml")]
    assert plans[0] == plans[1] and "0.75" in plans[0]


def test_a_search_logs_its_trials_too(workdir: Path):
    (workdir / "s.toml").write_text(study_toml(
        "searched", pretrain={"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
        linear={"epochs": 2, "warmup_epochs": 1},
        search={"n_trials": 2, "sampler": "grid"},
        space={"model.mask_ratio": {"type": "categorical", "choices": [0.5, 0.75]}},
        tail='[log]\ntrackers = ["tensorboard"]\nevery = 3\n'))
    res = CliRunner().invoke(app, ["search", "s.toml"])
    assert res.exit_code == 0, res.output
    runs = sorted((workdir / "db" / "artifacts" / "tensorboard" / "searched").iterdir())
    assert len(runs) == 2
    for folder in runs:
        got = scalars(folder)
        assert [s for s, _ in got["pretrain_step/loss"]] == list(range(3, 3 * len(got["pretrain_step/loss"]) + 1, 3))
        assert len(got["result/linear_top1"]) == 1


@pytest.mark.slow
def test_under_ddp_only_rank_0_logs(workdir: Path):
    """Two gloo ranks started by hand as torchrun would, each in its own folder: rank 0 logs the trial once (every
    step once), rank 1's folder stays empty (no view, no database)."""
    study = STUDY.replace("seeds = [0]", "seeds = [0]\n\n[data]\ntrain_samples = 512")  # 16 steps of 2 x 16
    (workdir / "d.toml").write_text(study.replace("epochs = 3\nbatch_size = 64\nwarmup_epochs = 1",
                                                  "epochs = 1\nbatch_size = 16\nwarmup_epochs = 0").split("[grid]")[0])
    port, procs = closed_port(), []
    for rank in (0, 1):
        (workdir / f"rank{rank}").mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "cli", "run", str(workdir / "d.toml"), "--device", "cpu",
                                       "--db", "sqlite:///db/mae_lab.db"], cwd=workdir / f"rank{rank}", env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert list((workdir / "rank1").iterdir()) == []
    [folder] = (workdir / "rank0" / "db" / "artifacts" / "tensorboard" / "tracked").iterdir()
    steps = [s for s, _ in scalars(folder)["pretrain_step/loss"]]
    assert steps == list(range(EVERY, EVERY * len(steps) + 1, EVERY)) and len(steps) >= 2
    client, runs = mlflow_runs(workdir / "rank0" / "db")
    assert len(runs) == 1 and [s for s, _ in metric_history(client, runs[0])["pretrain_step/loss"]] == steps
