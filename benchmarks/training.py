"""Training benchmark: plain ``lightgbm.train`` vs the platform's Ray Train path, reporting
cadence, and Tune with ASHA vs the same trials run to the end.

    python benchmarks/training.py                                    # 5M rows, 300 rounds
    python benchmarks/training.py --rows 200000 --tune-rows 100000   # smoke run

One local Ray with ``num_cpus=2`` (no dashboard). A synthetic binary training set (ten
numeric features with a non-linear signal, one integer-coded categorical, 70/15/15 random
splits) is published as ``training_sets/bench`` under a temporary storage root. Then:

* ``plain``: the splits read into pandas on this process, ``lightgbm.train`` with the spec's
  params, 2 threads, early stopping on the validation AUC (``platform.training.train_local``).
* ``platform 1x2``, ``platform 2x1``: ``platform.training.train`` with 1 worker of 2 CPUs and
  2 workers of 1 CPU (LightGBM data-parallel), same params and early stopping. ``fit`` is the
  Ray Train run (worker start-up, ingest of the materialised splits, boosting, checkpoints);
  ``total`` adds reading/materialising the splits and scoring validation and test.
* reporting: 2 workers, ``--report-rounds`` rounds without early stopping on the tuning set
  (``--tune-rows``), reporting every round vs every 25 rounds (checkpoints every 25 rounds
  both ways). A report blocks until Ray Train's controller has collected the previous one,
  which it does every 2 s, so the cost shows when rounds are faster than that.
* tune: ``--tune-samples`` trials (1 worker each, so 2 run at once) on ``training_sets/tune``
  (``--tune-rows``), the same sampled configs under ASHA and under FIFO (every trial to the end).

Test AUC is computed the same way for every row (exact, on the test split). A warm-up run on
a tiny set starts Ray's worker processes first (not timed), as on a long-lived cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FEATURES = [f"x{i}" for i in range(10)] + ["merchant_band"]
FILES = 8


def synthetic_chunk(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 10)).astype(np.float32)
    X[rng.random(rows) < 0.05, 6] = np.nan
    band = rng.integers(0, 8, rows)
    logit = (
        0.9 * X[:, 0]
        - 0.7 * X[:, 1]
        + 0.5 * X[:, 2] * X[:, 3]
        + 0.6 * np.sin(2 * X[:, 4])
        + 0.4 * (X[:, 5] > 0.5)
        + 0.3 * (band % 3)
        - 2.3
    )
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    split = rng.choice(np.array(["train", "validation", "test"]), size=rows, p=[0.7, 0.15, 0.15])
    columns = {f"x{i}": X[:, i] for i in range(10)}
    columns.update(merchant_band=band, default=label, split=split)
    return pa.table(columns)


def publish(platform, name: str, rows: int, seed: int) -> None:
    from mlplatform.features.training_sets import TrainingSetSnapshot

    def write(staging: str) -> None:
        platform.storage.arrow_fs.create_dir(staging, recursive=True)
        per_file = -(-rows // FILES)
        for i in range(FILES):
            n = min(per_file, rows - i * per_file)
            if n > 0:
                pq.write_table(synthetic_chunk(n, seed * 1000 + i), f"{staging}/part-{i}.parquet",
                               filesystem=platform.storage.arrow_fs, row_group_size=250_000)

    version = platform.datasets.publish(f"training_sets/{name}", write)
    snapshot = TrainingSetSnapshot(
        name=name, version=version.version, uri=platform.storage.uri(f"training_sets/{name}"), rows=version.rows,
        content_hash="synthetic", label="default", timestamp_column="application_ts",
        features=[f"synthetic:{f}" for f in FEATURES], feature_versions={}, splits={}, time_range={},
    )
    platform.storage.write_json(f"training_sets/{name}/_snapshots/{version.version:012d}.json", snapshot.to_json())


def plain(platform, spec) -> dict:
    from mlplatform.training.api import auc

    started = time.perf_counter()
    frame = platform.datasets.read_table("training_sets/bench").to_pandas()
    splits = {s: frame[frame["split"] == s] for s in ("train", "validation", "test")}
    del frame
    read = time.perf_counter()
    booster = platform.training.train_local(splits["train"], splits["validation"], spec, features=FEATURES, num_threads=2)
    trained = time.perf_counter()
    test = splits["test"]
    test_auc = auc(test["default"].to_numpy(), booster.predict(test[FEATURES].to_numpy(dtype=np.float32)))
    done = time.perf_counter()
    return {"fit": trained - read, "total": done - started, "auc": test_auc, "rounds": booster.current_iteration()}


def platform_run(platform, spec) -> dict:
    result = platform.training.train(spec)
    return {
        "fit": result.timings["fit_s"],
        "total": result.wall_time_s,
        "prepare": result.timings["prepare_s"],
        "evaluate": result.timings["evaluate_s"],
        "auc": result.metrics["test"]["auc"],
        "rounds": result.best_iteration,
        "trained": result.rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="training-set rows (all splits)")
    parser.add_argument("--rounds", type=int, default=300, help="most boosting rounds (early stopping on)")
    parser.add_argument("--report-rounds", type=int, default=50, help="rounds for the reporting comparison")
    parser.add_argument("--tune-rows", type=int, default=1_000_000, help="rows of the tuning set")
    parser.add_argument("--tune-rounds", type=int, default=100, help="rounds per tuning trial")
    parser.add_argument("--tune-samples", type=int, default=8, help="tuning trials")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: plain,platform,report,tune")
    parser.add_argument("--root", default=None, help="storage root (default: a temporary directory)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import ray

    from mlplatform import Platform
    from mlplatform.training import TrainSpec, TuneSpec

    root = args.root or tempfile.mkdtemp(prefix="mlp-bench-training-")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    platform = Platform.from_config({"storage": {"root": root}})
    rows = []
    try:
        t = time.perf_counter()
        publish(platform, "bench", args.rows, seed=1)
        print(f"published {args.rows:,} rows in {time.perf_counter() - t:.1f} s under {root}", flush=True)
        base = dict(training_set="bench", num_boost_round=args.rounds, early_stopping_rounds=30, report_every=25)

        publish(platform, "warmup", 20_000, seed=9)
        platform.training.train(TrainSpec(**{**base, "training_set": "warmup", "num_boost_round": 10}))

        if "plain" not in skip:
            rows.append(("plain lightgbm.train, 2 threads", plain(platform, TrainSpec(**base))))
            print(rows[-1], flush=True)
        if "platform" not in skip:
            for workers, cpus in ((1, 2), (2, 1)):
                spec = TrainSpec(**base, num_workers=workers, cpus_per_worker=cpus)
                rows.append((f"platform {workers} worker(s) x {cpus} CPU", platform_run(platform, spec)))
                print(rows[-1], flush=True)

        if not {"report", "tune"} <= skip:
            publish(platform, "tune", args.tune_rows, seed=2)
        report = []
        if "report" not in skip:
            # On the smaller set: a report only costs when rounds are faster than the
            # controller's 2 s poll of the workers (see mlplatform.training.lightgbm).
            for every in (1, 25):
                spec = TrainSpec(**{**base, "training_set": "tune", "num_boost_round": args.report_rounds,
                                    "early_stopping_rounds": None, "report_every": every, "checkpoint_every": 25,
                                    "num_workers": 2})
                report.append((every, platform_run(platform, spec)))
                print(report[-1], flush=True)

        tune = []
        if "tune" not in skip:
            for scheduler in ("asha", "fifo"):
                spec = TuneSpec(
                    train=TrainSpec(training_set="tune", num_workers=1, num_boost_round=args.tune_rounds,
                                    early_stopping_rounds=None, report_every=10),
                    search_space={"learning_rate": {"loguniform": [0.02, 0.3]}, "num_leaves": {"randint": [8, 128]},
                                  "min_data_in_leaf": {"choice": [20, 100, 500]}},
                    num_samples=args.tune_samples, scheduler=scheduler, grace_period=2, reduction_factor=3, seed=11,
                )
                result = platform.training.tune(spec)
                tune.append((scheduler, result))
                print(scheduler, result.wall_time_s, result.validation_auc, flush=True)
    finally:
        ray.shutdown()
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"training: {args.rows:,} rows, {len(FEATURES)} features, up to {args.rounds} rounds, early stopping 30; "
          f"{os.cpu_count()} cores, local Ray num_cpus=2")
    if rows:
        ref = rows[0][1] if rows[0][0].startswith("plain") else None
        print(f"{'path':<34}{'fit s':>8}{'total s':>9}{'fit/plain':>10}{'total/plain':>12}{'best round':>11}{'test AUC':>10}{'ΔAUC':>9}")
        for name, r in rows:
            fit_ratio = f"{r['fit'] / ref['fit']:.2f}x" if ref else "-"
            total_ratio = f"{r['total'] / ref['total']:.2f}x" if ref else "-"
            delta = f"{r['auc'] - ref['auc']:+.4f}" if ref else "-"
            print(f"{name:<34}{r['fit']:>8.1f}{r['total']:>9.1f}{fit_ratio:>10}{total_ratio:>12}{r['rounds']:>11}"
                  f"{r['auc']:>10.4f}{delta:>9}")
    if report:
        print(f"\nreporting, 2 workers, {args.report_rounds} rounds on {args.tune_rows:,} rows, checkpoint every 25:")
        print(f"{'report every':<14}{'fit s':>8}{'s/round':>9}{'test AUC':>10}")
        for every, r in report:
            print(f"{every:<14}{r['fit']:>8.1f}{r['fit'] / args.report_rounds:>9.3f}{r['auc']:>10.4f}")
    if tune:
        print(f"\ntune: {args.tune_samples} trials x up to {args.tune_rounds} rounds on {args.tune_rows:,} rows, "
              "1 worker each, report every 10 rounds, same sampled configs")
        print(f"{'scheduler':<11}{'wall s':>8}{'rounds trained':>16}{'best valid AUC':>16}{'concurrent':>12}")
        for scheduler, r in tune:
            trained = sum(t.rounds for t in r.trials)
            print(f"{scheduler:<11}{r.wall_time_s:>8.1f}{trained:>16}{r.validation_auc:>16.4f}{r.max_concurrent:>12}")


if __name__ == "__main__":
    main()
