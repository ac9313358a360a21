"""Selection reads the validation split: search objectives, pruning and probe_every see the held-out part of the
training split; the test split is measured once, recorded apart (``*_test_top1``), and seen by nothing that selects.

The dataset here is the embedded digits with a deliberately mislabeled test split (every label shifted by one): a
number read from it would be near 0, so a selection that read it would show."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import study_toml
from sqlmodel import Session, select
from typer.testing import CliRunner

from cli import app
from mae_lab.data.pack import _pixel_stats, _png, _write_dataset
from mae_lab.store.engine import connect
from mae_lab.store.tables import MetricRow, ResultRow, TrialRow

SEARCH = study_toml("split", comment="mae-lab search split.toml --data-root data",
                    data={"dataset": "shifted", "augmentation": "none"},
                    pretrain={"epochs": 2, "batch_size": 128, "probe_every": 1},
                    linear={"epochs": 20, "warmup_epochs": 1, "pool": "mean"},
                    search={"n_trials": 2, "sampler": "random", "pruner": "median"},
                    space={"model.mask_ratio": {"type": "float", "low": 0.5, "high": 0.8}})


@pytest.fixture
def shifted(workdir: Path) -> Path:
    """data/shifted: the digits' 1,497 training images (no val split: it is held out of train) and a 300-image test
    split whose labels are all wrong."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[300:], order[:300]
    mean, std = _pixel_stats([np.repeat(images[train][..., None], 3, axis=-1)])
    _write_dataset(workdir / "data" / "shifted", name="shifted", classes=[str(c) for c in range(10)],
                   image_size=(8, 8), mean=mean, std=std, shard_size=5000, read=lambda i: ("png", _png(images[i])),
                   splits={"train": [(int(i), int(digits.target[i])) for i in train],
                           "test": [(int(i), (int(digits.target[i]) + 1) % 10) for i in test]})
    return workdir / "data"


def test_search_and_pruning_read_the_validation_split(workdir: Path, shifted: Path):
    (workdir / "split.toml").write_text(SEARCH)
    res = CliRunner().invoke(app, ["search", "split.toml", "--data-root", str(shifted), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    engine = connect("sqlite:///db/mae_lab.db", create=False)
    with Session(engine) as s:
        done = s.exec(select(TrialRow, ResultRow).join(ResultRow, ResultRow.trial_id == TrialRow.id)
                      .where(TrialRow.status == "done")).all()
        knn = {(m.trial_id, m.epoch): m.value for m in s.exec(select(MetricRow).where(
            MetricRow.stage == "pretrain", MetricRow.name == "knn_top1"))}
    assert done
    ostudy = optuna.load_study(study_name="split", storage=f"sqlite:///{workdir / 'db' / 'mae_lab.db'}")
    by_trial = {t.user_attrs["trial_ids"][0]: t for t in ostudy.trials if "trial_ids" in t.user_attrs}
    for trial, result in done:
        assert result.linear_top1 > 0.5  # the validation split: held out of train, labels right
        assert result.linear_test_top1 is not None and result.linear_test_top1 < 0.25  # the mislabeled test split
        told = by_trial[trial.id]
        assert told.values == [pytest.approx(result.linear_top1)]  # the objective is the validation number
        # the pruner saw knn_top1 every epoch (probe_every = 1): the validation split's, not the test split's
        assert told.intermediate_values == {e: pytest.approx(knn[(trial.id, e)]) for e in (1, 2)}
        assert min(told.intermediate_values.values()) > 0.4
