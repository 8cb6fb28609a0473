"""Point-in-time join benchmark: the platform's Ray operator vs pandas merge_asof vs DuckDB.

    python benchmarks/pit_join.py                                   # 1M entities x 10M rows/view, 1 and 3 views
    python benchmarks/pit_join.py --entities 20000 --feature-rows 200000   # smoke run, seconds

Data is generated once and written as Parquet to a temporary directory (or ``--data-dir``);
then every engine reads that Parquet and joins, each in its own fresh child process:

* ``platform``: ``ray.data.read_parquet`` + ``point_in_time_join`` on a local Ray started with
  ``num_cpus=2``. Ray's start-up is not timed, and a tiny join runs first so that worker
  processes and Ray Data's helper actors are up, as on a long-lived cluster; reading,
  shuffling and joining are timed, until the materialized result is in the object store.
* ``platform-v1``: the same with Ray Data's older (V1) Parquet reader
  (``DataContext.use_datasource_v2 = False``), which on a small cluster costs far less CPU than
  the default V2 reader's per-read footer-reader actor pool.
* ``pandas``: ``read_parquet``, sort, ``merge_asof(by=key, tolerance=ttl)`` per view, result in
  memory (single-threaded join; Arrow reads with threads).
* ``duckdb``: ``ASOF LEFT JOIN`` per view over ``read_parquet``, ``threads=2``, result fetched
  as an Arrow table; the ttl is applied with ``CASE`` on the matched event time.

All three use the same semantics for this data: same key, latest ``event_ts <= ts``, no
older than the ttl (inclusive), no as-known-at filter. Ties on event time are broken
differently (DuckDB arbitrarily), which the data makes rare; the per-column match counts
are printed so the engines can be checked against each other.

Memory: the parent samples the proportional set size (PSS; shared pages split between the
processes that map them, so Ray's shared-memory object store is counted once) of the child's
whole process tree — for the platform that includes Ray's GCS, raylet and workers — four
times a second, and reports the peak and the tree's PSS just before timing started.

CPU: user + system seconds of the child's process tree while the clock ran (read with psutil
at the start and end), so a run on a busy machine can still be compared by work done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TTL = timedelta(days=30)
YEAR_US = 365 * 24 * 3600 * 1_000_000
START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
ENGINES = ("platform", "platform-v1", "pandas", "duckdb")


# ---------------------------------------------------------------------------------------------
# Data


def view_specs(n_views: int) -> list[dict]:
    """View i is keyed by applicant (even i) or merchant (odd i): several shuffles when > 1."""
    return [
        {"name": f"view{i}", "key": "applicant_id" if i % 2 == 0 else "merchant_id", "features": [f"v{i}_a", f"v{i}_b"]}
        for i in range(n_views)
    ]


def generate(data_dir: Path, entities: int, feature_rows: int, views: int, applicants: int, merchants: int,
             files: int) -> None:
    marker = data_dir / "spec.json"
    spec = {"entities": entities, "feature_rows": feature_rows, "views": views, "applicants": applicants,
            "merchants": merchants, "files": files}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        print(f"reusing data in {data_dir}", flush=True)
        return
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    rng = np.random.default_rng(42)
    ts = pa.timestamp("us", tz="UTC")

    def write(name: str, table: pa.Table) -> None:
        folder = data_dir / name
        folder.mkdir()
        step = -(-table.num_rows // files)
        for i in range(files):
            pq.write_table(table.slice(i * step, step), folder / f"part-{i:03d}.parquet", row_group_size=1 << 20)

    t0 = time.perf_counter()
    second = 1_000_000
    write("entities", pa.table({
        "applicant_id": rng.integers(0, applicants, entities),
        "merchant_id": rng.integers(0, merchants, entities),
        "ts": pa.array(START_US + rng.integers(0, YEAR_US // second, entities) * second, pa.int64()).cast(ts),
        "amount": rng.random(entities) * 1000,
    }))
    for spec_ in view_specs(views):
        event = START_US + rng.integers(-30 * 86_400, YEAR_US // second, feature_rows) * second
        n_keys = applicants if spec_["key"] == "applicant_id" else merchants
        a, b = spec_["features"]
        write(spec_["name"], pa.table({
            spec_["key"]: rng.integers(0, n_keys, feature_rows),
            "event_ts": pa.array(event, pa.int64()).cast(ts),
            "created_ts": pa.array(event + rng.integers(0, 7200, feature_rows) * second, pa.int64()).cast(ts),
            a: rng.random(feature_rows),
            b: rng.integers(0, 100, feature_rows),
        }))
    marker.write_text(json.dumps(spec))
    print(f"generated data in {data_dir} in {time.perf_counter() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------------------------------------
# Engines (each runs in its own child process; prints one JSON line)


def run_platform(data_dir: Path, views: int, num_partitions: int | None, parquet_v2: bool = True) -> dict:
    import ray

    from mlplatform.features.pit_join import ViewJoin, point_in_time_join

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.use_datasource_v2 = parquet_v2
        _warm_up(ray, ViewJoin, point_in_time_join)
        _ready()
        t0 = time.perf_counter()
        joins = [
            ViewJoin(s["name"], (s["key"],), ray.data.read_parquet(str(data_dir / s["name"])), "event_ts",
                     "created_ts", tuple(s["features"]), TTL)
            for s in view_specs(views)
        ]
        out = point_in_time_join(ray.data.read_parquet(str(data_dir / "entities")), joins, entity_ts="ts",
                                 num_partitions=num_partitions)
        refs = out.to_arrow_refs()
        wall = time.perf_counter() - t0

        @ray.remote
        def counts(table: pa.Table) -> dict:
            return {"rows": table.num_rows, **{c: table.num_rows - table.column(c).null_count for c in _features(views)}}

        parts = ray.get([counts.remote(r) for r in refs])
        return {"wall_s": wall, **{k: sum(p[k] for p in parts) for k in parts[0]}, "blocks": len(refs)}
    finally:
        ray.shutdown()


def _warm_up(ray, ViewJoin, point_in_time_join) -> None:
    """Start what a long-lived cluster already has running before the clock starts: worker
    processes, Ray Data's helper actors, the operator's remote functions. A tiny join does it."""
    with tempfile.TemporaryDirectory() as tmp:
        ts = pa.array([START_US], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        pq.write_table(pa.table({"k": [1], "event_ts": ts, "v": [1.0]}), f"{tmp}/f.parquet")
        pq.write_table(pa.table({"k": [1], "ts": ts}), f"{tmp}/e.parquet")
        view = ViewJoin("w", ("k",), ray.data.read_parquet(f"{tmp}/f.parquet"), "event_ts", None, ("v",), None)
        out = point_in_time_join(ray.data.read_parquet(f"{tmp}/e.parquet"), [view], entity_ts="ts")
        ray.get(out.to_arrow_refs())


def run_pandas(data_dir: Path, views: int) -> dict:
    import pandas as pd

    _ready()
    t0 = time.perf_counter()
    out = pd.read_parquet(data_dir / "entities").sort_values("ts", kind="stable")
    for s in view_specs(views):
        right = pd.read_parquet(data_dir / s["name"])
        # merge_asof takes the last of equal event times: sort created ascending to match.
        right = right.sort_values(["event_ts", "created_ts"], kind="stable").drop(columns="created_ts")
        out = pd.merge_asof(out, right, left_on="ts", right_on="event_ts", by=s["key"], direction="backward",
                            tolerance=pd.Timedelta(TTL), allow_exact_matches=True).drop(columns="event_ts")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": len(out), **{c: int(out[c].notna().sum()) for c in _features(views)}}


def run_duckdb(data_dir: Path, views: int) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    specs = view_specs(views)
    select = ["e.*"]
    joins = []
    for i, s in enumerate(specs):
        for c in s["features"]:
            select.append(f"CASE WHEN f{i}.event_ts >= e.ts - INTERVAL {TTL.days} DAY THEN f{i}.{c} END AS {c}")
        joins.append(
            f"ASOF LEFT JOIN read_parquet('{data_dir / s['name']}/*.parquet') f{i} "
            f"ON e.{s['key']} = f{i}.{s['key']} AND e.ts >= f{i}.event_ts"
        )
    sql = f"SELECT {', '.join(select)} FROM read_parquet('{data_dir / 'entities'}/*.parquet') e " + " ".join(joins)
    _ready()
    t0 = time.perf_counter()
    out = con.sql(sql).to_arrow_table()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rows": out.num_rows, **{c: out.num_rows - out.column(c).null_count for c in _features(views)}}


def _features(views: int) -> list[str]:
    return [c for s in view_specs(views) for c in s["features"]]


def _ready() -> None:
    """Tell the parent the clock is about to start, so it records the baseline memory and CPU."""
    print("READY", flush=True)
    sys.stdin.readline()


def _report(result: dict) -> None:
    """Hand the result to the parent and wait until it has read the process tree's CPU time."""
    print(json.dumps(result), flush=True)
    sys.stdin.readline()


# ---------------------------------------------------------------------------------------------
# Parent: run each engine in a child, sample the child's process-tree memory.


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_pss(pid: int) -> int:
    import psutil

    total = 0
    for p in _tree(pid):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def _tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each live process in the tree, by pid."""
    import psutil

    out = {}
    for p in _tree(pid):
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def measure(engine: str, data_dir: Path, views: int, num_partitions: int | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--data-dir", str(data_dir), "--views", str(views)]
    if num_partitions:
        cmd += ["--num-partitions", str(num_partitions)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    state = {"peak": 0, "baseline": None, "started": False}
    # Last CPU reading of every process seen while the clock ran: a worker that exits mid-run
    # still counts up to its last sample.
    cpu_seen: dict[int, float] = {}
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pss = _tree_pss(proc.pid)
            cpu = _tree_cpu(proc.pid)
            with lock:
                if state["started"]:
                    state["peak"] = max(state["peak"], pss)
                    cpu_seen.update(cpu)
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = None
    cpu_before: dict[int, float] = {}
    cpu_s = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None and proc.stdin is not None

    def ack() -> None:
        proc.stdin.write("\n")
        proc.stdin.flush()

    for line in proc.stdout:
        if line.startswith("READY"):
            with lock:
                state["baseline"] = _tree_pss(proc.pid)
                state["peak"] = state["baseline"]
                cpu_before = _tree_cpu(proc.pid)
                state["started"] = True
            ack()
        elif line.startswith("{"):
            with lock:
                state["started"] = False
                cpu_seen.update(_tree_cpu(proc.pid))
                cpu_s = sum(v - cpu_before.get(pid, 0.0) for pid, v in cpu_seen.items())
            result = json.loads(line)
            ack()
        if time.monotonic() > deadline:
            proc.kill()
            break
    proc.wait()
    done.set()
    sampler.join()
    if result is None:
        return {"engine": engine, "views": views, "error": f"exit code {proc.returncode}"}
    return {"engine": engine, "views": views, **result, "cpu_s": cpu_s, "peak_pss": state["peak"],
            "baseline_pss": state["baseline"]}


def print_table(results: list[dict], entities: int, feature_rows: int) -> None:
    gib = 1024**3
    header = f"| {'engine':<11} | views | {'wall s':>7} | {'CPU s':>7} | {'entity rows/s':>13} | {'input rows/s':>12} | {'peak mem GiB':>12} | {'baseline GiB':>12} | match counts (first view's columns) |"
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        if "error" in r:
            print(f"| {r['engine']:<11} | {r['views']:>5} | failed: {r['error']}")
            continue
        inputs = entities + feature_rows * r["views"]
        first = view_specs(1)[0]["features"]
        matches = ", ".join(f"{c}={r[c]:,}" for c in first)
        print(
            f"| {r['engine']:<11} | {r['views']:>5} | {r['wall_s']:>7.2f} | {r['cpu_s']:>7.2f} | {entities / r['wall_s']:>13,.0f} | "
            f"{inputs / r['wall_s']:>12,.0f} | {r['peak_pss'] / gib:>12.2f} | {r['baseline_pss'] / gib:>12.2f} | {matches} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000, help="entity rows")
    parser.add_argument("--feature-rows", type=int, default=10_000_000, help="feature rows per view")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 3], help="view counts to run, e.g. 1 3")
    parser.add_argument("--applicants", type=int, default=100_000, help="distinct applicant ids")
    parser.add_argument("--merchants", type=int, default=10_000, help="distinct merchant ids")
    parser.add_argument("--files", type=int, default=8, help="Parquet files per table")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--num-partitions", type=int, default=None, help="platform: hash buckets (default: auto)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep/reuse generated data here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine run")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        views = args.views[0]
        run = {"platform": lambda: run_platform(args.data_dir, views, args.num_partitions),
               "platform-v1": lambda: run_platform(args.data_dir, views, args.num_partitions, parquet_v2=False),
               "pandas": lambda: run_pandas(args.data_dir, views),
               "duckdb": lambda: run_duckdb(args.data_dir, views)}[args.child]
        _report(run())
        return

    temp = None
    data_dir = args.data_dir
    if data_dir is None:
        temp = tempfile.mkdtemp(prefix="pit_join_bench_")
        data_dir = Path(temp)
    try:
        generate(data_dir, args.entities, args.feature_rows, max(args.views), args.applicants, args.merchants,
                 args.files)
        results = []
        for views in args.views:
            for engine in args.engines:
                r = measure(engine, data_dir, views, args.num_partitions, args.timeout)
                print(json.dumps(r), flush=True)
                results.append(r)
        print(f"entities={args.entities:,} feature_rows/view={args.feature_rows:,} applicants={args.applicants:,} "
              f"merchants={args.merchants:,} ttl={TTL.days}d cpus=2")
        print_table(results, args.entities, args.feature_rows)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
