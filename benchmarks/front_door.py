"""Wall time of the front door: `mae-lab --help`, `list`, `report` and `validate`, this checkout against another.

    git worktree add /tmp/before 620180e          # the commit before the torch-free front door
    python benchmarks/front_door.py --before /tmp/before [--rounds 7] [--commands dry-run,validate-grid]

Each command runs as a fresh `python cli.py ...` in each checkout, interleaved round by round (after one warm-up run
each, which also builds the digits cache); the table gives medians and minima, and whether the command imported
torch. `list` and `report` read a study that each checkout records into its own SQLite file through
its own mae_lab.store.
`dry-run` and `validate-grid` take GRID: 5,000 grid points x 2 seeds = 10,000 trials (`--allow-large-grid`).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
RECORD = """import sys
try:
    from mae_lab.store.engine import connect
    from mae_lab.store.reads import study_trials
    from mae_lab.store.writes import finish_trial, sync_study
except ImportError:  # a checkout from before mae_lab/store/db.py was split
    from mae_lab.store.db import connect, finish_trial, study_trials, sync_study
from mae_lab.study.expand import expand
from mae_lab.study.spec import parse_study
try:
    from mae_lab.study.planning import trial_rows
except ImportError:  # a checkout from before mae_lab/study/planning.py
    from mae_lab.run.runner import trial_rows
text = open("studies/quickstart.toml").read()
study = parse_study(text, "quickstart.toml")
try:
    from mae_lab.study.identity import RunContext, bind
    trials = [bind(t, RunContext(precision="fp32")) for t in expand(study)]
except ImportError:  # a checkout from before expansion left hashing to the run's context
    trials = expand(study)
engine = connect(sys.argv[1])
row = sync_study(engine, name=study.study.name, description="", paper=study.study.paper, path="q.toml",
                 spec_text=text, spec_hash="x", trials=trial_rows(study, trials))
for i, (trial, _) in enumerate(study_trials(engine, row.id)):
    finish_trial(engine, trial.id, "done", result={"linear_top1": 0.5 + 0.01 * i, "pretrain_wall_s": 1.0})
"""
GRID = """[study]
name = "grid"
seeds = [0, 1]
[model]
preset = "vit_digits"
[grid]
"model.mask_ratio" = [0.5, 0.6, 0.7, 0.75, 0.8]
"pretrain.base_lr" = [1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]
"pretrain.weight_decay" = [0.0, 0.01, 0.05, 0.1, 0.2]
"eval.linear.epochs" = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
"model.norm_pix_loss" = [true, false]
"""
PROBE = ("import sys, runpy\nsys.argv = ['mae-lab', *sys.argv[1:]]\n"
         "try:\n    runpy.run_path('cli.py', run_name='__main__')\n"
         "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)\n")


def run(tree: Path, args: list[str]) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{tree}: mae-lab {' '.join(args)} failed: {res.stderr.strip().splitlines()[-2:]}")
    return wall, res.stderr.strip().endswith("TORCH") and not res.stderr.strip().endswith("NO TORCH")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--commands", default="--help,list,report,validate,dry-run,validate-grid",
                    help="which commands, comma-separated")
    a = ap.parse_args()
    trees = {"before": a.before.resolve(), "after": HERE}
    tmp = Path(tempfile.mkdtemp(prefix="front-door-"))
    urls = {}
    for name, tree in trees.items():
        urls[name] = f"sqlite:///{tmp}/{name}.db"
        subprocess.run([sys.executable, "-c", RECORD, urls[name]], cwd=tree, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    (tmp / "grid.toml").write_text(GRID)
    grid = ["--allow-large-grid", "--device", "cpu"]
    commands = {"--help": ["--help"], "list": ["list", "--db", "{url}"],
                "report": ["report", "quickstart", "--db", "{url}"],
                "validate": ["validate", "studies/quickstart.toml"],
                "dry-run": ["run", str(tmp / "grid.toml"), "--dry-run", *grid, "--db", "{url}"],
                "validate-grid": ["validate", str(tmp / "grid.toml"), "--allow-large-grid"]}
    commands = {k: v for k, v in commands.items() if k in a.commands.split(",")}
    times: dict[tuple[str, str], list[float]] = {}
    torch_seen: dict[tuple[str, str], bool] = {}
    for cmd, args in commands.items():
        for name, tree in trees.items():  # warm-up: .pyc files, the digits cache
            run(tree, [x.format(url=urls[name]) for x in args])
        for _ in range(a.rounds):
            for name, tree in trees.items():
                wall, torch = run(tree, [x.format(url=urls[name]) for x in args])
                times.setdefault((cmd, name), []).append(wall)
                torch_seen[(cmd, name)] = torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    print(f"{cpu}; {os.cpu_count()} cores; avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}; "
          f"load average {os.getloadavg()[0]:.1f}; {a.rounds} rounds; Python {platform.python_version()}")
    print("| command | before median (min) | after median (min) | before imports torch | after imports torch |")
    print("|:---|---:|---:|:---:|:---:|")
    for cmd in commands:
        b, f = times[(cmd, "before")], times[(cmd, "after")]
        label = {"dry-run": "run GRID --dry-run", "validate-grid": "validate GRID"}.get(cmd, cmd)
        print(f"| `mae-lab {label}` | {statistics.median(b):.2f} s ({min(b):.2f}) | {statistics.median(f):.2f} s "
              f"({min(f):.2f}) | {'yes' if torch_seen[(cmd, 'before')] else 'no'} | "
              f"{'yes' if torch_seen[(cmd, 'after')] else 'no'} |")


if __name__ == "__main__":
    main()
