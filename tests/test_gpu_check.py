"""benchmarks/gpu_check.sh and gpu.py on the CPU (issue 29): the one command for a lent GPU runs its preflight, the
CUDA tests (skipped here) and the benchmark at toy size, writing everything under $OUT; a variant that fails leaves
the others' numbers; without transformers the HF variants are skipped and said so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

GPU_PY = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step_and_writes_under_out(tmp_path: Path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"], env=_env(OUT=str(out)),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    log = (out / "gpu_check.log").read_text()
    for line in ("== preflight", "triton: not checked (no CUDA)", "== CUDA tests", "skipped", "== benchmark",
                 "mae-lab bf16 compiled", "PASS; output in"):
        assert line in log, line
    rows = [json.loads(r) for r in (out / "gpu.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["hf bf16", "hf bf16 compiled", "hf fp16", "mae-lab bf16",
                                                  "mae-lab bf16 compiled"]
    assert all("error" not in r and r["images_per_s"] > 0 for r in rows), rows
    assert "attn_implementation='sdpa'" in rows[0]["note"] and (out / "test_cuda.xml").exists()


def test_a_failing_variant_leaves_the_others_numbers(tmp_path: Path):
    """An unknown compile backend fails the compiled variant, run first; the eager one after it is still timed."""
    rows_file = tmp_path / "rows.jsonl"
    p = subprocess.run(GPU_PY + ["--only", "mae-lab bf16 compiled,mae-lab bf16", "--backend", "no_such_backend",
                                 "--json", str(rows_file)], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "mae-lab bf16 compiled    FAILED:" in p.stdout and "failed: mae-lab bf16 compiled" in p.stdout
    first, second = [json.loads(r) for r in rows_file.read_text().splitlines()]
    assert "no_such_backend" in first["error"] and second["images_per_s"] > 0 and "error" not in second


def test_without_transformers_the_hf_variants_are_skipped(tmp_path: Path):
    shadow = tmp_path / "shadow" / "transformers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('transformers is not installed here')\n")
    p = subprocess.run(GPU_PY + ["--only", "hf bf16,mae-lab bf16"],
                       env=_env(PYTHONPATH=f"{shadow.parent}:{REPO}"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "transformers is not installed: the HF variants are skipped" in p.stdout
    assert "mae-lab bf16 " in p.stdout and "hf bf16 " not in p.stdout.split("variant")[-1]
