"""The deployed serving application shared by the serving test modules (one deployment a session).

``served`` (in conftest.py) deploys it once: a platform on tmp disk, a real redis-server as
online and idempotency store, the underwriting definitions, model v1 in production, two
replicas behind the ingress. The key ``KEY`` holds every role. Modules that use it run
before ``test_serving.py``, whose last test stops Redis and shuts the application down.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import requests

from mlplatform import Platform
from mlplatform.jobs.steps import StepRunner
from workloads.fraud.features import DEFINITIONS as FRAUD_DEFINITIONS
from workloads.underwriting.features import DEFINITIONS

ROLES = ["decide", "predict", "read_features", "write_features", "operate"]
#: A checkout caller's key: role ``decide`` only, configured as a digest.
CHECKOUT_KEY = "checkout-key-" + "c" * 24
DIGESTS_ENV = "MLP_TEST_SERVING_KEY_DIGESTS"

KEY = "test-key-" + "x" * 24
KEY_ENV = "MLP_TEST_SERVING_KEY"
HEADERS = {"X-API-Key": KEY}
RISKY, SAFE, UNKNOWN = 900_001, 900_002, 123_456_789
#: The fraud model (trained below) flags large amounts: review from 0.4, decline from 0.75; when
#: it gives no score in time the decision is made without it (``on_unavailable: ignore``).
FRAUD_RULE = {"model": "fraud", "review_at": 0.4, "decline_at": 0.75, "code": "fraud_risk", "text": "We could not verify this purchase"}
POLICY = {"approve_below": 0.1, "decline_at": 0.3, "max_amount": 2000, "shadow_alias": "candidate", "model_rules": [FRAUD_RULE]}
#: The fraud model's history world: generated applicants whose events are online (raw tables under this prefix).
FRAUD_PREFIX = "raw/fraudworld"
FRAUD_K = 8
FRAUD_DEADLINE_S = 1.0
#: Offers for approved decisions: the policy model ``offer_policy`` v1 acts (alias production),
#: v2 is logged beside it (alias shadow). Caps: PD < 0.03 up to line_2000, < 0.06 up to line_1000,
#: else line_500 only. The policies read the request's amount and term.
OFFERS = {
    "tiers": [{"name": "line_500", "amount": 500}, {"name": "line_1000", "amount": 1000}, {"name": "line_2000", "amount": 2000, "installments": 6}],
    "risk_caps": [{"pd_below": 0.03, "max_tier": "line_2000"}, {"pd_below": 0.06, "max_tier": "line_1000"}],
    "policy_model": "offer_policy", "shadow_alias": "shadow", "exploration": 0.1,
}
OFFER_FEATURES = ("amount", "term")


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range and Ray's worker ports (10002-19999):
    a port taken from the ephemeral range (bind to 0) can be handed to one of the many sockets
    Ray opens before the process it was meant for binds it (it happened to HAProxy's stats port)."""
    import random

    for _ in range(200):
        port = random.randint(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 20000-32000")


def start_redis(directory) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
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
    proc.kill()
    raise RuntimeError("redis-server did not start")


def feature_names(platform: Platform) -> list[str]:
    return [ref.split(":")[1] for ref in platform.features.resolve_features("underwriting_v1")]


def train(platform: Platform, seed: int) -> lgb.Booster:
    """A small model on random data whose risk rises with missed and late payments."""
    names = feature_names(platform)
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.poisson(1.0, (3000, len(names))).astype(float), columns=names)
    logit = -4.0 + 1.5 * x["missed_installments_90d"] + 0.8 * x["late_installments_30d"]
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": seed, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=30)


def register(platform: Platform, seed: int) -> int:
    mv = platform.models.register(
        "underwriting", flavor="lightgbm", model=train(platform, seed),
        lineage={"feature_service": "underwriting_v1"}, metrics={}, params={"seed": seed},
    )
    return mv.version


def fraud_world(platform: Platform) -> dict:
    """Generated applicants' raw tables under ``FRAUD_PREFIX``, their behaviour events in the
    offline log and the online event state (the fraud workload's own steps), and their
    training sequences (the training kernel), for the fraud model's tests."""
    from workloads.fraud.online import online_steps
    from workloads.fraud.sequences import sequences_from_tables
    from workloads.underwriting.generate import DataConfig, generate_merchants, generate_shard

    config = DataConfig(applications=600, merchants=20, seed=5, shards=1)
    tables = generate_shard(config, 0)
    raw = {**tables, "merchants": generate_merchants(config)}
    for name, table in raw.items():
        platform.datasets.publish(f"{FRAUD_PREFIX}/{name}", table)
    StepRunner(platform.storage).run_all(online_steps(platform, prefix=FRAUD_PREFIX))
    sequences = sequences_from_tables(
        tables["applications"], tables["outcomes"], tables["repayment_events"], max_events=FRAUD_K, cutoff=config.end
    )
    return {"tables": tables, "sequences": sequences}


def train_fraud(sequences, seed: int):
    """A small fraud transformer whose score rises with the order amount (high above 1,000),
    trained in seconds on the world's real histories with amounts drawn afresh."""
    import math

    import torch

    from workloads.fraud.model import FraudTransformer, TransformerConfig
    from workloads.fraud.sequences import to_tensors

    torch.manual_seed(seed)
    model = FraudTransformer(TransformerConfig(d_model=16, heads=2, layers=1, ff=32, dropout=0.0, max_events=FRAUD_K))
    data = {k: v for k, v in to_tensors(sequences).items() if k != "label"}
    n = len(data["app_log_amount"])
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(800):
        idx = torch.randint(0, n, (64,), generator=gen)
        batch = {k: v[idx] for k, v in data.items()}
        amount = torch.exp(torch.empty(64).uniform_(math.log(20.0), math.log(2000.0), generator=gen))
        batch["app_log_amount"] = torch.log1p(amount).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**batch), (amount > 1000).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def register_fraud(platform: Platform, sequences, seed: int) -> int:
    from workloads.fraud.model import flavor_config

    model = train_fraud(sequences, seed)
    mv = platform.models.register(
        "fraud", flavor="torch", model=model, flavor_config=flavor_config(model.config),
        lineage={}, metrics={}, params={"seed": seed},
    )
    return mv.version


def register_offer_policy(platform: Platform, seed: int, kind: str) -> int:
    """A small network policy over the request's amount and term (softmax with exploration, or greedy)."""
    from mlplatform.rl import OfferConfig, PolicyModel, Selection

    rng = np.random.default_rng(seed)
    offers = OfferConfig(tiers=OFFERS["tiers"], risk_caps=OFFERS["risk_caps"])
    layers = [(rng.normal(size=(3, len(OFFER_FEATURES))), rng.normal(size=3))]
    selection = Selection(kind="softmax", epsilon=0.1) if kind == "softmax" else Selection(kind="greedy")
    model = PolicyModel.from_mlp(f"offers_{kind}", layers, np.array([300.0, 6.0]), np.array([200.0, 3.0]), OFFER_FEATURES, offers, selection)
    return platform.models.register("offer_policy", flavor="policy", model=model, lineage={}, metrics={}, params={}).version


def history(applicant_id: int, when: datetime, **values: float) -> dict:
    row = {"applicant_id": applicant_id, "event_timestamp": when.isoformat()}
    for window in ("30d", "90d", "365d"):
        for kind in ("loans", "late_installments", "missed_installments", "max_days_past_due"):
            row[f"{kind}_{window}"] = 0.0
    row.update(outstanding_balance=0.0, avg_loan_amount_365d=200.0)
    row.update(values)
    return row


def application(applicant_id: int = SAFE, **overrides) -> dict:
    body = {
        "application_id": f"app-{uuid.uuid4().hex[:16]}",
        "applicant_id": applicant_id,
        "merchant_id": 7,
        "amount": 120.0,
        "currency": "USD",
        "term": 4,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    body.update(overrides)
    return body


class Served:
    """The deployed application: ``platform``, ``deployed`` and ``redis_proc``, unpackable as a
    tuple; ``close()`` shuts it down (idempotent). ``fraud`` is the fraud model's world
    (``fraud_world``)."""

    def __init__(self, platform, deployed, redis_proc, old_env, fraud=None) -> None:
        self.platform, self.deployed, self.redis_proc, self._old_env = platform, deployed, redis_proc, old_env
        self.fraud = fraud
        self.closed = False

    def __iter__(self):
        return iter((self.platform, self.deployed, self.redis_proc))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.platform.serving.shutdown()
        if self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(timeout=10)
        for k, v in self._old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deploy_served(tmp_path_factory) -> Served:
    """A platform on tmp disk + Redis, underwriting definitions, a few online rows, model v1 in
    production, and the serving app deployed with two replicas."""
    root = tmp_path_factory.mktemp("serving")
    redis_proc, redis_url = start_redis(root)
    # HAProxy's stats and metrics ports are fixed host ports: free ones let this run beside
    # another Serve with HAProxy on the machine (deploy passes RAY_SERVE_* on to Serve).
    env = {KEY_ENV: KEY, DIGESTS_ENV: f"decide:{hashlib.sha256(CHECKOUT_KEY.encode()).hexdigest()}", "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    platform = Platform.from_config({
        "project": "servingtest",
        "storage": {"root": str(root / "store")},
        "online_store": {"type": "redis", "url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:6]}", "timeout": "2s"},
        # A loaded CI machine can take far longer than production's 50 ms; the fallback test
        # stops Redis instead, which fails fast.
        "serving": {
            "port": free_port(), "deadline": "3s", "api_key_env": KEY_ENV, "api_key_roles": ROLES, "api_key_digests_env": DIGESTS_ENV,
            # the fraud model in the ingress replicas, with a builder that is slow for one applicant on demand
            "models": [{"name": "fraud", "deadline": f"{FRAUD_DEADLINE_S}s", "batching": {"max_batch_size": 64}, "shadow_alias": "candidate",
                        "input_builder": "tests.integration._fraud_builders:slow_for_one_applicant"},
                       # the same weights served by a deployment of its own (the path a GPU model takes)
                       {"name": "fraud_remote", "deployment": {"num_replicas": 1, "num_cpus": 0}}],
            "offers": OFFERS,
        },
        # the processors deploy starts reserve no CPU, so the replicas (2 x 0.5) leave exactly one
        # of the session's two CPUs to the Ray Data tasks of the modules that run while the
        # application is up (a task needs a whole CPU: 0.9 free would hang them)
        "streams": {"processor_cpus": 0, "block": "100ms", "flush_interval": "200ms", "claim_idle": "2s"},
    })
    platform.features.apply(DEFINITIONS + FRAUD_DEFINITIONS)
    version = register(platform, seed=1)
    platform.models.set_alias("underwriting", "production", version)
    fraud = fraud_world(platform)
    platform.models.set_alias("fraud", "production", register_fraud(platform, fraud["sequences"], seed=1))
    same = platform.models.load("fraud", version=1)
    remote = platform.models.register(
        "fraud_remote", flavor="torch", model=same.model, flavor_config=same.version.flavor_config, lineage={}, metrics={}, params={}
    )
    platform.models.set_alias("fraud_remote", "production", remote.version)
    platform.models.set_alias("offer_policy", "production", register_offer_policy(platform, seed=1, kind="softmax"))
    platform.models.set_alias("offer_policy", "shadow", register_offer_policy(platform, seed=2, kind="greedy"))
    started = time.monotonic()
    deployed = platform.serving.deploy("underwriting", policy=POLICY, num_replicas=2, replica_cpus=0.5)
    print(f"deployed in {time.monotonic() - started:.1f}s via {deployed.ingress}")
    return Served(platform, deployed, redis_proc, old_env, fraud)


def post(url: str, body, headers=HEADERS, session=None, **kw) -> requests.Response:
    return (session or requests).post(url, json=body, headers=headers, timeout=30, **kw)


def push_online(deployed, view: str, rows: list[dict]) -> requests.Response:
    df = {col: [row[col] for row in rows] for col in rows[0]}
    return post(f"{deployed.url}/push", {"push_source_name": view, "df": df, "to": "online"})


