"""The decision log's group commit: appends/s and latency with the real ``os.fsync``.

    python benchmarks/decision_log.py                        # 3,000 appends, 64 in flight
    python benchmarks/decision_log.py --appends 10000 --concurrency 8 --spool /mnt/volume/spool

Appends ``--appends`` records with ``--concurrency`` in flight to a ``DecisionLog`` on local
disk (a temporary directory unless ``--spool``), counting fsyncs, and prints appends/s, the
number of fsyncs and p50/p99 append latency. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from mlplatform.config import StorageConfig
from mlplatform.serving.decisions.log import DecisionLog
from mlplatform.storage import Storage


def record(decision_id: str) -> dict:
    return {
        "decision_id": decision_id, "application_id": f"app-{decision_id}",
        "request": json.dumps({"amount": 120.5, "merchant_id": "m-1"}), "decision": "approve",
        "probability_of_default": 0.0731, "reasons": "[]", "model_name": "pd", "model_version": 3,
        "model_sha256": "ab" * 32, "feature_names": json.dumps(["loans_90d", "category"]),
        "features": json.dumps({"loans_90d": 2.0, "category": None}),
        "feature_event_timestamps": json.dumps({"applicant_history": "2025-01-30T00:00:00+00:00"}),
        "fallback": False, "fallback_reason": None, "latency_ms": 4.2, "created_at": datetime.now(UTC).isoformat(),
        "shadow": None, "returned": True, "confirmed": True,
    }


async def append_all(log: DecisionLog, records: list[dict], concurrency: int) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(rec: dict) -> None:
        async with gate:
            start = time.perf_counter()
            await log.append(rec)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(rec) for rec in records))
    return time.perf_counter() - start, sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--spool", help="spool directory (default: a temporary one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlp-decision-log-bench-"))
    spool = Path(args.spool) if args.spool else root / "spool"
    syncs: list[int] = []

    def fsync(fd: int) -> None:
        syncs.append(fd)
        os.fsync(fd)

    records = [record(f"d-{i}") for i in range(args.appends)]  # built up front: the figure is the log's own
    storage = Storage(StorageConfig(root=str(root / "root")))
    with DecisionLog(storage, spool_dir=spool, replica_id="bench", fsync=fsync) as log:
        elapsed, latencies = asyncio.run(append_all(log, records, args.concurrency))
    n = args.appends
    print(
        f"[decision log] {n} async appends, {args.concurrency} in flight: {n / elapsed:,.0f} appends/s, "
        f"{len(syncs)} fsyncs, latency p50 {latencies[n // 2] * 1e3:.1f} ms, p99 {latencies[int(n * 0.99)] * 1e3:.1f} ms "
        f"(cpus {os.cpu_count()}, load {os.getloadavg()[0]:.0f}, spool {spool})"
    )


if __name__ == "__main__":
    main()
