"""Batch-scoring benchmark: ``platform.batch`` (Ray Data ``map_batches`` on an actor pool) against
plain ``Booster.predict`` in one process, on the same rows, in the same run.

    python benchmarks/batch_score.py                          # 1M rows, then end to end on 200k applications
    python benchmarks/batch_score.py --rows 200000 --e2e-applications 0     # scoring only, quick

Scoring alone (the rows already carry their feature columns, so only scoring is measured):

* The rows: ``--rows`` applications with the 20 ``underwriting_v1`` feature columns
  (counts, amounts, rates; ~10% missing), as an Arrow table cut into ``--blocks`` blocks and
  put into Ray's object store before timing (as the point-in-time join leaves them).
* The model: LightGBM trained on 50k such rows with the platform's default parameters
  (``DEFAULT_PARAMS``: 31 leaves) for ``--trees`` rounds, registered in a temporary registry.
* ``plain``: ``booster.predict(X)`` on the float64 matrix already in this process's memory,
  LightGBM's default threads (all ``--cpus``). The matrix is built before the clock starts.
* ``platform``: ``platform.batch.score_features(model, rows, num_actors=--cpus)`` materialized
  (scores stay in the object store). Timed from the call, so each repeat pays for starting its
  actor pool and for every actor loading and verifying the model, plus Arrow → matrix
  encoding and writing the output blocks. The line "after its first block" is the rate
  once the first scored block is out: the pool's start (and that block) left out.

The two alternate, ``--repeats`` times each; figures are medians; the scores of both are
compared (they must be bit-identical). User + system CPU seconds of this process and its
descendants (Ray's raylet, GCS and workers; see ``CpuMeter``) are printed too, since a busy
machine stretches wall time but not the work done.

End to end (``--e2e-applications`` > 0): the underwriting data (generated, feature views
backfilled; cached under ``benchmarks/_data/batch-score-<n>/``), a small model trained on the
point-in-time features, then ``platform.batch.score(model, applications)``: the point-in-time
join, scoring and writing the versioned Parquet dataset, reported as a whole and by phase.

Ray is started locally with ``--cpus`` CPUs; its start is not timed. A warm-up scores a few
rows first (Ray Data's executor and the registry's files warm); every timed run still starts
its own actor pool, as every ``platform.batch`` call does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

DATA = Path(__file__).resolve().parent / "_data"
MODEL = "bench_pd"


class CpuMeter:
    """User + system CPU seconds of this process and all its descendants (Ray's raylet, GCS and
    workers) over a ``with`` block. Sampled four times a second per process, so a worker that
    exits mid-block still counts (up to its last sample): reading the tree only at the end would
    lose the actors that Ray Data has already shut down."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._start: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self.seconds = 0.0

    def _sample(self, into: dict[tuple[int, float], float]) -> None:
        me = self._psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    into[(proc.pid, proc.create_time())] = t.user + t.system
            except self._psutil.Error:
                continue

    def __enter__(self) -> CpuMeter:
        import threading

        self._sample(self._start)
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(0.25):
                self._sample(self._last)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(self._last)
        self.seconds = sum(t - self._start.get(key, 0.0) for key, t in self._last.items())


def _feature_names() -> list[str]:
    from workloads.underwriting.features import underwriting_v1

    return [ref.split(":", 1)[1] for ref in underwriting_v1.features]


def _synthetic(names: list[str], n: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Feature columns shaped like the underwriting ones, and a label that depends on them."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for name in names:
        if name.startswith(("loans_", "late_", "missed_", "applications_", "outcomes_")):
            values = rng.poisson(2.0, n).astype(np.float64)
        elif name.startswith("max_days"):
            values = rng.exponential(10.0, n).round()
        elif "rate" in name:
            values = rng.beta(2, 20, n)
        elif name == "term_installments":
            values = rng.choice([4.0, 6.0, 12.0], n)
        else:
            values = rng.lognormal(4.5, 0.8, n)
        values[rng.random(n) < 0.1] = np.nan
        columns[name] = values
    x = np.column_stack(list(columns.values()))
    logit = -3 + 0.4 * np.nan_to_num(x[:, 2]) + 0.02 * np.nan_to_num(x[:, 3]) + rng.normal(0, 1, n)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    table = pa.table({"application_id": np.arange(n, dtype=np.int64), **columns})
    return table, label


def _train(names: list[str], trees: int) -> object:
    import lightgbm as lgb

    from mlplatform.training.spec import DEFAULT_PARAMS

    table, label = _synthetic(names, 50_000, seed=1)
    x = np.column_stack([table.column(n).to_numpy() for n in names])
    return lgb.train(dict(DEFAULT_PARAMS), lgb.Dataset(x, label, feature_name=names), num_boost_round=trees)


def scoring_only(platform, args) -> None:
    import ray

    names = _feature_names()
    booster = _train(names, args.trees)
    platform.models.register(
        MODEL, flavor="lightgbm", model=booster, lineage={"feature_service": "underwriting_v1"}, metrics={}, params={}
    )
    table, _ = _synthetic(names, args.rows, seed=2)
    x = np.column_stack([table.column(n).to_numpy() for n in names])
    step = -(-args.rows // args.blocks)
    rows = ray.data.from_arrow([table.slice(i, step) for i in range(0, args.rows, step)]).materialize()
    warm = ray.data.from_arrow([table.slice(i * 500, 500) for i in range(args.cpus)])
    del table

    # warm-up: Ray Data's executor, the registry's files
    platform.batch.score_features(MODEL, warm, alias=None, num_actors=args.cpus).materialize()
    booster.predict(x[:1000])

    plain_s, plain_cpu, plat_s, plat_cpu, steady_rate = [], [], [], [], []
    expected = scored = None
    for _ in range(args.repeats):
        with CpuMeter() as cpu:
            t = time.perf_counter()
            expected = booster.predict(x)
            plain_s.append(time.perf_counter() - t)
        plain_cpu.append(cpu.seconds)

        with CpuMeter() as cpu:
            t = time.perf_counter()
            ds = platform.batch.score_features(MODEL, rows, alias=None, num_actors=args.cpus, batch_size=args.batch_size)
            first = None
            first_rows = 0
            refs = []
            for bundle in ds.iter_internal_ref_bundles():
                if first is None:
                    first, first_rows = time.perf_counter(), bundle.num_rows() or 0
                refs.append(bundle)
            plat_s.append(time.perf_counter() - t)
        plat_cpu.append(cpu.seconds)
        steady_rate.append((args.rows - first_rows) / max(time.perf_counter() - first, 1e-9))
        scored = ray.data.from_arrow_refs([ref for b in refs for ref in b.block_refs])
        assert scored.count() == args.rows
    # the platform's scores are plain predict's, bit for bit (same float64 input, same trees)
    got = scored.select_columns(["application_id", "probability_of_default"]).to_pandas()
    order = got["application_id"].to_numpy()
    identical = bool(np.array_equal(got["probability_of_default"].to_numpy(), expected[order]))

    plain = statistics.median(plain_s)
    plat = statistics.median(plat_s)
    steady = statistics.median(steady_rate)
    n = args.rows
    print(
        f"\nscoring only: {n:,} rows x {len(names)} features, {booster.num_trees()} trees of <= 31 leaves, "
        f"{args.cpus} CPUs, batch {args.batch_size:,}, {args.repeats} repeats (median); scores identical: {identical}"
    )
    print(f"{'path':<40} {'seconds':>8} {'rows/s':>12} {'vs plain':>9} {'CPU s':>7}")
    print(f"{'plain booster.predict (1 process)':<40} {plain:8.2f} {n / plain:12,.0f} {1.0:9.2f} {statistics.median(plain_cpu):7.1f}")
    print(
        f"{'platform.batch (actor pool, cold)':<40} {plat:8.2f} {n / plat:12,.0f} {plain / plat:9.2f} "
        f"{statistics.median(plat_cpu):7.1f}"
    )
    print(f"{'platform.batch (after its first block)':<40} {'':>8} {steady:12,.0f} {steady / (n / plain):9.2f}")
    print("  runs (s): plain " + " ".join(f"{s:.2f}" for s in plain_s) + " | platform " + " ".join(f"{s:.2f}" for s in plat_s))


def end_to_end(args) -> None:
    import lightgbm as lgb

    from mlplatform import Platform
    from workloads.underwriting.features import DEFINITIONS
    from workloads.underwriting.pipeline import RAW_PREFIX, Config, backfill_views, generate_data
    from workloads.underwriting.training_set import ENTITY_COLUMNS, LABEL, TIMESTAMP, entity_rows

    root = DATA / f"batch-score-{args.e2e_applications}"
    platform = Platform.from_config({"storage": {"root": str(root)}})
    config = Config(data={"applications": args.e2e_applications, "seed": 3})
    t = time.perf_counter()
    generate_data(platform, config)
    platform.features.apply(DEFINITIONS)
    backfill_views(platform, config)
    print(f"\nend to end: data ready under {root} in {time.perf_counter() - t:.1f}s (cached after the first run)")

    applications = platform.datasets.read_table(f"{RAW_PREFIX}/applications", columns=ENTITY_COLUMNS)
    if MODEL not in platform.models.names():
        refs = platform.features.resolve_features("underwriting_v1")
        labelled = entity_rows(platform, config.data.end)
        train = platform.features.get_historical_features(labelled, refs, entity_timestamp=TIMESTAMP).to_pandas()
        names = [r.split(":", 1)[1] for r in refs]
        from mlplatform.training.spec import DEFAULT_PARAMS

        x = train[names].to_numpy(np.float64, na_value=np.nan)
        dataset = lgb.Dataset(x, train[LABEL].to_numpy(), feature_name=names)
        booster = lgb.train(dict(DEFAULT_PARAMS), dataset, num_boost_round=args.trees)
        mv = platform.models.register(
            MODEL, flavor="lightgbm", model=booster, lineage={"feature_service": "underwriting_v1"}, metrics={}, params={}
        )
        platform.models.set_alias(MODEL, "production", mv.version)

    print(f"{'run':<28} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'PIT join s':>10} {'score+write s':>13}")
    for i in range(args.e2e_repeats):
        with CpuMeter() as cpu:
            run = f"bench-{datetime.now(UTC):%Y%m%dT%H%M%S}-{i}"
            result = platform.batch.score(MODEL, applications, num_actors=args.cpus, name=run)
        print(
            f"{'platform.batch.score':<28} {result.rows:9,} {result.seconds:8.2f} {result.rows_per_s:9,.0f} "
            f"{result.timings['features']:10.2f} {result.timings['score_and_write']:13.2f}   "
            f"CPU {cpu.seconds:.1f}s, model loads per actor {sorted(result.model_loads.values())}"
        )
    for name in platform.datasets.storage.list(f"scores/{MODEL}"):
        platform.storage.delete(f"scores/{MODEL}/{name}", recursive=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to score (scoring only)")
    parser.add_argument("--blocks", type=int, default=16, help="object-store blocks the rows are cut into")
    parser.add_argument("--trees", type=int, default=300, help="boosting rounds of the model")
    parser.add_argument("--batch-size", type=int, default=32_768, help="rows per predict call in an actor")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (= scoring actors, = plain threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e-applications", type=int, default=200_000, help="0 skips the end-to-end run")
    parser.add_argument("--e2e-repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from mlplatform import Platform

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        if args.rows > 0:
            with tempfile.TemporaryDirectory(prefix="batch-score-") as root:
                scoring_only(Platform.from_config({"storage": {"root": root}}), args)
        if args.e2e_applications > 0:
            end_to_end(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
