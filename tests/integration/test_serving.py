"""The serving application end to end: a real Serve app (two replicas) over real HTTP, a real
redis-server as online and idempotency store, the decision log on local disk.

One application is deployed for the module; tests run in file order and the last one stops
Redis, so it must stay last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import requests

from mlplatform import Platform, ServingError
from mlplatform.serving.decision_records import DATASET
from workloads.underwriting.features import DEFINITIONS

KEY = "test-key-" + "x" * 24
KEY_ENV = "MLP_TEST_SERVING_KEY"
HEADERS = {"X-API-Key": KEY}
RISKY, SAFE, UNKNOWN = 900_001, 900_002, 123_456_789
POLICY = {"approve_below": 0.1, "decline_at": 0.3, "max_amount": 2000, "shadow_alias": "candidate"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(directory) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    port = _free_port()
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


def _feature_names(platform: Platform) -> list[str]:
    return [ref.split(":")[1] for ref in platform.features.resolve_features("underwriting_v1")]


def _train(platform: Platform, seed: int) -> lgb.Booster:
    """A small model on random data whose risk rises with missed and late payments."""
    names = _feature_names(platform)
    rng = np.random.default_rng(seed)
    x = pd.DataFrame(rng.poisson(1.0, (3000, len(names))).astype(float), columns=names)
    logit = -4.0 + 1.5 * x["missed_installments_90d"] + 0.8 * x["late_installments_30d"]
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": seed, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=30)


def _register(platform: Platform, seed: int) -> int:
    mv = platform.models.register(
        "underwriting", flavor="lightgbm", model=_train(platform, seed),
        lineage={"feature_service": "underwriting_v1"}, metrics={}, params={"seed": seed},
    )
    return mv.version


def _history(applicant_id: int, when: datetime, **values: float) -> dict:
    row = {"applicant_id": applicant_id, "event_timestamp": when.isoformat()}
    for window in ("30d", "90d", "365d"):
        for kind in ("loans", "late_installments", "missed_installments", "max_days_past_due"):
            row[f"{kind}_{window}"] = 0.0
    row.update(outstanding_balance=0.0, avg_loan_amount_365d=200.0)
    row.update(values)
    return row


def _application(applicant_id: int = SAFE, **overrides) -> dict:
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


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session):
    """A platform on tmp disk + Redis, underwriting definitions, a few online rows, model v1 in
    production, and the serving app deployed with two replicas."""
    root = tmp_path_factory.mktemp("serving")
    redis_proc, redis_url = _start_redis(root)
    # HAProxy's stats and metrics ports are fixed host ports: free ones let this run beside
    # another Serve with HAProxy on the machine (deploy passes RAY_SERVE_* on to Serve).
    env = {KEY_ENV: KEY, "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port())}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    platform = Platform.from_config({
        "project": "servingtest",
        "storage": {"root": str(root / "store")},
        "online_store": {"type": "redis", "url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:6]}", "timeout": "2s"},
        # A loaded CI machine can take far longer than production's 50 ms; the fallback test
        # stops Redis instead, which fails fast.
        "serving": {"port": _free_port(), "deadline": "3s", "api_key_env": KEY_ENV},
    })
    platform.features.apply(DEFINITIONS)
    version = _register(platform, seed=1)
    platform.models.set_alias("underwriting", "production", version)
    started = time.monotonic()
    deployed = platform.serving.deploy("underwriting", policy=POLICY, num_replicas=2, replica_cpus=0.5)
    print(f"deployed in {time.monotonic() - started:.1f}s via {deployed.ingress}")
    try:
        yield platform, deployed, redis_proc
    finally:
        platform.serving.shutdown()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _post(url: str, body, headers=HEADERS, session=None, **kw) -> requests.Response:
    return (session or requests).post(url, json=body, headers=headers, timeout=30, **kw)


def _push_online(deployed, view: str, rows: list[dict]) -> requests.Response:
    df = {col: [row[col] for row in rows] for col in rows[0]}
    return _post(f"{deployed.url}/push", {"push_source_name": view, "df": df, "to": "online"})


# ------------------------------------------------------------------------- feature server
def test_push_and_get_online_features_speak_feast(served):
    platform, deployed, _ = served
    now = datetime.now(UTC) - timedelta(minutes=5)
    pushed = _push_online(deployed, "applicant_history", [
        _history(RISKY, now, missed_installments_90d=5.0, late_installments_30d=4.0, loans_30d=3.0),
        _history(SAFE, now, loans_365d=2.0),
    ])
    assert pushed.status_code == 200, pushed.text
    assert pushed.json()["pushed"] == 2
    merchant = {"merchant_id": 7, "event_timestamp": now.isoformat(), "default_rate_90d": 0.02, "outcomes_90d": 40}
    assert _push_online(deployed, "merchant_risk", [merchant]).status_code == 200
    activity = {"merchant_id": 7, "event_timestamp": now.isoformat(), "applications_90d": 300}
    assert _push_online(deployed, "merchant_activity", [activity]).status_code == 200

    body = {
        "features": ["applicant_history:missed_installments_90d", "checkout_features:amount_to_avg_prior"],
        "entities": {"applicant_id": [RISKY, UNKNOWN], "amount": [100.0, 50.0], "term": [4, 4]},
    }
    response = _post(f"{deployed.url}/get-online-features", body)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["metadata"]["feature_names"] == ["applicant_id", "missed_installments_90d", "amount_to_avg_prior"]
    keys, missed, ratio = doc["results"]
    assert keys["values"] == [RISKY, UNKNOWN]
    assert missed["values"] == [5.0, None]
    assert missed["statuses"] == ["PRESENT", "NOT_FOUND"]
    assert missed["event_timestamps"][0].startswith(now.strftime("%Y-%m-%dT%H:%M"))
    assert missed["event_timestamps"][1] == "1970-01-01T00:00:00Z"
    assert ratio["values"] == [0.5, None]  # the on-demand view: 100 / avg_loan_amount_365d of 200

    by_service = _post(f"{deployed.url}/get-online-features", {
        "feature_service": "underwriting_v1",
        "entities": {"applicant_id": [SAFE], "merchant_id": [7], "amount": [10.0], "term": [4]},
        "full_feature_names": True,
    }).json()
    names = by_service["metadata"]["feature_names"]
    assert names[:2] == ["applicant_id", "merchant_id"] and "merchant_risk__default_rate_90d" in names
    assert all(r["statuses"] == ["PRESENT"] for r in by_service["results"])

    unknown_view = _post(f"{deployed.url}/get-online-features", {"features": ["nope:x"], "entities": {"applicant_id": [1]}})
    assert unknown_view.status_code == 422 and "nope" in unknown_view.json()["message"]
    health = requests.get(f"{deployed.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == {"name": "underwriting", "version": 1}
    status = platform.serving.status()
    assert status["status"] == "RUNNING" and status["url"] == deployed.url
    assert status["deployments"]["mlplatform"]["replicas"].get("RUNNING") == 2


# ------------------------------------------------------------------------------ decisions
def test_decisions_come_with_reasons_and_are_logged(served):
    platform, deployed, _ = served
    declined = _post(f"{deployed.url}/v1/decisions", _application(RISKY)).json()
    assert declined["decision"] == "decline" and declined["fallback"] is False
    assert declined["probability_of_default"] >= POLICY["decline_at"]
    assert declined["model"] == {"name": "underwriting", "version": 1}
    texts = [r["text"] for r in declined["reasons"]]
    assert 1 <= len(texts) <= 4 and "Missed payments in the last 90 days" in texts
    assert len(set(texts)) == len(texts)

    approved = _post(f"{deployed.url}/v1/decisions", _application(SAFE)).json()
    assert approved["decision"] == "approve" and approved["reasons"] == []

    unknown = _post(f"{deployed.url}/v1/decisions", _application(UNKNOWN))
    assert unknown.status_code == 200 and unknown.json()["fallback"] is False  # decided on missing features

    over_limit = _post(f"{deployed.url}/v1/decisions", _application(SAFE, amount=2500.0)).json()
    assert over_limit["decision"] == "decline"
    assert [r["code"] for r in over_limit["reasons"]] == ["amount_above_limit"]

    record = platform.serving.decision(declined["decision_id"])
    assert record["probability_of_default"] == declined["probability_of_default"]
    features = json.loads(record["features"])
    assert json.loads(record["feature_names"]) == _feature_names(platform)
    assert features["missed_installments_90d"] == 5.0 and features["order_amount"] == 120.0
    assert json.loads(record["feature_event_timestamps"])["order_amount"] is None
    missing = json.loads(platform.serving.decision(unknown.json()["decision_id"])["features"])
    assert missing["loans_30d"] is None  # unknown applicant: logged as missing, scored as NaN


def test_replay_reproduces_logged_scores_exactly(served):
    platform, deployed, _ = served
    ids = [_post(f"{deployed.url}/v1/decisions", _application(a)).json()["decision_id"] for a in (RISKY, SAFE, UNKNOWN)]
    for decision_id in ids:
        result = platform.serving.replay(decision_id)
        assert result.identical, result


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": -5}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": "lots"}, "amount"),
        ({"applicant_id": "42"}, "applicant_id"),
        ({"applicant_id": True}, "applicant_id"),
        ({"term": 4.5}, "term"),
        ({"currency": "dollars"}, "currency"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"application_id": ""}, "application_id"),
        ({"application_id": "x" * 500}, "application_id"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(served, change, field):
    _, deployed, _ = served
    response = _post(f"{deployed.url}/v1/decisions", _application(**change))
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]


def test_malformed_missing_and_huge_bodies_are_4xx(served):
    _, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    body = _application()
    del body["merchant_id"]
    missing = _post(url, body)
    assert missing.status_code == 422 and "merchant_id" in missing.json()["message"]
    not_json = requests.post(url, data=b"{not json", headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
    assert not_json.status_code == 422
    assert requests.post(url, data=b"[1, 2]", headers={**HEADERS, "Content-Type": "application/json"}, timeout=30).status_code == 422
    for number in ("NaN", "Infinity", "1e309"):
        text = json.dumps(_application()).replace("120.0", number)
        bad = requests.post(url, data=text, headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
        assert bad.status_code == 422 and "amount" in bad.json()["message"], (number, bad.text)
    huge = _application(application_id="a" * 64)
    huge_bytes = json.dumps({**huge, "padding": "x" * 100_000}).encode()
    assert requests.post(url, data=huge_bytes, headers={**HEADERS, "Content-Type": "application/json"}, timeout=30).status_code == 413
    chunked = requests.post(url, data=iter([huge_bytes[:50_000], huge_bytes[50_000:]]), headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 413
    push = _post(f"{deployed.url}/push", {"push_source_name": "applicant_history", "df": {"applicant_id": [1]}})
    assert push.status_code == 422 and "event_timestamp" in push.json()["message"]
    both = _post(f"{deployed.url}/get-online-features", {"features": ["a:b"], "feature_service": "s", "entities": {"x": [1]}})
    assert both.status_code == 422


def test_api_key_is_required(served):
    platform, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    assert _post(url, _application(), headers={}).status_code == 401
    assert _post(url, _application(), headers={"X-API-Key": KEY[:-1] + "y"}).status_code == 401
    assert _post(f"{deployed.url}/get-online-features", {"feature_service": "underwriting_v1", "entities": {"applicant_id": [1]}}, headers={}).status_code == 401
    assert requests.get(f"{deployed.url}/health", timeout=30).status_code == 200  # load balancers probe without a key

    os.environ.pop(KEY_ENV)
    try:
        with pytest.raises(ServingError, match=KEY_ENV):
            platform.serving.deploy("underwriting")
    finally:
        os.environ[KEY_ENV] = KEY


def test_an_empty_spool_dir_is_refused_before_anything_changes(served):
    platform, deployed, _ = served
    with pytest.raises(ServingError, match="spool_dir is empty"):
        platform.serving.deploy("underwriting", spool_dir="")
    assert platform.serving.spool_dir() == deployed.spool_dir
    assert _post(f"{deployed.url}/v1/decisions", _application()).status_code == 200


def test_a_retry_gets_the_same_decision(served):
    _, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    body = _application(RISKY)
    first = _post(url, body).json()
    for _ in range(3):
        again = _post(url, body)
        assert again.status_code == 200 and again.json() == first
    # copies racing on both replicas all get one decision
    body = _application(SAFE)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _post(url, body).json()["decision_id"], range(16)))
    assert len(set(answers)) == 1
    changed = _post(url, {**body, "amount": 999.0})
    assert changed.status_code == 409 and changed.json()["decision_id"] == answers[0]


# ------------------------------------------------------------------------------- load helpers
class _Load:
    """Threads posting fresh applications until stopped; keeps every response."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.results, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = _post(self.url, _application(RISKY if np.random.random() < 0.5 else SAFE), session=session)
                self.results.append((response.status_code, response.json() if response.status_code == 200 else response.text))
            except requests.RequestException as exc:
                self.results.append((None, repr(exc)))

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(body) for status, body in list(self.results) if status == 200):
                return True
            time.sleep(0.1)
        return False


def _replicas(deployed, tries: int = 40) -> dict[int, dict]:
    """What each replica reports (the ingress spreads these requests over the replicas)."""
    found = {}
    for _ in range(tries):
        info = requests.get(f"{deployed.url}/v1/internal/replica", headers=HEADERS, timeout=30).json()
        found[info["pid"]] = info
        if len(found) == 2:
            break
    return found


def _wait_until_replicas_serve(deployed, version: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _replicas(deployed)
        if len(found) == 2 and all(info["model"]["version"] == version for info in found.values()):
            return True
        time.sleep(0.2)
    return False


def test_moving_the_production_alias_under_load_drops_nothing(served):
    platform, deployed, _ = served
    v2 = _register(platform, seed=2)
    with _Load(f"{deployed.url}/v1/decisions") as load:
        assert load.wait_for(lambda b: True, 30)
        platform.models.set_alias("underwriting", "production", v2)
        platform.models.set_alias("underwriting", "candidate", 1)
        switched = load.wait_for(lambda b: b["model"]["version"] == v2, 60)
        moved = _wait_until_replicas_serve(deployed, v2, timeout=60)
        settled = len(load.results)
        time.sleep(2)
    assert switched and moved
    failed = [r for r in load.results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [body["model"]["version"] for _, body in load.results]
    assert set(versions) == {1, v2}
    assert all(v == v2 for v in versions[settled + 8:])  # once both replicas moved (+ in-flight requests)
    last = load.results[-1][1]
    shadow = json.loads(platform.serving.decision(last["decision_id"])["shadow"])
    assert shadow["model_version"] == 1 and 0.0 <= shadow["probability_of_default"] <= 1.0


def test_a_replica_killed_under_load_loses_no_returned_decision(served):
    platform, deployed, _ = served
    replicas = {pid: info["replica_id"] for pid, info in _replicas(deployed).items()}
    victim_pid, victim = next(iter(replicas.items()))
    with _Load(f"{deployed.url}/v1/decisions", threads=6) as load:
        assert load.wait_for(lambda b: True, 30)
        time.sleep(1.0)
        os.kill(victim_pid, signal.SIGKILL)
        time.sleep(3.0)
    returned = [body["decision_id"] for status, body in load.results if status == 200]
    assert len(returned) > 20
    platform.serving.compact_log()  # takes the dead replica's open segment too
    assert platform.datasets.exists(DATASET)
    spool = os.listdir(deployed.spool_dir)
    assert not [name for name in spool if name.startswith(victim + "@")], spool
    lost = []
    for decision_id in returned:
        try:
            platform.serving.decision(decision_id)
        except Exception:
            lost.append(decision_id)
    assert not lost, f"{len(lost)} of {len(returned)} returned decisions are not in the log"


def test_fallback_decisions_when_redis_stops(served):
    """Stops Redis for good: keep this test last in the module."""
    platform, deployed, redis_proc = served
    url = f"{deployed.url}/v1/decisions"
    assert _post(url, _application(SAFE)).json()["fallback"] is False
    redis_proc.terminate()
    redis_proc.wait(timeout=10)
    answers = [_post(url, _application(SAFE, amount=50.0 + i)) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    bodies = [a.json() for a in answers]
    assert all(b["fallback"] is True for b in bodies)
    assert {b["fallback_reason"] for b in bodies} <= {"feature_store_unavailable", "deadline_exceeded"}
    assert all(b["decision"] == "review" and b["probability_of_default"] is None for b in bodies)  # the configured fallback
    knocked = _post(url, _application(SAFE, currency="EUR")).json()
    assert knocked["fallback"] is True and knocked["decision"] == "decline"  # policy still applies
    record = platform.serving.decision(bodies[0]["decision_id"])
    assert record["fallback"] is True and record["fallback_reason"] == bodies[0]["fallback_reason"]
