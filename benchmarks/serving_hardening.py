"""The serving application's bounds under abuse: replica memory under distinct invalid feature
lists, and decision latency against the deadline with Redis hung (SIGSTOP).

    python benchmarks/serving_hardening.py                    # 4,000 lists, 400 decisions while hung
    python benchmarks/serving_hardening.py --lists 8000 --decisions 1000 --threads 8

Deploys the serving application (2 replicas, Redis online and idempotency store on a
redis-server it starts on loopback, deadline 50 ms unless --deadline), then:

1. **memory**: each replica's RSS (psutil, by the pid ``/v1/internal/replica`` reports) before
   and after ``--lists`` ``/get-online-features`` requests whose feature lists are all
   different and all invalid (a random 40 of the service's refs in random order — which pass
   the reference check — with entities that lack a join key, and as many with an unknown
   feature). 2,000 identical invalid requests first, so warm-up allocations are not counted.
2. **hung Redis**: ``--decisions`` fresh applications from ``--threads`` threads with Redis
   answering (the baseline, side by side), then as many with Redis stopped by SIGSTOP; prints
   p50/p99/max latency of both against the deadline and how many got the fallback; then
   SIGCONT, and every application is retried: each must get its first decision.

Prints figures; asserts nothing. Stops what it started (Redis by pid, the Serve application).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serving as bench  # noqa: E402  (benchmarks/serving.py: data, model)

OPS_KEY = "ops-" + "o" * 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lists", type=int, default=4000, help="distinct invalid feature lists")
    parser.add_argument("--decisions", type=int, default=400, help="decisions sent while Redis is hung")
    parser.add_argument("--threads", type=int, default=8, help="concurrent clients while Redis is hung")
    parser.add_argument("--deadline", default="50ms", help="serving.deadline")
    parser.add_argument("--spool-dir", default=None, help="decision log spool (default on disk under the root; /dev/shm to leave fsync out)")
    args = parser.parse_args()

    import psutil
    import requests

    root = Path(tempfile.mkdtemp(prefix="mlp-hardening-bench-"))
    port = bench._free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    os.environ["MLP_BENCH_KEY"] = bench.KEY
    os.environ["MLP_API_KEY_DIGESTS"] = f"operate:{hashlib.sha256(OPS_KEY.encode()).hexdigest()}"
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(bench._free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(bench._free_port()))
    platform = bench.build_platform(root, f"redis://127.0.0.1:{port}/0", args.deadline)
    try:
        bench.train(platform)
        deployed = platform.serving.deploy("underwriting", num_replicas=2, replica_cpus=0.5, spool_dir=args.spool_dir)
        headers = {"X-API-Key": bench.KEY}
        session = requests.Session()
        pids: set[int] = set()
        for _ in range(40):
            pids.add(session.get(f"{deployed.url}/v1/internal/replica", headers={"X-API-Key": OPS_KEY}, timeout=30).json()["pid"])
        refs = platform.features.resolve_features("underwriting_v1")
        print(f"ingress {deployed.ingress}; replicas {sorted(pids)}; {len(refs)} refs in the service; deadline {args.deadline}; "
              f"{os.cpu_count()} CPUs; spool {deployed.spool_dir}; load {os.getloadavg()[0]:.1f}", flush=True)

        # ---------------------------------------------------------------- memory
        def rss() -> dict[int, float]:
            return {pid: psutil.Process(pid).memory_info().rss / 2**20 for pid in pids}

        rng = random.Random(0)
        same = {"features": refs[:40], "entities": {"applicant_id": [1]}}
        for _ in range(2000):
            session.post(f"{deployed.url}/get-online-features", json=same, headers=headers, timeout=30)
        before, statuses, started = rss(), {}, time.monotonic()
        for i in range(args.lists):
            if i % 2:
                body = {"features": rng.sample(refs, min(40, len(refs))), "entities": {"applicant_id": [1]}}
            else:
                body = {"features": [*rng.sample(refs, 10), f"applicant_history:nope_{i}"], "entities": {"applicant_id": [1]}}
            status = session.post(f"{deployed.url}/get-online-features", json=body, headers=headers, timeout=30).status_code
            statuses[status] = statuses.get(status, 0) + 1
        after = rss()
        print(f"memory: {args.lists} distinct invalid feature lists in {time.monotonic() - started:.1f}s, answers {statuses}")
        for pid in sorted(pids):
            print(f"  replica {pid}: RSS {before[pid]:.1f} -> {after[pid]:.1f} MiB ({after[pid] - before[pid]:+.1f} MiB)")

        # ------------------------------------------------------------ hung Redis
        def application() -> dict:
            return {"application_id": f"h-{uuid.uuid4().hex[:16]}", "applicant_id": rng.randrange(bench.APPLICANTS),
                    "merchant_id": rng.randrange(bench.MERCHANTS), "amount": 120.5, "currency": "USD", "term": 4,
                    "timestamp": datetime.now(UTC).isoformat()}

        def timed(body: dict) -> tuple[float, dict]:
            t0 = time.perf_counter()
            response = requests.post(f"{deployed.url}/v1/decisions", json=body, headers=headers, timeout=30)
            return (time.perf_counter() - t0) * 1000, response.json() if response.status_code == 200 else {"status": response.status_code}

        def percentiles(results: list[tuple[float, dict]]) -> str:
            latencies = sorted(ms for ms, _ in results)
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            return f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"

        for _ in range(50):  # warm
            timed(application())
        with ThreadPoolExecutor(args.threads) as pool:  # the same load with Redis answering, side by side
            healthy = list(pool.map(timed, [application() for _ in range(args.decisions)]))
        print(f"healthy Redis: {len(healthy)} decisions from {args.threads} threads: {percentiles(healthy)}; "
              f"fallbacks {sum(1 for _, doc in healthy if doc.get('fallback') is True)}; load {os.getloadavg()[0]:.1f}")
        bodies = [application() for _ in range(args.decisions)]
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(args.threads) as pool:
                results = list(pool.map(timed, bodies))
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        fallbacks = sum(1 for _, doc in results if doc.get("fallback") is True)
        print(f"hung Redis: {len(results)} decisions from {args.threads} threads: {percentiles(results)} (deadline "
              f"{args.deadline}); fallbacks {fallbacks}; other answers {[doc for _, doc in results if 'fallback' not in doc][:3]}; "
              f"load {os.getloadavg()[0]:.1f}")
        time.sleep(1.0)
        same_answer = sum(timed(body)[1] == doc for body, (_, doc) in zip(bodies, results))
        print(f"after Redis resumed: {same_answer} of {len(bodies)} retries got their first decision")
    finally:
        platform.serving.shutdown()
        redis.terminate()
        redis.wait(timeout=10)


if __name__ == "__main__":
    main()
