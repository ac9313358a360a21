"""The house: no import cycles in mae_lab, imports that run one way between its layers, a lean runner, a torch-free
front door (--help, validate, list, report), the user's own arguments forwarded to torchrun, one-line errors for what
cannot work, and texts that survive Rich and pipes."""
import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer
from conftest import bound
from rich.console import Console
from typer.testing import CliRunner

import cli
from mae_lab.run.progress import make_display
from mae_lab.store.engine import connect
from mae_lab.store.reads import study_trials
from mae_lab.store.writes import finish_trial, sync_study
from mae_lab.study.expand import expand
from mae_lab.study.planning import trial_rows
from mae_lab.study.spec import parse_study

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "torchvision", "webdataset", "ray")

# --- the module graph -----------------------------------------------------------------------------------------


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, at the top or inside functions, read from the source."""
    mods = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` above this one
                    parts = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, each as the modules along it (first == last)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from .a import f\n")
    graph = import_graph(pkg)
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []


def test_mae_lab_has_no_import_cycles():
    graph = import_graph(ROOT / "mae_lab")
    assert "mae_lab.report.study_report" in graph and "mae_lab.report.plots" in graph
    assert cycles(graph) == []
    # plots depend on the report model, not back
    assert "mae_lab.report.plots" not in graph["mae_lab.report.study_report"]


# layer -> the layers it may import besides itself and the root leaves (atomic, rng, rng_streams): imports run one
# way, cli -> run -> {train, report} -> study -> {data, store}; train and report never import each other, nor data
# and store; training stages never touch the database
LAYERS = {"run": {"train", "report", "study", "data", "store"}, "train": {"study", "data"},
          "report": {"study", "data", "store"}, "study": {"data", "store"}, "data": set(), "store": set(), "": set()}


def layer(module: str) -> str:
    """``pkg.train.model`` -> "train"; a root leaf (``pkg.atomic``) or the package itself -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else ""


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a layer its importer may not use, as "importer -> imported"."""
    return [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
            if layer(d) != layer(m) and layer(d) and layer(d) not in LAYERS[layer(m)]]


def test_the_layer_check_finds_a_backward_import(tmp_path):
    pkg = tmp_path / "pkg"
    for folder in ("", "train", "store", "report", "study", "run"):
        (pkg / folder).mkdir(exist_ok=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "atomic.py").write_text("")
    (pkg / "store" / "db.py").write_text("from pkg import atomic\n")
    (pkg / "study" / "spec.py").write_text("from pkg.store import db\n")
    (pkg / "run" / "runner.py").write_text("from pkg.study import spec\nfrom pkg.report import site\n")
    (pkg / "report" / "site.py").write_text("def f():\n    from pkg.store.db import x\n")
    assert backward_imports(import_graph(pkg)) == []
    (pkg / "train" / "weights.py").write_text("from pkg.store import db\n")  # a training stage on the database
    (pkg / "report" / "site.py").write_text("def f():\n    from pkg.run.runner import x\n")  # up, in a function
    assert backward_imports(import_graph(pkg)) == [
        "pkg.report.site -> pkg.run.runner", "pkg.train.weights -> pkg.store", "pkg.train.weights -> pkg.store.db"]


def test_imports_run_one_way():
    graph = import_graph(ROOT / "mae_lab")
    assert {layer(m) for m in graph} == set(LAYERS)
    assert backward_imports(graph) == []


def test_the_runner_loads_neither_optuna_nor_the_report():
    """A worker imports what trains and records, not the search's Optuna (seconds) nor the pages."""
    code = ("import sys, mae_lab.run.runner\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'optuna' "
            "or m.startswith('mae_lab.report')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


# --- the front door -------------------------------------------------------------------------------------------

STUDY = """# mae-lab run tiny.toml
[study]
name = "tiny"
seeds = [0, 1]

[model]
preset = "vit_digits"

[grid]
"model.mask_ratio" = [0.5, 0.75]
"""


@pytest.fixture
def recorded(tmp_path) -> str:
    """A study with results, written through db.py into a real SQLite file (no training)."""
    url = f"sqlite:///{tmp_path}/house.db"
    study = parse_study(STUDY, "tiny.toml")
    engine = connect(url)
    row = sync_study(engine, name="tiny", description="", paper=None, path="tiny.toml", spec_text=STUDY,
                        spec_hash="x", trials=trial_rows(study, bound(expand(study))))
    for i, (trial, _) in enumerate(study_trials(engine, row.id)):
        finish_trial(engine, trial.id, "done", result={"linear_top1": 0.5 + 0.01 * i, "pretrain_wall_s": 1.0})
    return url


def front_door(tmp_path: Path, *args: str) -> tuple[int, str, list[str]]:
    """Run ``mae-lab ARGS`` in a fresh interpreter: (exit code, stdout, the heavy modules it imported)."""
    probe = tmp_path / "modules.json"
    program = (f"import json, sys\nsys.argv = ['mae-lab', *{list(args)!r}]\nfrom cli import app\ncode = 0\n"
               "try:\n    app()\nexcept SystemExit as e:\n    code = e.code or 0\n"
               f"json.dump([code, [m for m in {HEAVY!r} if m in sys.modules]], open({str(probe)!r}, 'w'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("MAE_LAB_DB", None)
    res = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    code, heavy = json.loads(probe.read_text())
    return code, res.stdout, heavy


@pytest.mark.parametrize("command", ["help", "list", "report", "report-md"])
def test_the_front_door_imports_no_torch(tmp_path, recorded, command):
    args = {"help": ["--help"], "list": ["list", "--db", recorded], "report": ["report", "tiny", "--db", recorded],
            "report-md": ["report", "tiny", "--db", recorded, "--format", "md"]}[command]
    code, stdout, heavy = front_door(tmp_path, *args)
    assert code == 0, stdout
    assert {"help": "validate", "list": "tiny", "report": "mask_ratio", "report-md": "| mask_ratio"}[command] in stdout
    assert heavy == []


@pytest.mark.parametrize("command", ["validate", "dry-run"])
def test_validate_and_a_dry_run_import_no_torch(workdir, command):
    """Resolving and checking the data (dataset.json, counts, checksums, every image decoded once by PIL) and the
    hashes a dry run prints need no torch. (Only packing the embedded digits on first use does: webdataset's
    writer imports it; `workdir` brings the packed copy.) ``--device cpu``: with "auto" on a machine with a GPU
    driver, torch is asked whether CUDA serves it."""
    study = str(ROOT / "studies" / "quickstart.toml")
    args = ["validate", study] if command == "validate" else ["run", study, "--dry-run", "--device", "cpu"]
    code, stdout, heavy = front_door(workdir, *args)
    assert code == 0 and ("ok" in stdout if command == "validate" else "pending" in stdout), stdout
    assert heavy == []


# --- torchrun forwarding --------------------------------------------------------------------------------------

def test_torchrun_gets_the_users_own_arguments_minus_nproc(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text(STUDY)
    argv = [str(study), "--db", "sqlite:///a b.db", "--nproc", "2", "--data", "train=x-{0..3}.tar,val=y.tar",
            "--nproc=4", "--rerun", "--max-trials", "1"]
    assert cli.torchrun_argv(argv, study) == [str(study), "--db", "sqlite:///a b.db", "--data",
                                              "train=x-{0..3}.tar,val=y.tar", "--rerun", "--max-trials", "1"]


def test_an_option_added_to_run_later_is_forwarded_unchanged(tmp_path):
    """The run command keeps the argument vector click parsed, so an option nobody taught the forwarding reaches
    torchrun's processes as the user typed it."""
    study = tmp_path / "s.toml"
    study.write_text(STUDY)
    later = typer.Typer()

    @later.command()
    def knob(brand_new: Annotated[Optional[int], typer.Option("--brand-new")] = None):  # a new option, made by Typer
        pass

    run = typer.main.get_command(cli.app).commands["run"]
    run.params += [p for p in typer.main.get_command(later).params if p.name == "brand_new"]
    ctx = run.make_context("run", [str(study), "--brand-new", "7", "--nproc", "2", "--device", "cpu"])
    assert ctx.params["brand_new"] == 7 and ctx.params["nproc"] == 2
    assert cli.torchrun_argv(ctx.meta["argv"], study) == [str(study), "--brand-new", "7", "--device", "cpu"]


def one_error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_nproc_refuses_a_study_its_processes_cannot_read_again(tmp_path):
    fifo = tmp_path / "study.toml"
    os.mkfifo(fifo)
    url = f"sqlite:///{tmp_path}/never.db"
    line = one_error_line(CliRunner().invoke(cli.app, ["run", str(fifo), "--nproc", "2", "--db", url]))
    assert line.startswith("error: --nproc:") and str(fifo) in line
    assert not (tmp_path / "never.db").exists()


def test_a_postgresql_url_without_psycopg_is_one_line(tmp_path):
    program = ("import sys\nsys.modules['psycopg'] = None  # as if mae-lab[postgres] were not installed\n"
               "sys.argv = ['mae-lab', 'list', '--db', 'postgresql://mae@127.0.0.1:9/mae']\n"
               "from cli import app\napp()\n")
    res = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "error: database postgresql://mae@127.0.0.1:9/mae needs the Python package 'psycopg' "
        "(pip install 'mae-lab[postgres]')"]


# --- texts ----------------------------------------------------------------------------------------------------

def test_help_keeps_the_search_table_name():
    res = CliRunner().invoke(cli.app, ["--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "search over STUDY's [search] space" in res.output


def test_plain_trial_lines_do_not_wrap_in_a_narrow_pipe():
    buf = io.StringIO()
    display = make_display(Console(file=buf, width=40, highlight=False))  # not a terminal: plain lines
    line = "  8b26914b mask_ratio=0.25: done, linear 78.3%, finetune 91.0%, pretrain 58s"
    display.trial_end(line)
    display.epoch("pretrain", 3, 40, {"loss": 1.06, "lr": 0.000545, "images_per_s": 1338.0})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith(line)
    assert lines[1].endswith("pretrain epoch 3/40 loss=1.06 lr=0.000545 img/s=1338")
