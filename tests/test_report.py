"""Reports: formats with their values, the Welch interval against a hand computation, paper matching, plots as PNGs of
the expected size, and reconstructions (an oracle decoder gives back the original image)."""
from __future__ import annotations

import csv
import io
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import bound, study_toml
from rich.console import Console
from typer.testing import CliRunner

from cli import app
from mae_lab.report import paper
from mae_lab.report.formats import render, render_text
from mae_lab.report.plots import SIZES, study_plots
from mae_lab.report.site import compute_spent
from mae_lab.report.study_report import headline, summarize
from mae_lab.store.engine import connect
from mae_lab.store.reads import get_checkpoint, get_study, study_trials
from mae_lab.store.records import StudyRecords
from mae_lab.store.writes import finish_trial, record_metrics, sync_study
from mae_lab.study.expand import expand
from mae_lab.study.planning import trial_rows
from mae_lab.study.presets import config_from_preset
from mae_lab.study.spec import parse_study
from mae_lab.train.model import MaskedAutoencoder
from mae_lab.train.recon import reconstruct

DEPTH_STUDY = """# recorded by hand: a Table 1a study whose results are known exactly
[study]
name = "depth"
paper = "1a"
seeds = [0, 1, 2]

[model]
preset = "vit_digits"   # decoder_depth 2 is the default

[grid]
"model.decoder_depth" = [1, 2, 4, 8]
"""
# linear / fine-tune top-1 in % per seed, by decoder depth
LINEAR = {1: [58, 60, 62], 2: [70, 72, 74], 4: [69, 70, 71], 8: [74, 75, 76]}
FINETUNE = {1: [80, 81, 82], 2: [82, 83, 84], 4: [83, 83, 83], 8: [81, 82, 83]}


def record(url: str, text: str, linear: dict, finetune: dict | None, axis: str, reused: bool = False) -> None:
    """Write a study and its results into a real SQLite database through mae_lab.store (no training)."""
    study = parse_study(text, "hand.toml")
    trials = expand(study)
    engine = connect(url)
    row = sync_study(engine, name=study.study.name, description="hand-made", paper=study.study.paper,
                        path="hand.toml", spec_text=text, spec_hash="x", trials=trial_rows(study, bound(trials)))
    for trial, _ in study_trials(engine, row.id):
        value = json.loads(trial.axes_json)[axis]
        k = study.study.seeds.index(trial.seed)
        for epoch in (1, 2, 3):
            record_metrics(engine, trial.id, "pretrain", epoch, {"loss": 1.0 / (epoch + value + k)})
        finish_trial(engine, trial.id, "done", result={
            "linear_top1": linear[value][k] / 100,
            "finetune_top1": None if finetune is None else finetune[value][k] / 100,
            "pretrain_wall_s": 0.0 if reused else 10.0 * value,
            "pretrain_images_per_s": 0.0 if reused else 1000.0 / value + k,
            "pretrain_peak_mem_mib": None if reused else 100.0 * value + k, "pretrain_reused": reused,
            "encoder_gflops": 0.01 * value})


@pytest.fixture
def depth_db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/hand.db"
    record(url, DEPTH_STUDY, LINEAR, FINETUNE, "model.decoder_depth")
    return url


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- statistics -----------------------------------------------------------------------------------------------

# --- formats --------------------------------------------------------------------------------------------------

def test_every_format_renders_the_recorded_values(depth_db, tmp_path):
    engine = connect(depth_db, create=False)
    rep = summarize(engine, "depth")
    lo, hi = -12 - 2.776445 * math.sqrt(8 / 3), -12 + 2.776445 * math.sqrt(8 / 3)

    md = render_text(rep, "md")
    assert "| **2** (default) | 72.0 ± 2.0 (n=3) | default |" in md
    # depth 1 differs from the default by exactly -12 on every seed: no spread, so the verdict falls back to Welch
    assert "| 1 | 60.0 ± 2.0 (n=3) | -12.0 [-16.5, -7.5] Welch | 81.0 ± 1.0 (n=3) |" in md
    # depth 4: per-seed differences -1, -2, -3: mean -2, sd 1, t(0.975, 2) = 4.302653 -> -2 +- 2.484
    row4 = next(line for line in md.splitlines() if line.startswith("| 4 |"))
    assert "70.0 ± 1.0 (n=3) | -2.0 [-4.5, +0.5] ≈ |" in row4 and "| 4 blocks | 71.9 | 84.9 |" in row4
    assert "| [-6.2, +2.2] |" in row4  # Welch's interval beside it: wider, the seeds' shared spread left in
    # reproduces: 0 excluded on the paper's side and the paper's +3.5 inside the interval
    assert "linear, decoder_depth=8: Δ +3.0 [+0.5, +5.5] -> reproduces (paired 95%, one look); paper Δ +3.5" in md
    # the interval holds 0 but not the paper's +1.9 (71.9 - 70.0, the paper's row at our default, 2 blocks)
    assert ("linear, decoder_depth=4: Δ -2.0 [-4.5, +0.5] -> no effect detected, the paper's Δ ruled out here "
            "(paired 95%, one look; rules out |Δ| > 4.5); paper Δ +1.9") in md.replace("\\|", "|")
    assert "paper Δ: each paper row minus the paper's row at our default (2 blocks), not minus the paper's own " \
        "default (8 blocks)" in md
    assert "fine-tune, decoder_depth=8: Δ -1.0 (no spread) -> no interval (no spread)" not in md
    # ours 60 < 70 < 72 < 75 against the paper's 65.5 < 70.0 < 71.9 < 73.5: one swapped pair, rho = 1 - 6*2/60
    assert "linear: our ordering agrees with the paper's (Spearman rho = +0.80 over 4 matched points)" in md
    assert "matched to ours by equal axis values" in md and "12 blocks" in md  # the unmatched paper setting

    rows = {r["model.decoder_depth"]: r for r in csv.DictReader(io.StringIO(render_text(rep, "csv")))}
    assert set(rows) == {"1", "2", "4", "8"}
    assert float(rows["1"]["linear_mean"]) == pytest.approx(60.0)
    assert float(rows["1"]["linear_ci_low"]) == pytest.approx(lo, abs=1e-5)
    assert float(rows["1"]["linear_ci_high"]) == pytest.approx(hi, abs=1e-5)
    assert rows["1"]["linear_ci_kind"] == "welch" and rows["8"]["linear_ci_kind"] == "paired"
    assert rows["8"]["linear_verdict"] == "reproduces (paired 95%, one look)"
    assert rows["4"]["linear_within_noise"] == "True" and rows["2"]["is_default"] == "True"
    assert float(rows["8"]["paper_lin"]) == 73.5 and float(rows["8"]["finetune_mean"]) == pytest.approx(82.0)
    assert float(rows["4"]["speed_vs_default"]) == pytest.approx((250 + 1) / (500 + 1))
    assert float(rows["8"]["peak_mem_mib"]) == pytest.approx(801.0)  # mean over seeds k = 0, 1, 2
    # depth 1: [-16.5, -7.5] Welch beyond the paper's -4.5: the same direction, larger than the paper
    assert headline(rep) == ("decoder_depth=8 (75.0)", "agrees (ρ = +0.80, 4 points)",
                             "paper's Δ ruled out 1, reproduces 1, same direction, larger 1")

    data = json.loads(render_text(rep, "json"))
    first = data["rows"][0]
    assert first["axes"] == {"model.decoder_depth": 1} and first["linear"]["values"] == pytest.approx([58, 60, 62])
    assert first["linear_diff"]["low"] == pytest.approx(lo, abs=1e-5)
    assert first["linear_diff"]["df"] == pytest.approx(4.0) and first["linear_diff"]["kind"] == "welch"
    assert data["paper_comparison"]["agreement"]["linear"] == {"spearman": pytest.approx(0.8), "points": 4}
    assert data["rows"][1]["is_default"] and data["rows"][1]["linear_diff"] is None

    tex = render_text(rep, "latex")
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{2} & $72.0 \pm 2.0$ (3) & default",
                  r"1 & $60.0 \pm 2.0$ (3) & $-12.0$ [$-16.5$, $-7.5$]", r"decoder\_depth", r"4 blocks & 71.9 & 84.9"):
        assert piece in tex, piece

    runner = CliRunner()
    res = runner.invoke(app, ["report", "depth", "--db", depth_db], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "60.0 ± 2.0 (n=3)" in res.output and "(default)" in res.output and "rho = +0.80" in res.output
    out = tmp_path / "out" / "depth.tex"
    res = runner.invoke(app, ["report", "depth", "--db", depth_db, "--format", "latex", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text() == tex and [p.name for p in out.parent.iterdir()] == ["depth.tex"]  # no temp file left
    res = runner.invoke(app, ["report", "depth", "--db", depth_db, "--format", "xml"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "unknown format 'xml'" in res.output
    res = runner.invoke(app, ["report", "nope", "--db", depth_db])
    assert res.exit_code == 2 and "no study named 'nope'" in res.output


def test_one_seed_gives_no_interval_and_widths_match_by_position(tmp_path):
    text = (DEPTH_STUDY.replace('name = "depth"', 'name = "width"').replace('"1a"', '"1b"')
            .replace("seeds = [0, 1, 2]", "seeds = [0]")
            .replace('"model.decoder_depth" = [1, 2, 4, 8]', '"model.decoder_embed_dim" = [8, 16, 32, 64]'))
    lin = {8: [60], 16: [65], 32: [70], 64: [66]}  # vit_digits' decoder is 32 wide: the default
    url = f"sqlite:///{tmp_path}/w.db"
    record(url, text, lin, lin, "model.decoder_embed_dim")
    rep = summarize(connect(url, create=False), "width")
    md = render_text(rep, "md")
    assert "| 8 | 60.0 ± 0.0 (n=1) | -10.0 (n=1) |" in md
    # by position: the ordering only; no paper number, paper Δ or verdict against the paper on any row
    assert [m.setting for m in rep.comparison.matches] == ["128 wide", "256 wide", "512 wide", "768 wide"]
    assert [r.paper for r in rep.rows] == [None] * 4 and "; paper Δ +" not in md and "; paper Δ -" not in md
    assert "reproduces" not in md and "ruled out" not in md
    assert "by position" in md and "1024 wide" in md
    # 60 < 65 < 70 > 66 against 69.1 < 71.3 < 73.5 > 73.1: the same ordering
    assert rep.comparison.agreement["linear"] == (pytest.approx(1.0), 4)


def test_a_shared_pretraining_reports_the_figures_of_the_trial_that_ran_it(depth_db):
    record(depth_db, DEPTH_STUDY.replace('name = "depth"', 'name = "again"'), LINEAR, FINETUNE,
           "model.decoder_depth", reused=True)  # the same pretrainings, all reused from study "depth"
    engine = connect(depth_db, create=False)
    ran, again = summarize(engine, "depth"), summarize(engine, "again")
    assert [r.pretrain_s.values for r in again.rows] == [r.pretrain_s.values for r in ran.rows]
    assert again.rows[3].peak_mem_mib.mean == pytest.approx(801.0)
    assert again.relative_speed(again.rows[2]) == pytest.approx((250 + 1) / (500 + 1))


def test_tables_leave_out_fine_tune_columns_when_nothing_was_fine_tuned(tmp_path):
    url = f"sqlite:///{tmp_path}/lin.db"
    record(url, DEPTH_STUDY, LINEAR, None, "model.decoder_depth")
    rep = summarize(connect(url, create=False), "depth")
    md, tex = render_text(rep, "md"), render_text(rep, "latex")
    assert "linear val %" in md and "fine-tune" not in md.split("\n- ")[0] and "| 8 | 75.0 ± 1.0 (n=3) |" in md
    assert "fine-tune" not in tex.split(r"\midrule")[0] and "{lrrlrr}" in tex
    console = Console(width=200, record=True)
    render(rep, console)
    header = [line for line in console.export_text().splitlines() if "┃" in line]
    assert header and "linear" in "".join(header) and "fine" not in "".join(header)


def test_paper_matching_rules():
    fig5 = paper.get_table("fig5")
    comp = paper.compare(fig5, [(0.25,), (0.5,), (0.75,), (0.9,)], [40, 50, 60, 55], [70, 71, 72, 73])
    # 0.25 is not a plotted ratio whose label we have: it matches nothing (not the 10% point)
    assert [m and m.setting for m in comp.matches] == [None, None, "75%", None] == \
        [m and m.setting for m in comp.by_value]
    assert comp.agreement == {"linear": (None, 1), "finetune": (None, 1)}
    comp = paper.compare(fig5, [(0.1,), (0.75,)], [40, 60], [None, None])
    assert [m.lin for m in comp.by_value] == [54.6, 73.5] and comp.agreement["linear"] == (None, 2)  # rho needs 3
    t1f = paper.get_table("1f")
    comp = paper.compare(t1f, [("random", 0.75), ("block", 0.5), ("grid", 0.75)], [70, 69, 60], [None] * 3)
    assert comp.rule == "value" and [m.ft for m in comp.matches] == [84.9, 83.9, 84.0]
    assert comp.agreement["linear"] == (pytest.approx(1.0), 3)  # 70 > 69 > 60 like 73.5 > 72.3 > 66.0
    t1d = paper.get_table("1d")
    comp = paper.compare(t1d, [(False,), (True,)], [70, 71], [80, 79])
    assert comp.unmatched == ["PCA", "dVAE token"] and comp.agreement["finetune"] == (None, 2)
    assert paper.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_site_regenerates_from_trials_csv_byte_for_byte(depth_db, tmp_path):
    runner = CliRunner()
    site, again = tmp_path / "site", tmp_path / "again"
    site.mkdir()
    (site / "summary_intro.md").write_text("# Results\n\nWritten by hand.\n")
    res = runner.invoke(app, ["report", "--all", "--db", depth_db, "--out", str(site)])
    assert res.exit_code == 0, res.output
    first = tree(site)
    assert {"index.md", "summary.md", "trials.csv", "trials.json", "depth.md", "depth/loss.png"} <= set(first)
    summary = (site / "summary.md").read_text()
    assert summary.startswith("# Results\n\nWritten by hand.\n") and "| [depth](depth.md) | decoder_depth=8 | linear " \
        "| +3.0 [+0.5, +5.5] | 95% | +3.5 | reproduces (paired 95%, one look) | not detected | 3 | - |" in summary
    assert r"(paired 95%, one look; rules out \|Δ\| > 4.5) | not detected | 3 | - |" in summary  # a pipe, escaped
    assert "Compute: 12 trials done: " in (site / "depth.md").read_text()
    rows = list(csv.DictReader(io.StringIO((site / "trials.csv").read_text())))
    assert len(rows) == 12 and rows[0]["linear_val_top1"] == "0.58" and rows[0]["seed"] == "0"
    assert json.loads((site / "trials.json").read_text())["splits"]["linear_test_top1"] == "test"
    res = runner.invoke(app, ["report", "--from", str(site / "trials.csv"), "--all", "--out", str(again)])
    assert res.exit_code == 0, res.output
    assert tree(again) == first  # every page, plot, summary and the trials files themselves, without the database
    # one study, one format, from the file
    res = runner.invoke(app, ["report", "depth", "--from", str(site / "trials.csv"), "--format", "md"])
    assert res.exit_code == 0 and "| 4 | 70.0 ± 1.0 (n=3) | -2.0 [-4.5, +0.5] ≈ |" in res.output


def test_compute_spent_counts_cores_gpus_and_shared_work_once():
    def trial(status="done", reused=False, pre=120.0, lin=60.0, device="cpu", threads="2", world="1", name="Xeon",
              copied=False):
        return {"status": status, "pretrain_reused": reused, "result_copied": copied, "pretrain_wall_s": pre,
                "linear_wall_s": lin, "finetune_wall_s": None, "device": device, "cpu_threads": threads,
                "world_size": world, "device_name": name}
    trials = [trial(),                                 # 3 min x 2 threads = 6 core-minutes
              trial(reused=True, threads="1"),         # its pretraining was timed by another trial: 1 core-minute
              trial(world="2", threads="1"),           # 3 min x 2 processes x 1 thread = 6
              trial(device="cuda", threads=None, world="2", name="H100"),  # 3 min x 2 GPUs = 6 GPU-minutes
              trial(threads=None),                     # before schema 4: said apart, not guessed
              trial(status="failed"),                  # not counted
              trial(name="Xeon (AVX512, avx512_bf16)"),  # the same model, with the speed flags recorded: 6
              trial(reused=True, copied=True, name="Xeon (AVX512, avx512_bf16)")]  # a copied result: 0
    line = compute_spent([StudyRecords("s", "", None, "", trials)])
    assert line.startswith("7 trials done: 19 CPU core-minutes, 6 GPU-minutes, 3 process-minutes whose CPU "
                           "threads were not recorded")
    assert line.endswith("Per machine: H100, 1 trial: 6 GPU-minutes; "
                         "Xeon (AVX512, avx512_bf16), 2 trials: 6 CPU core-minutes; "
                         "Xeon (ISA flags not recorded), 4 trials: 13 CPU core-minutes, 3 process-minutes "
                         "whose CPU threads were not recorded (schema < 4).")


def test_a_trials_file_without_a_column_is_refused(depth_db, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["report", "--all", "--db", depth_db, "--out", str(tmp_path / "site")])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "site" / "trials.csv").read_text().splitlines()
    header = lines[0].split(",")
    drop = header.index("linear_val_top1")
    cut = tmp_path / "cut.csv"
    cut.write_text("\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines[:1])
                   + "\n")
    res = runner.invoke(app, ["report", "--from", str(cut), "--all", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "missing column 'linear_val_top1'" in res.output
    assert str(cut) in res.output and not (tmp_path / "out").exists()


# --- plots and reconstructions --------------------------------------------------------------------------------

def test_plots_are_pngs_of_the_expected_size(depth_db, tmp_path):
    engine = connect(depth_db, create=False)
    paths = study_plots(summarize(engine, "depth"), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["axis-decoder_depth.png", "compute.png", "loss.png"]
    for p in paths:
        kind = "axis" if p.name.startswith("axis") else p.stem
        assert png_size(p.read_bytes()) == SIZES[kind], p.name
    assert not [p for p in (tmp_path / "plots").iterdir() if p.suffix != ".png"]


class OracleMAE(MaskedAutoencoder):
    """A decoder that returns the target exactly (normalized per patch when norm_pix_loss)."""

    def forward(self, imgs, mask_ratio=None, noise=None, generator=None):
        _, mask, _ = self.forward_encoder(imgs, self.config.mask_ratio, noise=noise, generator=generator)
        target = self.patchify(imgs)
        if self.config.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return torch.zeros(()), target, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_an_oracle_decoder_reconstructs_the_original(norm_pix):
    model = OracleMAE(config_from_preset("vit_digits", norm_pix_loss=norm_pix))
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    imgs = torch.randn(4, 3, 8, 8) * 0.5
    r = reconstruct(model, imgs, mean, std)
    expected = (imgs * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(r.original, expected)
    torch.testing.assert_close(r.recon, r.original, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.pasted, r.original, atol=1e-5, rtol=0)
    removed = model.patchify(r.masked)[r.mask.bool()]
    assert torch.all(removed == 0.5) and r.mask.float().mean() == 0.75  # gray where removed
    # the same mask seed gives the same mask
    assert torch.equal(reconstruct(model, imgs, mean, std).mask, r.mask)


TINY = study_toml("tiny", study={"paper": "fig5", "seeds": [0, 1]}, model={"preset": "vit_digits", "mask_ratio": 0.75},
                  pretrain={"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
                  linear={"epochs": 1, "warmup_epochs": 0},
                  finetune={"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
                  tail='[grid]\n"model.mask_ratio" = [0.5, 0.75]\n')


def test_a_real_study_gives_pages_plots_and_reconstructions(workdir: Path):
    from mae_lab.run.runner import run_study
    from mae_lab.train.recon import save_trial_recon, val_images

    (workdir / "tiny.toml").write_text(TINY)
    assert run_study("tiny.toml", device="cpu").ok
    runner = CliRunner()
    res = runner.invoke(app, ["report", "--all", "--out", "docs/results"])
    assert res.exit_code == 0, res.output
    page = (workdir / "docs/results/tiny.md").read_text()
    assert "# tiny — paper Figure 5: mask ratio" in page and "| **0.75** (default) |" in page
    links = [line[line.index("(") + 1:-1] for line in page.splitlines() if line.startswith("![")]
    assert "tiny/axis-mask_ratio.png" in links and "tiny/loss.png" in links
    for link in links:
        assert png_size((workdir / "docs/results" / link).read_bytes())
    assert "[tiny](tiny.md)" in (workdir / "docs/results/index.md").read_text()
    # the committed per-trial data regenerate every page and plot (the reconstructions carried over) byte for byte
    res = runner.invoke(app, ["report", "--from", "docs/results/trials.csv", "--all", "--out", "regen"])
    assert res.exit_code == 0, res.output
    assert tree(workdir / "regen") == tree(workdir / "docs/results") and "tiny/recon.png" in tree(workdir / "regen")

    engine = connect("sqlite:///db/mae_lab.db", create=False)
    trials = [t for t, _ in study_trials(engine, get_study(engine, "tiny").id)]
    res = runner.invoke(app, ["show", trials[0].hash[:12], "--recon", "one.png"])
    assert res.exit_code == 0, res.output
    w1, h1 = png_size((workdir / "one.png").read_bytes())
    res = runner.invoke(app, ["show", trials[0].hash[:12], "--recon", "row.png", "--across", "mask_ratio"])
    assert res.exit_code == 0, res.output
    assert "mask_ratio=0.5" in res.output and "mask_ratio=0.75" in res.output
    w2, _ = png_size((workdir / "row.png").read_bytes())
    assert w2 > 1.8 * w1
    res = runner.invoke(app, ["show", trials[0].hash[:12], "--recon", "x.png", "--across", "depth"])
    assert res.exit_code == 2 and "has no axis 'depth'" in res.output

    # the runner's artifact: the same picture, its sha256 returned
    from mae_lab.data import resolve_dataset
    from mae_lab.study.expand import mae_config
    from mae_lab.study.spec import TrialSpec
    from mae_lab.train.checkpoint import load_checkpoint

    spec = TrialSpec.model_validate_json(trials[0].spec_json)
    model = MaskedAutoencoder(mae_config(spec))
    model.load_state_dict(load_checkpoint(get_checkpoint(engine, trials[0].pretrain_hash).path)["model"])
    info = resolve_dataset("digits")
    assert val_images(spec, info).shape == (8, 3, 8, 8)
    import hashlib

    sha = save_trial_recon(model, spec, info, workdir / "art.png")
    assert hashlib.sha256((workdir / "art.png").read_bytes()).hexdigest() == sha
    assert (workdir / "art.png").read_bytes() == (workdir / "one.png").read_bytes()


def test_the_summary_states_a_shared_control_from_the_records():
    from mae_lab.report.study_report import Row, StudyReport
    from mae_lab.report.summary import shared_control

    def study(name: str, default_hashes: list[str]) -> StudyReport:
        rows = [Row("d", {}, trials=default_hashes, is_default=True), Row("p", {}, trials=[name + "-p"])]
        return StudyReport(name, "", None, [], rows)

    one = shared_control([study("a", ["h0", "h1"]), study("b", ["h0", "h1"]), study("c", ["x0"])])
    assert one.startswith("One shared control: the default arms of 2 studies (a, b) are the same trials, one per "
                          "seed (2 trials whose hash appears in 2 to 2 studies")
    assert shared_control([study("a", ["h0"]), study("c", ["x0"])]).startswith("No two studies here share")
