"""Validation cost benchmark: what the quality gate adds to a backfill of the underwriting
``applicant_history`` view (14 windowed aggregations), with its declared expectations
(strict: null rate, range and staleness on every feature) against the same view declared
without any.

    python benchmarks/quality.py                        # ~10M events (shares data with benchmarks/backfill.py)
    python benchmarks/quality.py --events 2000000 --repeats 3

The events are the underwriting generator's (``benchmarks/backfill.py`` makes the same data
under ``benchmarks/_data/`` and both reuse it). Runs alternate, without then with
expectations, each backfilling the whole period ``(2023-01-01, 2025-01-01]`` (a warm-up run
without expectations comes first and is not counted). Applying either variant needs no
backfill of its own: expectations are not part of the view's data version.

Printed per run: wall seconds, CPU seconds of the process tree (driver and Ray workers; on a
shared machine wall time mostly says what else ran, CPU time does not), and for runs with
expectations the CPU seconds the profiling took inside the tasks (the report's
``profile_seconds``) and the checks' result. Then the medians and validation's share:
``(with - without) / without`` for wall and CPU time, and profiling CPU / backfill CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parent / "_data"
START, END = datetime(2023, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
EVENTS_PER_APPLICATION = 6.1  # what the generator yields, measured


def _cpu_seconds() -> float:
    """CPU time so far of this process and every process under it (the local Ray's workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="source events (approximately)")
    parser.add_argument("--repeats", type=int, default=2, help="timed pairs of runs (without, then with expectations)")
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray")
    parser.add_argument("--root", default=None, help="storage root (default: benchmarks/_data/backfill-generated-<events>)")
    args = parser.parse_args()

    import logging

    import ray

    from mlplatform.features.backfill import backfill
    from mlplatform.platform import Platform
    from workloads.underwriting import features as underwriting

    root = args.root or str(DATA / f"backfill-generated-{args.events}")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        platform = Platform.from_config({"storage": {"root": root}})
        source = underwriting.repayment_events.dataset
        if not platform.datasets.exists(source):
            from workloads.underwriting.generate import DataConfig, generate

            started = time.perf_counter()
            applications = max(1, round(args.events / EVENTS_PER_APPLICATION))
            generate(platform, DataConfig(applications=applications, start=START, end=END, seed=7))
            print(f"data: generated in {time.perf_counter() - started:.1f} s (not part of the timing)")
        events = platform.datasets.get(source)
        declared = underwriting.applicant_history
        bare = declared.model_copy(update={"quality": None})
        print(
            f"quality benchmark: backfill of applicant_history ({len(declared.aggregations)} aggregations, "
            f"{len(declared.quality.features)} features with expectations, policy {declared.quality.policy}), "
            f"{events.rows:,} events, ({START:%Y-%m-%d}, {END:%Y-%m-%d}], root {platform.storage.root}, "
            f"Ray num_cpus={args.cpus}, {os.cpu_count()} cores"
        )
        platform.features.apply(underwriting.DEFINITIONS)
        results: dict[str, list[tuple[float, float, float]]] = {"without": [], "with": []}
        plan = [("warm-up", bare)] + [(kind, view) for _ in range(args.repeats) for kind, view in
                                      (("without", bare), ("with", declared))]
        for kind, view in plan:
            platform.features.apply([view])
            cpu_before = _cpu_seconds()
            result = backfill(platform.features, view.name, START, END)
            cpu = _cpu_seconds() - cpu_before
            line = (f"{kind:>8}: {result.seconds:6.1f} s wall, {cpu:5.1f} CPU-s, {result.rows_in:,} events in, "
                    f"{result.rows_out:,} rows out, load average {os.getloadavg()[0]:.0f}")
            profile = 0.0
            if kind == "with":
                report = platform.quality.latest(view.name, "backfill")
                profile = report.profile_seconds
                line += f"; profiling {profile:.2f} CPU-s in the tasks; {report.line()}"
            print(line, flush=True)
            if kind in results:
                results[kind].append((result.seconds, cpu, profile))
        wall = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
        cpu = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
        profile = statistics.median(r[2] for r in results["with"])
        print(
            f"median without: {wall['without']:.1f} s wall, {cpu['without']:.1f} CPU-s; "
            f"with: {wall['with']:.1f} s wall, {cpu['with']:.1f} CPU-s"
        )
        print(
            f"validation's share of backfill: wall {100 * (wall['with'] - wall['without']) / wall['without']:+.1f}%, "
            f"CPU {100 * (cpu['with'] - cpu['without']) / cpu['without']:+.1f}%, "
            f"profiling CPU in the tasks {100 * profile / cpu['with']:.1f}% of the backfill's CPU"
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
