"""The published CIFAR-10 pages (docs/results/) are what `mae-lab report --from docs/results/trials.csv --all`
computes, with no database: every Markdown page, the trials files and the summary equal byte for byte, and every plot
equals in its decoded pixels within a small tolerance (another matplotlib or FreeType may move an antialiased edge;
a moved point or line changes far more). Files the report carries over from the source folder instead of computing
(each study's recon.png, which needs checkpoints, and the hand-kept summary_intro.md) are checked to be there, not
compared: comparing a copy with its source tests nothing."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cli import app

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
COPIED = ("recon.png", "summary_intro.md")  # carried over from the source folder (report/site.py: _recon, INTRO)
MAX_CHANGED = 0.002  # at most this fraction of a plot's pixels may differ by more than 10% of full scale


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.float64) / 255.0  # (H, W, 4)


def changed_fraction(a: bytes, b: bytes) -> float:
    """The fraction of pixels where any channel differs by more than 0.1 (1.0 when the sizes differ)."""
    pa, pb = pixels(a), pixels(b)
    if pa.shape != pb.shape:
        return 1.0
    return float((np.abs(pa - pb).max(axis=-1) > 0.1).mean())


def test_the_committed_results_are_what_the_report_computes(tmp_path):
    out = tmp_path / "site"
    res = CliRunner().invoke(app, ["report", "--from", str(RESULTS / "trials.csv"), "--all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    committed, again = tree(RESULTS), tree(out)
    assert sorted(again) == sorted(committed)  # no page missing, none left over from an older release
    computed = [name for name in committed if Path(name).name not in COPIED]
    assert len(computed) >= 40 and any(n.endswith(".png") for n in computed)
    text = [n for n in computed if not n.endswith(".png")]
    assert {Path(n).suffix for n in text} == {".md", ".csv", ".json"}
    assert [n for n in text if again[n] != committed[n]] == []
    plots = {n: changed_fraction(again[n], committed[n]) for n in computed if n.endswith(".png")}
    assert {n: f for n, f in plots.items() if f > MAX_CHANGED} == {}


def test_a_changed_result_changes_a_plot_beyond_the_tolerance(tmp_path):
    """The tolerance is not so wide that a real change passes: one trial's top-1 moved by 5 points."""
    import csv

    rows = list(csv.DictReader((RESULTS / "trials.csv").open(encoding="utf-8")))
    row = next(r for r in rows if r["study"] == "mask_ratio" and r["linear_val_top1"])
    row["linear_val_top1"] = str(float(row["linear_val_top1"]) + 0.05)
    src = tmp_path / "src"
    src.mkdir()
    with (src / "trials.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "site"
    res = CliRunner().invoke(app, ["report", "--from", str(src / "trials.csv"), "--all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    name = "mask_ratio/axis-mask_ratio.png"
    assert changed_fraction((out / name).read_bytes(), (RESULTS / name).read_bytes()) > MAX_CHANGED
