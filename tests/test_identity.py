"""A trial's identity: what determines its numbers is hashed, how it ran is not, and old hashes stay stable."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import dump_db, study_toml
from typer.testing import CliRunner

from cli import app
from mae_lab.data import resolve_dataset, resolve_spec_data
from mae_lab.study.expand import expand
from mae_lab.study.identity import HASH_NEUTRAL, RunContext, _flatten, bind, hashes, identity
from mae_lab.study.planning import run_context, trial_rows
from mae_lab.study.spec import TrialSpec, parse_study

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_SPEC = sqlite3.connect(FIXTURES / "release_620180e.db").execute(
    "SELECT spec_json FROM mae_trials ORDER BY id").fetchone()[0]  # a spec saved by release 620180e


def trial_hash(spec: TrialSpec, ctx: RunContext = RunContext()) -> str:
    return hashes(spec, ctx)[0]


def pretrain_hash(spec: TrialSpec, ctx: RunContext = RunContext()) -> str:
    return hashes(spec, ctx)[1]


def spec_with(**changes: dict) -> TrialSpec:
    raw = json.loads(RELEASE_SPEC)
    for section, fields in changes.items():
        raw[section].update(fields)
    return TrialSpec.model_validate(raw)


@pytest.mark.parametrize("section, fields", [
    ("data", {"num_workers": 2}), ("data", {"in_memory": True}), ("pretrain", {"compile": True})])
def test_execution_choices_do_not_change_the_hash(section, fields):
    base = spec_with()
    other = spec_with(**{section: fields})
    assert trial_hash(other) == trial_hash(base) and pretrain_hash(other) == pretrain_hash(base)


def test_two_data_roots_holding_the_same_dataset_give_one_hash(tmp_path, digits_cache):
    digits = resolve_dataset("digits", cache_dir=digits_cache)
    shards = Path(digits.train).parent
    copy = tmp_path / "elsewhere" / shards.name
    shutil.copytree(shards, copy)
    hashes = set()
    for folder in (shards, copy):  # the same shards, named by two paths
        spec = spec_with(data={"dataset": None, "train": f"{folder}/{Path(digits.train).name}",
                               "val": f"{folder}/{Path(digits.val).name}"})
        info = resolve_spec_data(spec.data)
        hashes.add(trial_hash(spec, run_context(spec, info, "cpu")))
    assert len(hashes) == 1
    by_name, elsewhere = spec_with(), resolve_dataset("digits", cache_dir=tmp_path / "other_root")
    assert elsewhere.train != digits.train  # the named dataset under two roots: one hash too
    assert trial_hash(by_name, run_context(by_name, digits, "cpu")) == \
        trial_hash(by_name, run_context(by_name, elsewhere, "cpu"))


def test_the_global_batch_and_the_resolved_precision_are_the_identity():
    spec = spec_with(pretrain={"batch_size": 64})
    one = trial_hash(spec, RunContext(world_size=1))
    assert trial_hash(spec, RunContext(world_size=2)) != one  # --nproc 2 at the same per-process batch
    assert pretrain_hash(spec, RunContext(world_size=2)) != pretrain_hash(spec, RunContext(world_size=1))
    doubled = spec_with(pretrain={"batch_size": 128})
    assert trial_hash(doubled, RunContext(world_size=1)) == trial_hash(spec, RunContext(world_size=2))  # equal global
    none, bf16 = spec_with(pretrain={"amp": "none"}), spec_with(pretrain={"amp": "bf16"})
    assert trial_hash(none, run_context(none, _info(), "cpu")) != trial_hash(bf16, run_context(bf16, _info(), "cpu"))
    auto = spec_with(pretrain={"amp": "auto"})  # resolved for the device: equals what it resolves to
    resolved = trial_hash(auto, run_context(auto, _info(), "cpu"))
    assert resolved in {trial_hash(none, run_context(none, _info(), "cpu")),
                        trial_hash(bf16, run_context(bf16, _info(), "cpu"))}


def _info():
    return resolve_dataset("digits")


def test_a_release_spec_keeps_its_hash_after_new_fields():
    old = TrialSpec.model_validate_json(RELEASE_SPEC)  # saved before the new fields: each takes its default
    released = set(_flatten(json.loads(RELEASE_SPEC)))
    assert set(identity(old)) - released == {"pretrain.global_batch"}  # no field added since reaches the hash
    # pinned: the hash of that saved spec; if this changes, every stored trial would be run again
    assert trial_hash(old) == "14688796a63efea4"
    changed = spec_with(data={"val_holdout": 100})
    assert trial_hash(changed) != trial_hash(old)  # a new field away from its neutral value is identity


def test_every_field_added_since_the_release_is_hash_neutral():
    released = set(_flatten(json.loads(RELEASE_SPEC)))
    now = set(_flatten(TrialSpec().model_dump(mode="json")))
    added = now - released
    missing = sorted(added - set(HASH_NEUTRAL))
    assert not missing, f"add these new spec fields to identity.HASH_NEUTRAL with their 'as before' value: {missing}"
    defaults = _flatten(TrialSpec().model_dump(mode="json"))
    assert {k: defaults[k] for k in added} == {k: HASH_NEUTRAL[k] for k in added}


STUDY = study_toml("ckpt", data={"dataset": "digits", "augmentation": "none"},
                   pretrain={"epochs": 2, "batch_size": 128}, linear={"enabled": False})


def test_a_resume_across_an_incompatible_checkpoint_exits_2_naming_the_key(workdir: Path):
    (workdir / "s.toml").write_text(STUDY)
    res = CliRunner().invoke(app, ["run", "s.toml", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    [(recorded,)] = sqlite3.connect(workdir / "db" / "mae_lab.db").execute("SELECT hash FROM mae_trials").fetchall()
    plan = CliRunner().invoke(app, ["run", "s.toml", "--device", "cpu", "--dry-run"], env={"COLUMNS": "200"})
    assert recorded[:12] in plan.output and "done" in plan.output, plan.output  # the plan shows the recorded hash
    [ckpt] = (workdir / "db" / "artifacts" / "pretrain").glob("*.pt")
    saved = torch.load(ckpt, weights_only=True)
    saved["identity"]["pretrain.base_lr"] = 0.5  # as if written for another recipe under this file name
    torch.save(saved, ckpt)
    before = dump_db(workdir / "db" / "mae_lab.db")
    res = CliRunner().invoke(app, ["run", "s.toml", "--device", "cpu", "--rerun"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "s.toml" in lines[0] and "pretrain.base_lr" in lines[0], res.output
    assert dump_db(workdir / "db" / "mae_lab.db") == before


def test_a_trial_is_recorded_only_with_the_hashes_of_its_run():
    """Expansion gives no hash; ``bind`` gives the one ``hashes`` computes under a run's context, and refuses the
    spec as written (no resolved precision), so an unbound hash cannot reach ``trial_rows`` and the database."""
    study = parse_study('[study]\nname = "many"\nseeds = [0, 7]\n[model]\npreset = "vit_digits"\n'
                        '[grid]\n"model.mask_ratio" = [0.5, 0.75]\n', "many.toml")
    trials = expand(study)
    assert not any(hasattr(t, "hash") or hasattr(t, "pretrain_hash") for t in trials)
    with pytest.raises(AttributeError):
        trial_rows(study, trials)
    with pytest.raises(ValueError, match="no resolved precision"):
        bind(trials[0], RunContext(fingerprint="f", world_size=2))
    ctx = RunContext(fingerprint="f", world_size=2, precision="bf16")
    bound = [bind(t, ctx) for t in trials]
    assert [(t.hash, t.pretrain_hash) for t in bound] == [hashes(t.spec, ctx) for t in trials]
    assert [r["hash"] for r in trial_rows(study, bound)] == [t.hash for t in bound]
    unbound = {trial_hash(t.spec) for t in trials}  # the specs as written: what the old expansion called a hash
    assert len({t.hash for t in bound}) == 4 and not {t.hash for t in bound} & unbound
