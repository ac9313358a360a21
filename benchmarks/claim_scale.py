"""How many workers one PostgreSQL serves: database-only workers claim, heartbeat and finish trivial trials through
mae-lab's queue (store.queue / store.writes, exactly the calls a worker makes per trial), and Optuna search
processes ask and tell on one RDB storage. Not a test: it prints claims/s, claim latency (p50, p99), duplicates
(must be 0) and errors.

    source .ci/pg.sh && pg_start        # or any server URL whose user may create databases
    python benchmarks/claim_scale.py --url "$MAE_LAB_TEST_PG" [--workers 64 --trials 10000 --optuna-workers 16
                                                               --optuna-trials 2000]

Each part runs in a fresh database (created and dropped here). Workers are forked processes that start at one
barrier; each trial is claim_next -> heartbeat -> finish_trial (3 transactions, the fenced ones locking the row).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import time
import uuid
from collections import Counter

import optuna
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from mae_lab.store.engine import connect
from mae_lab.store.optuna_storage import storage
from mae_lab.store.queue import LostClaim, claim_next, claim_of, has_runnable, heartbeat
from mae_lab.store.writes import finish_trial, sync_study


def fresh_database(server: str) -> tuple[str, str]:
    name = f"mae_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(server).set(database=name).render_as_string(hide_password=False)


def drop_database(server: str, name: str) -> None:
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


# --- mae-lab's queue -------------------------------------------------------------------------------------------

def race(target, args: tuple, workers: int) -> tuple[list, float]:
    """Start ``workers`` forked processes of ``target(*args, start, out)``, release them together through a barrier,
    and return (each one's report, wall seconds from the release to the last report)."""
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    reports = [out.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return reports, wall


def queue_worker(url: str, study_id: int, start, out) -> None:
    engine = connect(url, create=False)
    claims, latencies, errors = [], [], []
    start.wait()
    while True:
        t = time.perf_counter()
        try:
            row = claim_next(engine, study_id)
            latencies.append(time.perf_counter() - t)
            if row is None:
                if has_runnable(engine, study_id):
                    continue
                break
            claims.append(row.id)
            claim = claim_of(row)
            heartbeat(engine, claim, "step 1")
            finish_trial(engine, row.id, "done", result={"linear_top1": 0.5}, claim=claim)
        except (LostClaim, Exception) as exc:  # noqa: BLE001 - counted and shown
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    engine.dispose()
    out.put((claims, latencies, errors))


def bench_queue(server: str, workers: int, trials: int) -> dict:
    name, url = fresh_database(server)
    try:
        engine = connect(url)
        study = sync_study(engine, name="bench", description="", paper=None, path="bench.toml", spec_text="",
                           spec_hash="x", trials=[{"hash": f"h{i}", "pretrain_hash": f"p{i}", "seed": 0, "label": "",
                                                   "axes_json": "{}", "spec_json": "{}"} for i in range(trials)])
        engine.dispose()
        reports, wall = race(queue_worker, (url, study.id), workers)
        rows = create_engine(url)
        with rows.connect() as c:
            sql = "SELECT status || '/' || attempts, count(*) FROM mae_trials GROUP BY 1"
            states = {k: n for k, n in c.execute(text(sql))}
        rows.dispose()
    finally:
        drop_database(server, name)
    claims = [i for r in reports for i in r[0]]
    latencies = [x for r in reports for x in r[1]]
    errors = [e for r in reports for e in r[2]]
    return {"wall_s": wall, "trials_per_s": len(claims) / wall, "claims": len(claims),
            "duplicates": sum(k - 1 for k in Counter(claims).values() if k > 1), "errors": len(errors),
            "first_error": errors[:1], "states": states, "p50_ms": 1000 * pct(latencies, 0.5),
            "p99_ms": 1000 * pct(latencies, 0.99)}


# --- Optuna ask/tell -------------------------------------------------------------------------------------------

def optuna_worker(url: str, n: int, start, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="bench", storage=storage(url), sampler=optuna.samplers.RandomSampler())
    numbers, latencies, errors = [], [], []
    start.wait()
    for _ in range(n):
        t = time.perf_counter()
        try:
            trial = study.ask()
            x = trial.suggest_float("x", 0.0, 1.0)
            study.tell(trial, x)
            numbers.append(trial.number)
            latencies.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 - counted and shown ("Trial ... has already finished" etc.)
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    out.put((numbers, latencies, errors))


def bench_optuna(server: str, workers: int, trials: int) -> dict:
    name, url = fresh_database(server)
    try:
        optuna.create_study(study_name="bench", storage=storage(url), direction="maximize")
        reports, wall = race(optuna_worker, (url, trials // workers), workers)
        done = optuna.load_study(study_name="bench", storage=storage(url)).get_trials(deepcopy=False)
    finally:
        drop_database(server, name)
    numbers = [i for r in reports for i in r[0]]
    latencies = [x for r in reports for x in r[1]]
    errors = [e for r in reports for e in r[2]]
    return {"wall_s": wall, "trials_per_s": len(numbers) / wall, "told": len(numbers),
            "duplicates": sum(k - 1 for k in Counter(numbers).values() if k > 1), "errors": len(errors),
            "first_error": errors[:1], "complete": sum(1 for t in done if t.state.name == "COMPLETE"),
            "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("MAE_LAB_TEST_PG"), help="PostgreSQL server URL")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--optuna-workers", type=int, default=16)
    ap.add_argument("--optuna-trials", type=int, default=2_000)
    args = ap.parse_args()
    if not args.url:
        ap.error("--url (or MAE_LAB_TEST_PG) is required")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores (server, workers and this driver on the same cores)")
    q = bench_queue(args.url, args.workers, args.trials)
    print(f"mae-lab queue, {args.workers} workers x {args.trials} trials (claim -> heartbeat -> finish): "
          f"{q['trials_per_s']:.0f} trials/s in {q['wall_s']:.1f} s; claim p50 {q['p50_ms']:.1f} ms, "
          f"p99 {q['p99_ms']:.1f} ms; duplicates {q['duplicates']}; errors {q['errors']} {q['first_error']}; "
          f"rows {q['states']}")
    o = bench_optuna(args.url, args.optuna_workers, args.optuna_trials)
    print(f"Optuna ask/tell, {args.optuna_workers} processes x {args.optuna_trials} trials (RandomSampler): "
          f"{o['trials_per_s']:.0f} trials/s in {o['wall_s']:.1f} s; ask+tell p50 {o['p50_ms']:.1f} ms, "
          f"p99 {o['p99_ms']:.1f} ms; duplicate numbers {o['duplicates']}; errors {o['errors']} "
          f"{o['first_error']}; complete {o['complete']}")


if __name__ == "__main__":
    main()
