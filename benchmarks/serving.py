"""Serving under real HTTP load: the decision endpoint with one model and with two, every
served model's V2 infer route, the feature server, a bare Serve + LightGBM baseline and the
no-op floor, in one Serve instance with the same ingress, at fixed connection counts on
loopback.

    python benchmarks/serving.py --floor                      # SQLite online store, 10 s per point
    python benchmarks/serving.py --redis --seconds 20         # a redis-server on loopback instead
    python benchmarks/serving.py --connections 8 --endpoints baseline decision decision2

Load comes from ``wrk`` (a Lua script gives every decision a fresh application_id, so no
request is an idempotent replay); without wrk, a Python asyncio client on raw sockets
(keep-alive, same connection counts), which costs CPU on the same cores. Each point reports
requests per second, p50 and p99 latency in ms and errors (socket errors + non-2xx), and for
decisions how many were fallbacks. Endpoints:

- ``baseline``: bare Serve + LightGBM (JSON features in, probability out);
- ``decision``: ``/v1/decisions`` of the platform's application as ``platform.serving.deploy``
  starts it, serving the LightGBM decision model only (as before the model server);
- ``decision2``: ``/two/v1/decisions`` of a second copy of the same application that also
  serves the fraud transformer (``serving.models``) and consults it through a model rule
  (``policy.model_rules``: review from the 95th percentile of its scores on this load, decline
  from the 99th, so most decisions are unaffected; ``on_unavailable: ignore``, the default);
  ``flagged`` counts answers carrying the rule's reason, and after the run the decision log
  says how often the rule's model scored in time (``scored``) or not (``deadline_exceeded``…);
- ``infer_lgbm`` / ``infer_torch``: ``POST /two/v2/models/{underwriting,fraud}/infer``, one row
  as the protocol's JSON (LightGBM: every feature, random values; fraud: the real input of one
  of 64 applicants, built from the online store by the model's own input builder);
- ``features``: ``/get-online-features`` for the whole ``underwriting_v1`` service (on-demand
  features included), ``stored`` the same lookup without the on-demand view;
- with ``--floor``, ``floor-raw`` and ``floor-fastapi``: endpoints that do nothing.

Why two applications side by side: ``platform.serving.deploy`` runs one application at ``/``,
and redeploying between phases would put minutes and a replica restart between ``decision``
and ``decision2``. Here the second copy is built from the same ``AppSettings`` that deploy
builds (same config, keys, deadline; its own decision-log spool), changing only
``serving.models`` and the policy, and mounted at ``/two`` behind the same ingress, with the
same replicas and CPU reservation as the first; both are up for the whole run, so ``decision``
and ``decision2`` are measured back to back at each connection count under the same machine
load, and ``decision2 / decision`` is what the second model costs a decision. Stream
processors are not started (``deploy(stream_processors=False)``): no events are posted, and
their CPU reservation would not leave room for the replicas.

The fraud model: a ``FraudTransformer`` of the fraud workload's default shape
(``configs/fraud.yaml``), randomly initialised (speed does not depend on the weights), over
generated applicants (ids 1..~5,000, the ids decisions draw) whose applications, repayment
events and merchants are loaded into the online event state by the fraud workload's own
steps (as ``tests/integration/_serving_app.fraud_world``).

Points run interleaved (all endpoints at each connection count) so a change in the machine's
background load hits all of them alike; the 1-minute load average is printed with each point.
Figures, not assertions: targets at 8 connections are decisions >= 0.6x baseline rps with
p99 <= 15 ms and no errors, feature server p99 <= 5 ms, and two-model decisions no slower than
one-model decisions.
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
#: Endpoints of the second application (``/two``), which serves the fraud model too.
TWO_MODEL_KINDS = ("decision2", "infer_lgbm", "infer_torch")
FLOOR_KINDS = ("floor-raw", "floor-fastapi")
ALL_KINDS = ("baseline", "decision", "decision2", "features", "stored", "infer_lgbm", "infer_torch", *FLOOR_KINDS)
DECISION_KINDS = ("decision", "decision2")
#: Application ids of two-model decisions start with this (the decision log is shared).
TWO_ID_PREFIX = "two-"
FRAUD_PREFIX = "raw/fraudbench"
#: About 4.5 applications an applicant in the generator: ~5,000 applicants, ids from 1.
FRAUD_APPLICATIONS = 22_500

# ``tid`` is a global on purpose: ``setup`` sets it in each thread's Lua state (``thread:set``)
# after the chunk ran, and a chunk-level ``local tid`` would shadow it, leaving every thread
# tid 0 with the same random seed, so two threads sent identical applications (same id, same
# body): idempotent replays, not decisions.
WRK_SCRIPT = r"""
local counter = 0
tid = 0
local threads = {}
local kind = "%(kind)s"
local key = "%(key)s"
local lgbm_names = {%(lgbm_names)s}
local torch_bodies = {%(torch_bodies)s}
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
  if kind == "decision" or kind == "decision2" then
    body = string.format('{"application_id":"%%s%%d-%%d-%%d","applicant_id":%%d,"merchant_id":%%d,"amount":%%d.5,"currency":"USD","term":4,"timestamp":"%%s"}',
      kind == "decision2" and "%(two_prefix)s" or "b", tid, os.time(), counter, applicant, math.random(0, %(merchants)d - 1), math.random(20, 900), os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ"))
  elseif kind == "features" then
    body = string.format('{"feature_service":"underwriting_v1","entities":{"applicant_id":[%%d],"merchant_id":[%%d],"amount":[%%d.0],"term":[4]}}',
      applicant, math.random(0, %(merchants)d - 1), math.random(20, 900))
  elseif kind == "stored" then
    body = string.format('{"features":%(stored_refs)s,"entities":{"applicant_id":[%%d],"merchant_id":[%%d]}}',
      applicant, math.random(0, %(merchants)d - 1))
  elseif kind == "infer_lgbm" then
    local parts = {}
    for i, name in ipairs(lgbm_names) do
      parts[i] = string.format('{"name":"%%s","shape":[1],"datatype":"FP64","data":[%%d.0]}', name, math.random(0, 3))
    end
    body = '{"inputs":[' .. table.concat(parts, ",") .. ']}'
  elseif kind == "infer_torch" then
    body = torch_bodies[math.random(1, #torch_bodies)]
  else
    body = string.format('{"missed_installments_90d":%%d,"late_installments_30d":%%d,"loans_30d":1,"order_amount":%%d.0}',
      math.random(0, 3), math.random(0, 3), math.random(20, 900))
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-API-Key"] = key}, body)
end
fallbacks = 0
declines = 0
flagged = 0
function response(status, headers, body)
  if kind == "decision" or kind == "decision2" then
    if body:find('"fallback":true', 1, true) then fallbacks = fallbacks + 1 end
    if body:find('"decision":"decline"', 1, true) then declines = declines + 1 end
    if body:find('"code":"fraud_risk"', 1, true) then flagged = flagged + 1 end
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  local f, d, g = 0, 0, 0
  for _, t in ipairs(threads) do
    f = f + t:get("fallbacks")
    d = d + t:get("declines")
    g = g + t:get("flagged")
  end
  io.write(string.format("RESULT %%d %%f %%f %%f %%d %%d %%d %%d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, e.connect + e.read + e.write + e.status + e.timeout, f, d, g))
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
        "serving": {"port": _free_port(), "api_key_env": "MLP_BENCH_KEY", "deadline": deadline,
                    "api_key_roles": ["decide", "predict", "read_features", "operate"]},
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


def setup_fraud(platform) -> dict:
    """The fraud model and its world: generated applicants (ids from 1, about ``APPLICANTS`` of
    them) whose applications, repayment events and merchants are published under
    ``FRAUD_PREFIX`` and loaded into the online event state by the fraud workload's own steps; a
    randomly initialised ``FraudTransformer`` of the workload's default shape registered as
    ``fraud`` (production). Returns the model rule (thresholds at the 95th and 99th percentile
    of its scores on applications like this benchmark's) and the V2 bodies of both models."""
    import numpy as np
    from fraud_serving import (  # benchmarks/fraud_serving.py
        generated_world,
        load_online,
        register_fraud_model,
    )

    from mlplatform.serving.catalog import FeatureCatalog
    from workloads.fraud.online import serving_inputs

    started = time.perf_counter()
    _, tables = generated_world({"applications": FRAUD_APPLICATIONS, "merchants": MERCHANTS, "seed": 5})
    load_online(platform, tables, prefix=FRAUD_PREFIX)
    version = register_fraud_model(platform)
    _, predictor = platform.models.load_predictor("fraud", version=version)
    catalog = FeatureCatalog(platform.features)
    rng = random.Random(3)
    now = datetime.now(UTC)
    sample = [{"applicant_id": rng.randrange(APPLICANTS), "merchant_id": rng.randrange(MERCHANTS),
               "amount": rng.randint(20, 900) + 0.5, "timestamp": now} for _ in range(2000)]  # fmt: skip
    inputs = serving_inputs(catalog, sample, predictor.signature)
    scores = predictor.predict(inputs)["probability"]
    review_at, decline_at = (float(np.quantile(scores, q)) for q in (0.95, 0.99))
    rule = {"model": "fraud", "review_at": round(review_at, 6), "decline_at": round(decline_at, 6), "code": "fraud_risk"}
    with_history = float(np.mean(inputs["mask"].any(axis=1)))

    datatypes = {"int64": "INT64", "float32": "FP32", "float64": "FP64", "bool": "BOOL"}
    torch_bodies = [  # one-row bodies of real inputs: the first 64 sampled applicants with a history
        json.dumps({"inputs": [
            {"name": n, "shape": [1, *a.shape[1:]], "datatype": datatypes[str(a.dtype)], "data": a[row].reshape(-1).tolist()}
            for n, a in inputs.items()]}, separators=(",", ":"))
        for row in np.flatnonzero(inputs["mask"].any(axis=1))[:64]
    ]  # fmt: skip
    _, lgbm = platform.models.load_predictor("underwriting", alias="production")
    lgbm_names = [spec.name for spec in lgbm.signature.inputs]
    print(f"fraud model v{version}: {len(tables['applications']):,} applications of generated applicants online, "
          f"{with_history:.0%} of sampled decisions have a history; rule {rule} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return {"rule": rule, "torch_bodies": torch_bodies, "lgbm_names": lgbm_names}


def deploy_two_models(platform, policy: dict, replicas: int, cpus: float, spool_dir: str) -> None:
    """A second copy of the serving application at ``/two`` that also serves the fraud model and
    consults it in decisions (``policy`` with its model rule): the ``AppSettings`` that
    ``platform.serving.deploy`` builds (same config, keys and deadline), with ``serving.models``
    and the policy changed and a decision-log spool of its own, deployed with the same replicas
    and CPUs as the first copy. (``deploy`` itself runs one application, at ``/``.)"""
    from ray import serve

    from mlplatform.platform import serving_parts
    from mlplatform.served_models import ServedModelConfig
    from mlplatform.serving.app import AppSettings, ServingApp
    from mlplatform.serving.keys import load_keys

    config = platform.config
    fraud = ServedModelConfig(name="fraud")
    portable = config.model_dump(mode="json")  # as deploy ships it: local paths absolute
    portable["storage"]["root"] = os.path.abspath(platform.storage.root)
    if portable["online_store"].get("type") == "sqlite":
        portable["online_store"]["path"] = platform.features.online_store.path
    portable["serving"]["models"] = [fraud.model_dump(mode="json")]
    served = (ServedModelConfig(name="underwriting", feature_service="underwriting_v1"), fraud)
    settings = AppSettings(
        config=portable, parts=serving_parts, model_name="underwriting", feature_service="underwriting_v1", policy=policy,
        keys=load_keys(config.serving), max_clock_skew_s=config.serving.max_clock_skew.total_seconds(), spool_dir=spool_dir,
        deadline_s=config.serving.deadline.total_seconds(), models=tuple(m.model_dump(mode="json") for m in served),
    )  # fmt: skip
    app = ServingApp.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus}, logging_config={"enable_access_log": False}
    ).bind(settings, {})
    serve.run(app, name="two-models", route_prefix="/two", blocking=False)


def rule_statuses(platform, spool_dir: str, since: datetime) -> dict[str, int]:
    """How the fraud rule's model answered in the two-model decisions logged since ``since``:
    count per status (``scored``, ``deadline_exceeded``, ``model_unavailable``,
    ``scoring_failed``), and ``no rule`` for decisions made without it (fallbacks)."""
    from mlplatform.serving.decisions.lookup import read_decisions

    counts: dict[str, int] = {}
    for record in read_decisions(platform.storage, spool_dir=spool_dir, since=since):
        if not record["application_id"].startswith(TWO_ID_PREFIX):  # the one-model application's
            continue
        rules = record.get("rule_models")
        rules = json.loads(rules) if isinstance(rules, str) else rules
        if not rules:
            if record.get("fallback"):
                counts["no rule (fallback)"] = counts.get("no rule (fallback)", 0) + 1
            continue
        for rule in rules:
            counts[rule["status"]] = counts.get(rule["status"], 0) + 1
    return counts


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
def run_wrk(url: str, kind: str, connections: int, seconds: float, payloads: dict | None = None) -> dict:
    """One point with wrk; ``payloads`` holds the infer routes' ``lgbm_names`` and ``torch_bodies``."""
    payloads = payloads or {}
    script = WRK_SCRIPT % {"kind": kind, "key": KEY, "applicants": APPLICANTS, "merchants": MERCHANTS,
                           "stored_refs": json.dumps(STORED_REFS), "two_prefix": TWO_ID_PREFIX,
                           "lgbm_names": ",".join(json.dumps(n) for n in payloads.get("lgbm_names", [])),
                           "torch_bodies": ",".join(f"[==[{b}]==]" for b in payloads.get("torch_bodies", []))}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
             "-s", f.name, url],
            capture_output=True, text=True, timeout=seconds + 120, check=False,
        ).stdout
    finally:
        os.unlink(f.name)
    line = next((line for line in out.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    n, duration, p50, p99, errors, fallbacks, declines, flagged = line.split()[1:]
    return {"rps": int(n) / float(duration), "p50": float(p50), "p99": float(p99), "errors": int(errors),
            "requests": int(n), "fallbacks": int(fallbacks), "declines": int(declines), "flagged": int(flagged)}


def run_python(url: str, kind: str, connections: int, seconds: float, payloads: dict | None = None) -> dict:
    """Fallback load generator: ``connections`` keep-alive sockets, one request in flight each."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    counter = iter(range(10**12))
    payloads = payloads or {}

    def body() -> bytes:
        applicant, merchant, amount = random.randrange(APPLICANTS), random.randrange(MERCHANTS), random.randint(20, 900)
        if kind in DECISION_KINDS:
            prefix = TWO_ID_PREFIX if kind == "decision2" else "py-"
            doc = {"application_id": f"{prefix}{os.getpid()}-{next(counter)}", "applicant_id": applicant, "merchant_id": merchant,
                   "amount": amount + 0.5, "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()}
        elif kind == "infer_lgbm":
            doc = {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [float(random.randint(0, 3))]}
                              for n in payloads["lgbm_names"]]}
        elif kind == "infer_torch":
            doc = json.loads(random.choice(payloads["torch_bodies"]))
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
    flagged: list[int] = []

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
            if b'"code":"fraud_risk"' in payload:
                flagged.append(1)
        writer.close()

    async def main() -> tuple[list[float], list[int], float]:
        latencies: list[float] = []
        errors: list[int] = []
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds, latencies, errors) for _ in range(connections)), return_exceptions=True)
        return latencies, errors, time.perf_counter() - started

    latencies, errors, duration = asyncio.run(main())
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    return {"rps": len(latencies) / duration, "p50": pick(0.5), "p99": pick(0.99), "errors": len(errors),
            "requests": len(latencies), "fallbacks": len(fallbacks), "declines": len(declines), "flagged": len(flagged)}


def check(url: str, kind: str, payloads: dict | None = None) -> None:
    """One request per endpoint before timing it: a broken endpoint must not pass for a fast one."""
    import urllib.error
    import urllib.request

    payloads = payloads or {}
    decision = {"application_id": f"check-{time.time_ns()}", "applicant_id": 1, "merchant_id": 1, "amount": 100.0,
                "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()}
    bodies = {
        "decision": decision,
        "decision2": {**decision, "application_id": f"{TWO_ID_PREFIX}check-{time.time_ns()}"},
        "features": {"feature_service": "underwriting_v1",
                     "entities": {"applicant_id": [1], "merchant_id": [1], "amount": [100.0], "term": [4]}},
        "baseline": {"missed_installments_90d": 1, "order_amount": 100.0},
        "floor-raw": {}, "floor-fastapi": {},
        "stored": {"features": STORED_REFS, "entities": {"applicant_id": [1], "merchant_id": [1]}},
        "infer_lgbm": {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [1.0]} for n in payloads.get("lgbm_names", [])]},
        "infer_torch": json.loads(payloads["torch_bodies"][0]) if payloads.get("torch_bodies") else {},
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
    parser.add_argument("--endpoints", nargs="+", choices=ALL_KINDS, default=None,
                        help="measure only these (default: all; the floor's with --floor)")
    args = parser.parse_args()
    kinds = [k for k in ALL_KINDS if (k in args.endpoints if args.endpoints else (args.floor or k not in FLOOR_KINDS))]
    two_models = any(k in TWO_MODEL_KINDS for k in kinds)
    floor = any(k in FLOOR_KINDS for k in kinds)

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
    payloads = setup_fraud(platform) if two_models else {}
    # Every application gets the same share of the CPUs Ray has (replicas x CPUs each).
    apps = 2 + (1 if two_models else 0) + (2 if floor else 0)
    cpus = max(0.1, (os.cpu_count() or 2) / (apps * args.replicas))
    deployed = platform.serving.deploy("underwriting", num_replicas=args.replicas, replica_cpus=cpus, spool_dir=args.spool_dir,
                                       stream_processors=False)
    deploy_baseline(booster.model_to_string(), args.replicas, cpus)
    two_spool = f"{deployed.spool_dir.rstrip(os.sep)}-two"
    if two_models:
        policy = platform.config.serving.policy.model_dump(mode="json")
        policy["model_rules"] = [payloads["rule"]]
        deploy_two_models(platform, policy, args.replicas, cpus, two_spool)
    if floor:
        deploy_floor(args.replicas, cpus)
    load = run_wrk if shutil.which("wrk") else run_python
    print(f"ingress: {deployed.ingress}; online store: {'redis' if redis else 'sqlite'}; load: {load.__name__}; "
          f"{args.replicas} replicas each, {cpus:.2f} CPUs each; {os.cpu_count()} CPUs; deadline {args.deadline}; "
          f"spool {deployed.spool_dir}", flush=True)

    urls = {"baseline": f"{deployed.url}/baseline/score", "decision": f"{deployed.url}/v1/decisions",
            "decision2": f"{deployed.url}/two/v1/decisions", "features": f"{deployed.url}/get-online-features",
            "stored": f"{deployed.url}/get-online-features", "infer_lgbm": f"{deployed.url}/two/v2/models/underwriting/infer",
            "infer_torch": f"{deployed.url}/two/v2/models/fraud/infer", "floor-raw": f"{deployed.url}/floor-raw",
            "floor-fastapi": f"{deployed.url}/floor-fastapi/"}  # fmt: skip
    targets = {k: urls[k] for k in kinds}
    if two_models:
        _wait_answering(f"{deployed.url}/two/health")
    if floor:
        _wait_ready([urls["floor-raw"], urls["floor-fastapi"]])
    for kind, url in targets.items():
        check(url, kind, payloads)
        load(url, kind, 4, 2.0, payloads)  # warm up: connections, pools, caches
    rows = []
    measured_from = datetime.now(UTC)
    for connections in args.connections:
        for kind, url in targets.items():
            result = load(url, kind, connections, args.seconds, payloads)
            result.update(kind=kind, connections=connections, load1=os.getloadavg()[0])
            rows.append(result)
            mix = f"  fallbacks {result['fallbacks']}  declines {result['declines']}" if kind in DECISION_KINDS else ""
            mix += f"  flagged {result['flagged']}" if kind == "decision2" else ""
            print(f"{kind:13s} c={connections:3d}  {result['rps']:8.0f} rps  p50 {result['p50']:6.2f} ms  "
                  f"p99 {result['p99']:7.2f} ms  errors {result['errors']}{mix}  (load avg {result['load1']:.1f})", flush=True)

    print("\n| endpoint | connections | rps | p50 ms | p99 ms | errors | fallbacks | load avg (1 min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fb = f"{r['fallbacks']} of {r['requests']}" if r["kind"] in DECISION_KINDS else "-"
        print(f"| {r['kind']} | {r['connections']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} | {fb} | {r['load1']:.1f} |")
    for i, connections in enumerate(args.connections):  # a connection count may be given more than once
        by = {r["kind"]: r for r in rows[i * len(targets):(i + 1) * len(targets)]}
        if "decision" in by and "baseline" in by:
            print(f"c={connections}: decisions / baseline rps = {by['decision']['rps'] / by['baseline']['rps']:.2f}")
        if "decision" in by and "decision2" in by:
            one, two = by["decision"], by["decision2"]
            print(f"c={connections}: two-model / one-model decisions rps = {two['rps'] / one['rps']:.2f} "
                  f"(p99 {two['p99']:.2f} vs {one['p99']:.2f} ms; fraud reason on {two['flagged']} of {two['requests']})")
    if "decision2" in targets:
        statuses = rule_statuses(platform, two_spool, measured_from)
        print(f"fraud rule in two-model decisions (decision log): {statuses}")
    for kind, base in (("decision", deployed.url), ("decision2", f"{deployed.url}/two")):
        if kind in targets:
            try:
                print(f"{kind}: {replica_batches(base, args.replicas)}")
            except OSError as exc:  # urllib's errors: the figures are extra, the run's results stand
                print(f"{kind}: replica batches not read: {exc}")

    platform.serving.shutdown()
    if two_models:
        from ray import serve

        serve.delete("two-models")
    if redis is not None:
        redis.terminate()
    platform.close()


def replica_batches(base: str, replicas: int) -> str:
    """Decisions per micro-batch since each replica started (``/v1/internal/replica``; each
    GET reaches one replica, so a few are tried)."""
    import urllib.request

    seen: dict[str, dict] = {}
    for _ in range(8 * replicas):
        request = urllib.request.Request(f"{base}/v1/internal/replica", headers={"X-API-Key": KEY})
        with urllib.request.urlopen(request, timeout=10) as response:
            doc = json.loads(response.read())
        seen[doc["replica_id"]] = doc
        if len(seen) == replicas:
            break
    parts = []
    for doc in seen.values():
        d = doc["batches"]["decide"]
        parts.append(f"{d['requests'] / max(1, d['batches']):.2f}")
    return f"decisions a micro-batch {', '.join(parts)} ({len(seen)} of {replicas} replicas, since each started)"


def _wait_answering(url: str, timeout: float = 300.0) -> None:
    """Poll ``GET url`` until it answers 200. (With the key: under a route prefix the guard
    does not see ``/health`` as its open route.)"""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"X-API-Key": KEY}), timeout=10) as response:
                if response.status == 200:
                    return
                last = response.status
        except urllib.error.HTTPError as exc:
            last = f"{exc.code}: {exc.read()[:300]!r}"
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer 200 in {timeout:.0f} s (last: {last!r})")
        time.sleep(0.5)


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
    """A port free now, outside the kernel's ephemeral range and Ray's worker ports (10002-19999):
    one taken from the ephemeral range (bind to 0) can be handed to one of the many sockets Ray
    opens before the process it was meant for binds it (it happened to HAProxy's stats port)."""
    for _ in range(200):
        port = random.randint(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-32000")


if __name__ == "__main__":
    sys.exit(main())
