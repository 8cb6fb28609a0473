"""Serving under real HTTP load: the decision endpoint, the feature server and a bare
Serve + LightGBM baseline, in one Serve instance with the same ingress, at fixed connection
counts on loopback.

    python benchmarks/serving.py                       # SQLite online store, 10 s per point
    python benchmarks/serving.py --redis --seconds 20  # a redis-server on loopback instead
    python benchmarks/serving.py --connections 1 8 32 --replicas 2

Load comes from ``wrk`` (a Lua script gives every decision a fresh application_id, so no
request is an idempotent replay); without wrk, a Python asyncio client on raw sockets
(keep-alive, same connection counts), which costs CPU on the same cores. Each point reports
requests per second, p50 and p99 latency in ms and errors (socket errors + non-2xx), and for
decisions how many were fallbacks. Endpoints: ``baseline`` (bare Serve + LightGBM: JSON
features in, probability out), ``decision`` (``/v1/decisions``), ``features``
(``/get-online-features`` for the whole ``underwriting_v1`` service, on-demand features
included) and ``stored`` (the same lookup without the on-demand view). Points run
interleaved (all endpoints at each connection count) so a change in the
machine's background load hits all three alike; the 1-minute load average is printed with
each point. Figures, not assertions: targets at 8 connections are decisions >= 0.6x baseline
rps with p99 <= 15 ms and no errors, and feature server p99 <= 5 ms.
"""

# No ``from __future__ import annotations``: the baseline's route is shipped to its replicas by
# value and FastAPI must see ``Request`` as a class there, not as a string.
import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

KEY = "bench-" + "k" * 32
APPLICANTS, MERCHANTS = 5000, 200
# The stored (not on-demand) features of underwriting_v1: a lookup without the pandas transform.
STORED_REFS = [f"applicant_history:{k}_{w}" for w in ("30d", "90d", "365d")
               for k in ("loans", "late_installments", "missed_installments", "max_days_past_due")] + [
    "applicant_history:outstanding_balance", "applicant_history:avg_loan_amount_365d",
    "merchant_risk:default_rate_90d", "merchant_risk:outcomes_90d", "merchant_activity:applications_90d"]

WRK_SCRIPT = r"""
local counter = 0
local tid = 0
local threads = {}
local kind = "%(kind)s"
local key = "%(key)s"
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  math.randomseed(tid * 7919 + os.time())
end
function request()
  counter = counter + 1
  local applicant = math.random(0, %(applicants)d - 1)
  local body
  if kind == "decision" then
    body = string.format('{"application_id":"b%%d-%%d-%%d","applicant_id":%%d,"merchant_id":%%d,"amount":%%d.5,"currency":"USD","term":4,"timestamp":"%%s"}',
      tid, os.time(), counter, applicant, math.random(0, %(merchants)d - 1), math.random(20, 900), os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ"))
  elseif kind == "features" then
    body = string.format('{"feature_service":"underwriting_v1","entities":{"applicant_id":[%%d],"merchant_id":[%%d],"amount":[%%d.0],"term":[4]}}',
      applicant, math.random(0, %(merchants)d - 1), math.random(20, 900))
  elseif kind == "stored" then
    body = string.format('{"features":%(stored_refs)s,"entities":{"applicant_id":[%%d],"merchant_id":[%%d]}}',
      applicant, math.random(0, %(merchants)d - 1))
  else
    body = string.format('{"missed_installments_90d":%%d,"late_installments_30d":%%d,"loans_30d":1,"order_amount":%%d.0}',
      math.random(0, 3), math.random(0, 3), math.random(20, 900))
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-API-Key"] = key}, body)
end
fallbacks = 0
declines = 0
function response(status, headers, body)
  if kind == "decision" then
    if body:find('"fallback":true', 1, true) then fallbacks = fallbacks + 1 end
    if body:find('"decision":"decline"', 1, true) then declines = declines + 1 end
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  local f, d = 0, 0
  for _, t in ipairs(threads) do
    f = f + t:get("fallbacks")
    d = d + t:get("declines")
  end
  io.write(string.format("RESULT %%d %%f %%f %%f %%d %%d %%d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, e.connect + e.read + e.write + e.status + e.timeout, f, d))
end
"""


# ------------------------------------------------------------------------------- setup
def build_platform(root: Path, redis_url: str | None, deadline: str = "50ms"):
    import numpy as np
    import pandas as pd

    from mlplatform import Platform
    from workloads.underwriting.features import DEFINITIONS

    config = {
        "storage": {"root": str(root)},
        "ray": {"num_cpus": os.cpu_count()},
        "serving": {"port": _free_port(), "api_key_env": "MLP_BENCH_KEY", "deadline": deadline},
    }
    if redis_url:
        config["online_store"] = {"type": "redis", "url": redis_url}
    platform = Platform.from_config(config)
    platform.features.apply(DEFINITIONS)
    rng = np.random.default_rng(0)
    now = datetime.now(UTC) - timedelta(hours=1)
    for view, key, n in (("applicant_history", "applicant_id", APPLICANTS), ("merchant_risk", "merchant_id", MERCHANTS),
                         ("merchant_activity", "merchant_id", MERCHANTS)):
        fv = platform.features.get_feature_view(view)
        rows = {key: np.arange(n), "event_timestamp": [now] * n}
        for f in fv.features:
            rows[f.name] = rng.poisson(1.0, n).astype(float) if f.dtype == "float64" else rng.poisson(20, n)
        if view == "applicant_history":
            rows["avg_loan_amount_365d"] = rng.uniform(50, 500, n)
        platform.features.push(view, pd.DataFrame(rows), to="online")
    return platform


def train(platform):
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    names = [r.split(":")[1] for r in platform.features.resolve_features("underwriting_v1")]
    rng = np.random.default_rng(1)
    x = pd.DataFrame(rng.poisson(1.0, (5000, len(names))).astype(float), columns=names)
    logit = -3.0 + 1.2 * x["missed_installments_90d"] + 0.6 * x["late_installments_30d"]
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 31, "seed": 1}, lgb.Dataset(x, y), 100)
    mv = platform.models.register("underwriting", flavor="lightgbm", model=booster,
                                  lineage={"feature_service": "underwriting_v1"}, metrics={}, params={})
    platform.models.set_alias("underwriting", "production", mv.version)
    return booster


def deploy_floor(replicas: int, cpus: float) -> None:
    """Serve's floor on this machine: endpoints that do nothing, through the same ingress.
    ``floor-raw`` is a plain deployment (``__call__`` gets a Starlette request: no FastAPI),
    ``floor-fastapi`` a FastAPI route like the baseline's; both answer a constant body."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from ray import serve

    @serve.deployment(max_ongoing_requests=64, logging_config={"enable_access_log": False})
    class FloorRaw:
        async def __call__(self, request: Request) -> Response:
            return Response(b'{"ok":true}', media_type="application/json")

    floor = FastAPI()

    @serve.deployment(max_ongoing_requests=64, logging_config={"enable_access_log": False})
    @serve.ingress(floor)
    class FloorFastAPI:
        @floor.post("/")
        async def nothing(self) -> Response:
            return Response(b'{"ok":true}', media_type="application/json")

    for name, cls in (("floor-raw", FloorRaw), ("floor-fastapi", FloorFastAPI)):
        app = cls.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}).bind()
        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)


def deploy_baseline(model_text: str, replicas: int, cpus: float) -> None:
    """A bare FastAPI + LightGBM scorer: JSON features in, probability out."""
    from fastapi import FastAPI, Request
    from ray import serve

    baseline = FastAPI()

    @serve.deployment(max_ongoing_requests=64, logging_config={"enable_access_log": False})
    @serve.ingress(baseline)
    class Baseline:
        def __init__(self, text: str) -> None:
            import lightgbm as lgb

            self.booster = lgb.Booster(model_str=text)
            self.names = self.booster.feature_name()

        @baseline.post("/score")
        async def score(self, request: Request) -> dict:
            import numpy as np

            body = await request.json()
            x = np.array([[float(body.get(n, np.nan)) for n in self.names]])
            return {"probability": float(self.booster.predict(x, num_threads=1)[0])}

    app = Baseline.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}).bind(model_text)
    serve.run(app, name="baseline", route_prefix="/baseline", blocking=False)


# --------------------------------------------------------------------------------- load
def run_wrk(url: str, kind: str, connections: int, seconds: float) -> dict:
    script = WRK_SCRIPT % {"kind": kind, "key": KEY, "applicants": APPLICANTS, "merchants": MERCHANTS,
                           "stored_refs": json.dumps(STORED_REFS)}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
             "-s", f.name, url],
            capture_output=True, text=True, timeout=seconds + 120,
        ).stdout
    finally:
        os.unlink(f.name)
    line = next((line for line in out.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    n, duration, p50, p99, errors, fallbacks, declines = line.split()[1:]
    return {"rps": int(n) / float(duration), "p50": float(p50), "p99": float(p99), "errors": int(errors),
            "requests": int(n), "fallbacks": int(fallbacks), "declines": int(declines)}


def run_python(url: str, kind: str, connections: int, seconds: float) -> dict:
    """Fallback load generator: ``connections`` keep-alive sockets, one request in flight each."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    counter = iter(range(10**12))

    def body() -> bytes:
        applicant, merchant, amount = random.randrange(APPLICANTS), random.randrange(MERCHANTS), random.randint(20, 900)
        if kind == "decision":
            doc = {"application_id": f"py-{os.getpid()}-{next(counter)}", "applicant_id": applicant, "merchant_id": merchant,
                   "amount": amount + 0.5, "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()}
        elif kind == "features":
            doc = {"feature_service": "underwriting_v1",
                   "entities": {"applicant_id": [applicant], "merchant_id": [merchant], "amount": [float(amount)], "term": [4]}}
        elif kind == "stored":
            doc = {"features": STORED_REFS, "entities": {"applicant_id": [applicant], "merchant_id": [merchant]}}
        else:
            doc = {"missed_installments_90d": random.randint(0, 3), "order_amount": float(amount)}
        data = json.dumps(doc).encode()
        head = (f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
                f"X-API-Key: {KEY}\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        return head + data

    fallbacks: list[int] = []
    declines: list[int] = []

    async def client(stop: float, latencies: list[float], errors: list[int]) -> None:
        reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port)
        while time.perf_counter() < stop:
            started = time.perf_counter()
            writer.write(body())
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            payload = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not status.split()[1].startswith(b"2"):
                errors.append(1)
            if b'"fallback":true' in payload:
                fallbacks.append(1)
            if b'"decision":"decline"' in payload:
                declines.append(1)
        writer.close()

    async def main() -> tuple[list[float], list[int], float]:
        latencies: list[float] = []
        errors: list[int] = []
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds, latencies, errors) for _ in range(connections)), return_exceptions=True)
        return latencies, errors, time.perf_counter() - started

    latencies, errors, duration = asyncio.run(main())
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")  # noqa: E731
    return {"rps": len(latencies) / duration, "p50": pick(0.5), "p99": pick(0.99), "errors": len(errors),
            "requests": len(latencies), "fallbacks": len(fallbacks), "declines": len(declines)}


def check(url: str, kind: str) -> None:
    """One request per endpoint before timing it: a broken endpoint must not pass for a fast one."""
    import urllib.error
    import urllib.request

    bodies = {
        "decision": {"application_id": f"check-{time.time_ns()}", "applicant_id": 1, "merchant_id": 1, "amount": 100.0,
                     "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()},
        "features": {"feature_service": "underwriting_v1",
                     "entities": {"applicant_id": [1], "merchant_id": [1], "amount": [100.0], "term": [4]}},
        "baseline": {"missed_installments_90d": 1, "order_amount": 100.0},
        "floor-raw": {}, "floor-fastapi": {},
        "stored": {"features": STORED_REFS, "entities": {"applicant_id": [1], "merchant_id": [1]}},
    }
    request = urllib.request.Request(url, data=json.dumps(bodies[kind]).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-API-Key": KEY})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{kind} endpoint {url} answered {exc.code}: {exc.read()[:500]!r}") from None
    print(f"{kind}: {body[:160].decode()}", flush=True)


# --------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each point")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of each application")
    parser.add_argument("--redis", action="store_true", help="online store in a redis-server on loopback (default SQLite)")
    parser.add_argument("--root", default=None, help="storage root (default: a temporary directory)")
    parser.add_argument("--deadline", default="50ms", help="serving.deadline (default 50ms, the production default)")
    parser.add_argument("--spool-dir", default=None, help="decision log spool (default <root>/decisions/spool, on disk)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure endpoints that do nothing (raw Serve and FastAPI): the floor of this machine")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="mlp-serving-bench-"))
    redis = None
    if args.redis:
        port = _free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
        time.sleep(0.5)
    os.environ["MLP_BENCH_KEY"] = KEY
    # HAProxy's stats/metrics host ports: free ones, so the benchmark runs beside another Serve.
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))
    platform = build_platform(root, f"redis://127.0.0.1:{port}/0" if redis else None, args.deadline)
    booster = train(platform)
    cpus = max(0.1, (os.cpu_count() or 2) / ((4 if args.floor else 2) * args.replicas))
    deployed = platform.serving.deploy("underwriting", num_replicas=args.replicas, replica_cpus=cpus, spool_dir=args.spool_dir)
    deploy_baseline(booster.model_to_string(), args.replicas, cpus)
    if args.floor:
        deploy_floor(args.replicas, cpus)
    load = run_wrk if shutil.which("wrk") else run_python
    print(f"ingress: {deployed.ingress}; online store: {'redis' if redis else 'sqlite'}; load: {load.__name__}; "
          f"{args.replicas} replicas each; {os.cpu_count()} CPUs; deadline {args.deadline}; spool {deployed.spool_dir}", flush=True)

    targets = {"baseline": f"{deployed.url}/baseline/score", "decision": f"{deployed.url}/v1/decisions",
               "features": f"{deployed.url}/get-online-features", "stored": f"{deployed.url}/get-online-features"}
    if args.floor:
        targets.update({"floor-raw": f"{deployed.url}/floor-raw", "floor-fastapi": f"{deployed.url}/floor-fastapi/"})
        _wait_ready([targets["floor-raw"], targets["floor-fastapi"]])
    for kind, url in targets.items():
        check(url, kind)
        load(url, kind, 4, 2.0)  # warm up: connections, pools, caches
    rows = []
    for connections in args.connections:
        for kind, url in targets.items():
            result = load(url, kind, connections, args.seconds)
            result.update(kind=kind, connections=connections, load1=os.getloadavg()[0])
            rows.append(result)
            mix = f"  fallbacks {result['fallbacks']}  declines {result['declines']}" if kind == "decision" else ""
            print(f"{kind:9s} c={connections:3d}  {result['rps']:8.0f} rps  p50 {result['p50']:6.2f} ms  "
                  f"p99 {result['p99']:7.2f} ms  errors {result['errors']}{mix}  (load avg {result['load1']:.1f})", flush=True)

    print("\n| endpoint | connections | rps | p50 ms | p99 ms | errors | fallbacks | load avg (1 min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fb = f"{r['fallbacks']} of {r['requests']}" if r["kind"] == "decision" else "-"
        print(f"| {r['kind']} | {r['connections']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {fb} | {r['load1']:.1f} |")
    for connections in args.connections:
        by = {r["kind"]: r for r in rows if r["connections"] == connections}
        print(f"c={connections}: decisions / baseline rps = {by['decision']['rps'] / by['baseline']['rps']:.2f}")

    platform.serving.shutdown()
    if redis is not None:
        redis.terminate()
    platform.close()


def _wait_ready(urls: list[str], timeout: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=10).read()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} did not become ready in {timeout:.0f} s") from None
                time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
