"""Backfill benchmark: the underwriting ``applicant_history`` view (14 aggregations over 30, 90
and 365 days) over ~10M repayment-ledger events, end to end through ``platform.features.backfill``.

    python benchmarks/backfill.py                      # ~10M events, local disk
    python benchmarks/backfill.py --events 1000000     # smaller
    python benchmarks/backfill.py --random             # uniform random events instead of the generator

The events come from ``workloads.underwriting.generate`` (about 6 events per application:
originations, payments, missed installments, delinquencies, each stamped with when it was
known), sized to ``--events``; ``--random`` draws ledger-like events uniformly instead (no
per-applicant structure). They are generated once per size under ``benchmarks/_data/`` and
reused. A local Ray is started with ``--cpus`` CPUs before timing. Each repeat backfills the
whole period, ``(2023-01-01, 2025-01-01]``, replacing the previous run's partitions; the first
repeat also pays for Ray starting worker processes and the shuffle's actors.

Printed per run: wall seconds, source events read per second, CPU seconds used by the
driver and the Ray workers and how many of them went to the window kernel, the machine's
load average (on a shared machine wall time mostly says what else ran; CPU time does not),
rows written, partitions, files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parent / "_data"
START, END = datetime(2023, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
EVENTS_PER_APPLICATION = 6.1  # what the generator yields, measured


def _random_events(platform, events: int, seed: int) -> None:
    """Ledger-like events drawn uniformly: ~27 per applicant over two years, some known late."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workloads.underwriting.features import repayment_events

    chunk = 1_000_000

    def write(staging: str) -> None:
        fs = platform.storage.arrow_fs
        fs.create_dir(staging, recursive=True)
        for i, lo in enumerate(range(0, events, chunk)):
            n = min(chunk, events - lo)
            rng = np.random.default_rng([seed, i])
            us = int((END - START).total_seconds() * 1e6)
            event = int(START.timestamp() * 1e6) + rng.integers(0, us, n)
            kind = rng.choice(4, n, p=[0.17, 0.7, 0.08, 0.05])  # origination, payment, missed, delinquency
            lag = np.where(kind >= 2, rng.integers(0, 10 * 86_400_000_000, n), 0)
            amount = np.round(rng.gamma(2.0, 150.0, n), 2)
            table = pa.table(
                {
                    "applicant_id": rng.integers(0, max(1, events // 27), n),
                    "event_ts": pa.array(event, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                    "known_ts": pa.array(event + lag, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                    "loan_amount": pa.array(np.where(kind == 0, amount, np.nan), from_pandas=True),
                    "balance_delta": np.where(kind == 0, amount, np.where(kind == 1, -amount / 4, 0.0)),
                    "is_loan": (kind == 0).astype(np.int64),
                    "is_late": ((kind == 1) & (rng.random(n) < 0.1)).astype(np.int64),
                    "is_missed": (kind == 2).astype(np.int64),
                    "days_past_due": np.where(kind == 3, rng.choice([30, 60, 90], n), 0).astype(np.int64),
                }
            )
            pq.write_table(table, f"{staging}/part-{i:05d}.parquet", filesystem=fs)

    platform.datasets.publish(repayment_events.dataset, write)


def _cpu_seconds() -> float:
    """CPU time so far of this process and every process under it (the local Ray's workers).

    Contention-proof where wall time is not: on a shared machine a run's wall time mostly says
    what else was running. Processes that already exited are not counted (Ray keeps its idle
    workers, so few do)."""
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
    parser.add_argument("--events", type=int, default=10_000_000, help="source events (approximately, with the generator)")
    parser.add_argument("--random", action="store_true", help="uniform random events instead of the underwriting generator")
    parser.add_argument("--repeats", type=int, default=1, help="timed backfills (each replaces the previous one's partitions)")
    parser.add_argument("--cpus", type=int, default=2, help="num_cpus of the local Ray")
    parser.add_argument("--buckets", type=int, default=None, help="entity hash buckets (default: the platform's choice)")
    parser.add_argument("--root", default=None, help="storage root (default: benchmarks/_data/backfill-<kind>-<events>)")
    parser.add_argument("--progress", action="store_true", help="show Ray Data's progress bars")
    args = parser.parse_args()

    import ray

    from mlplatform.features.backfill import backfill
    from mlplatform.platform import Platform
    from workloads.underwriting import features as underwriting

    kind = "random" if args.random else "generated"
    root = args.root or str(DATA / f"backfill-{kind}-{args.events}")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = args.progress
    ctx.print_on_execution_start = False
    try:
        platform = Platform.from_config({"storage": {"root": root}})
        source = underwriting.repayment_events.dataset
        if not platform.datasets.exists(source):
            started = time.perf_counter()
            if args.random:
                _random_events(platform, args.events, seed=7)
            else:
                from workloads.underwriting.generate import DataConfig, generate

                applications = max(1, round(args.events / EVENTS_PER_APPLICATION))
                generate(platform, DataConfig(applications=applications, start=START, end=END, seed=7))
            print(f"data: generated in {time.perf_counter() - started:.1f} s (not part of the timing)")
        events = platform.datasets.get(source)
        print(
            f"backfill benchmark: applicant_history ({len(underwriting.applicant_history.aggregations)} aggregations), "
            f"{events.rows:,} {kind} events, ({START:%Y-%m-%d}, {END:%Y-%m-%d}], root {platform.storage.root}, "
            f"Ray num_cpus={args.cpus}, {os.cpu_count()} cores"
        )
        platform.features.apply(underwriting.DEFINITIONS)
        for repeat in range(1, args.repeats + 1):
            cpu_before = _cpu_seconds()
            result = backfill(platform.features, "applicant_history", START, END, buckets=args.buckets)
            v = result.version
            cpu = _cpu_seconds() - cpu_before
            print(
                f"run {repeat}: {result.seconds:.1f} s, {result.events_per_second:,.0f} events/s "
                f"({cpu:.0f} CPU-s in all, {result.kernel_seconds:.1f} of them in the kernel; "
                f"load average {os.getloadavg()[0]:.0f}), "
                f"{result.rows_in:,} events in, {result.rows_out:,} rows out, {result.partitions} partitions, "
                f"{len(v.files):,} files, {sum(f.bytes for f in v.files) / 2**20:,.0f} MiB (v{v.version})"
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
