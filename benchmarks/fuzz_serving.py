"""Generated bad requests against a locally deployed serving application, many per route: the
long run of tests/integration/test_fuzz_serving.py, with the same generators.

    python benchmarks/fuzz_serving.py                           # 10,000 requests per route
    python benchmarks/fuzz_serving.py --requests-per-route 200  # a quick look
    python benchmarks/fuzz_serving.py --seed 7                  # another (reproducible) draw

Starts everything it needs and stops it at the end: a storage root in a temporary directory,
a redis-server on a free loopback port (online and idempotency store; stopped by its PID),
a local Ray, the underwriting feature definitions with a few rows pushed, a LightGBM model in
production and the serving application (two replicas by default). Then sends, from
``--workers`` threads, the hand-written requests of the bug classes found before and
``--requests-per-route`` generated requests to each of POST /v1/decisions,
/get-online-features and /push and GET /health, /v1/internal/replica and /openapi.json
(drawn from tests/integration/_fuzz_strategies.py, sent by _fuzz_runner.py: extreme numbers,
odd timestamps, unicode, deep nesting, huge sizes, wrong types, unknown keys, odd content
types, methods, paths and keys).

Prints a table: route, requests, answers by status class and the number at or above 500 (a
request that got no answer at all counts as 599), then the first 30 5xx with their request
bodies and answers (all of them are appended, as they come, to /tmp/fuzz_findings.txt), then
the first 30 answers that broke the contract without being a 5xx (a certainly invalid request
accepted; a 422 without JSON ``{"error", "message"}``). Last, whether the service still answers a known decision and
feature lookup as it did before the run. Exits 1 if anything was found. Figures, not
assertions: the test asserts on its bounded share.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the generators the fuzz test uses (not a package)

from _fuzz_runner import FINDINGS, Fuzzer, show_body  # noqa: E402
from _fuzz_strategies import CHECK_APPLICANT, CHECK_MERCHANT, GET_ROUTES, KNOWN, POST_ROUTES, REQUESTS, VIEWS  # noqa: E402

KEY = "fuzz-bench-" + "k" * 32
KEY_ENV = "MLP_FUZZ_BENCH_KEY"
HEADERS = {"X-API-Key": KEY}
POLICY = {"approve_below": 0.1, "decline_at": 0.3, "max_amount": 2000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise SystemExit("redis-server did not answer PING within 30 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def build(root: Path, redis_url: str, replicas: int):
    """Platform, definitions, the check rows, a model in production, the app deployed."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from mlplatform import Platform
    from workloads.underwriting.features import DEFINITIONS

    platform = Platform.from_config({
        "project": "fuzzbench",
        "storage": {"root": str(root / "store")},
        "ray": {"num_cpus": os.cpu_count()},
        "online_store": {"type": "redis", "url": redis_url, "timeout": "2s"},
        # a loaded 2-core machine can take longer than production's 50 ms: keep fallbacks for real faults
        "serving": {"port": _free_port(), "deadline": "3s", "api_key_env": KEY_ENV,
                    "api_key_roles": ["decide", "read_features", "write_features", "operate"]},
    })
    platform.features.apply(DEFINITIONS)
    when = datetime.now(UTC) - timedelta(minutes=30)
    for view, (key, features) in VIEWS.items():
        value = CHECK_APPLICANT if key == "applicant_id" else CHECK_MERCHANT
        row = {key: [value], "event_timestamp": [when]}
        for name in features:
            row[name] = [25] if name in ("outcomes_90d", "applications_90d") else [150.0 if name == "avg_loan_amount_365d" else 1.0]
        platform.features.push(view, pd.DataFrame(row), to="online")

    names = [ref.split(":")[1] for ref in platform.features.resolve_features("underwriting_v1")]
    rng = np.random.default_rng(1)
    x = pd.DataFrame(rng.poisson(1.0, (3000, len(names))).astype(float), columns=names)
    logit = -4.0 + 1.5 * x["missed_installments_90d"] + 0.8 * x["late_installments_30d"]
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": 1, "num_threads": 1}, lgb.Dataset(x, y), 30)
    mv = platform.models.register("underwriting", flavor="lightgbm", model=booster,
                                  lineage={"feature_service": "underwriting_v1"}, metrics={}, params={})
    platform.models.set_alias("underwriting", "production", mv.version)
    cpus = max(0.1, (os.cpu_count() or 2) / (2 * replicas))
    deployed = platform.serving.deploy("underwriting", policy=POLICY, num_replicas=replicas, replica_cpus=cpus)
    return platform, deployed


def probe(url: str) -> dict:
    """A known decision and feature lookup, and /health: compared before and after the run."""
    import requests

    lookup = requests.post(f"{url}/get-online-features", headers=HEADERS, timeout=60, json={
        "feature_service": "underwriting_v1",
        "entities": {"applicant_id": [CHECK_APPLICANT], "merchant_id": [CHECK_MERCHANT], "amount": [300.0], "term": [6]}})
    decision = requests.post(f"{url}/v1/decisions", headers=HEADERS, timeout=60, json={
        "application_id": f"fuzz-probe-{uuid.uuid4().hex[:16]}", "applicant_id": CHECK_APPLICANT, "merchant_id": CHECK_MERCHANT,
        "amount": 300.0, "currency": "USD", "term": 6, "timestamp": datetime.now(UTC).isoformat()})
    health = requests.get(f"{url}/health", timeout=60)
    out = {"health": (health.status_code, health.json().get("status") if health.ok else health.text[:200]),
           "lookup": (lookup.status_code, lookup.json()["results"] if lookup.ok else lookup.text[:200])}
    if decision.ok:
        d = decision.json()
        out["decision"] = (200, d["decision"], d["probability_of_default"], d["fallback"], d["reasons"])
    else:
        out["decision"] = (decision.status_code, decision.text[:200])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-route", type=int, default=10_000, help="generated requests per route (default 10000)")
    parser.add_argument("--workers", type=int, default=4, help="threads sending requests (default 4)")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the serving application (default 2)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a random one, printed)")
    parser.add_argument("--routes", nargs="+", default=list(POST_ROUTES + GET_ROUTES), choices=list(POST_ROUTES + GET_ROUTES))
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)

    root = Path(tempfile.mkdtemp(prefix="mlp-fuzz-bench-"))
    os.environ[KEY_ENV] = KEY
    # HAProxy's stats/metrics host ports: free ones, so the run goes beside another Serve.
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))
    redis, redis_url = start_redis(root)
    platform = None
    try:
        started = time.monotonic()
        platform, deployed = build(root, redis_url, args.replicas)
        print(f"deployed at {deployed.url} via {deployed.ingress} in {time.monotonic() - started:.0f}s; seed {seed}; "
              f"{args.requests_per_route} requests per route from {args.workers} threads; findings go to {FINDINGS}", flush=True)
        before = probe(deployed.url)
        fuzzer = Fuzzer(deployed.url, KEY, workers=args.workers, source=f"benchmarks/fuzz_serving.py seed={seed}")
        try:
            for request in KNOWN:
                if request.route in args.routes:
                    fuzzer.submit(request)
            fuzzer.wait()
            for route in args.routes:
                t0, n0 = time.monotonic(), fuzzer.tally.total()
                fuzzer.drive(REQUESTS[route], examples=args.requests_per_route, seed=seed)
                n = fuzzer.tally.total() - n0
                print(f"{route}: {n} requests in {time.monotonic() - t0:.0f}s, {len(fuzzer.tally.server_errors)} >= 500 so far", flush=True)
        finally:
            fuzzer.close()
        after = probe(deployed.url)
        tally = fuzzer.tally

        print(f"\n{tally.table()}\n")
        if len(tally.server_errors) > 30:
            print(f"{len(tally.server_errors)} answers >= 500; the first 30 (all of them are in {FINDINGS}):")
        for f in tally.server_errors[:30]:
            print(f"5xx: {f['method']} {f['path'][:100]} -> {f['status']} [{f['label'][:120]}]\n  body: {show_body(f['body'])}\n"
                  f"  answer: {f['response'][:600]}")
        for f in tally.broken[:30]:
            print(f"contract: {f['why']}: {f['method']} {f['path'][:100]} -> {f['status']} [{f['label'][:120]}]\n"
                  f"  body: {show_body(f['body'], 600)}\n  answer: {f['response'][:300]}")
        same = before == after and before["health"] == (200, "ok") and before["lookup"][0] == 200 and before["decision"][0] == 200
        print(f"after the run: {'answers as before' if same else 'CHANGED'}: health {after['health']}, "
              f"decision {after['decision'][:4]}, lookup {after['lookup'][0]}")
        if not same:
            print(f"  before: {before}\n  after:  {after}")
        return 1 if tally.server_errors or tally.broken or not same else 0
    finally:
        if platform is not None:
            platform.serving.shutdown()
            platform.close()
        stop(redis)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
