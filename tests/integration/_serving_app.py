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
from workloads.underwriting.features import DEFINITIONS

ROLES = ["decide", "read_features", "write_features", "operate"]
#: A checkout caller's key: role ``decide`` only, configured as a digest.
CHECKOUT_KEY = "checkout-key-" + "c" * 24
DIGESTS_ENV = "MLP_TEST_SERVING_KEY_DIGESTS"

KEY = "test-key-" + "x" * 24
KEY_ENV = "MLP_TEST_SERVING_KEY"
HEADERS = {"X-API-Key": KEY}
RISKY, SAFE, UNKNOWN = 900_001, 900_002, 123_456_789
POLICY = {"approve_below": 0.1, "decline_at": 0.3, "max_amount": 2000, "shadow_alias": "candidate"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    tuple; ``close()`` shuts it down (idempotent)."""

    def __init__(self, platform, deployed, redis_proc, old_env) -> None:
        self.platform, self.deployed, self.redis_proc, self._old_env = platform, deployed, redis_proc, old_env
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
        "serving": {"port": free_port(), "deadline": "3s", "api_key_env": KEY_ENV, "api_key_roles": ROLES, "api_key_digests_env": DIGESTS_ENV},
        # the processors deploy starts reserve no CPU, so the replicas (2 x 0.5) leave exactly one
        # of the session's two CPUs to the Ray Data tasks of the modules that run while the
        # application is up (a task needs a whole CPU: 0.9 free would hang them)
        "streams": {"processor_cpus": 0, "block": "100ms", "flush_interval": "200ms", "claim_idle": "2s"},
    })
    platform.features.apply(DEFINITIONS)
    version = register(platform, seed=1)
    platform.models.set_alias("underwriting", "production", version)
    started = time.monotonic()
    deployed = platform.serving.deploy("underwriting", policy=POLICY, num_replicas=2, replica_cpus=0.5)
    print(f"deployed in {time.monotonic() - started:.1f}s via {deployed.ingress}")
    return Served(platform, deployed, redis_proc, old_env)


def post(url: str, body, headers=HEADERS, session=None, **kw) -> requests.Response:
    return (session or requests).post(url, json=body, headers=headers, timeout=30, **kw)


def push_online(deployed, view: str, rows: list[dict]) -> requests.Response:
    df = {col: [row[col] for row in rows] for col in rows[0]}
    return post(f"{deployed.url}/push", {"push_source_name": view, "df": df, "to": "online"})


