"""The serving application end to end: a real Serve app (two replicas) over real HTTP, a real
redis-server as online and idempotency store, the decision log on local disk.

The application is the session's ``served`` (tests/integration/_serving_app.py); tests run in
file order and the last one stops Redis and shuts the application down, so it must stay last
and this module must run after every other module that uses ``served``.
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

from _serving_app import (
    CHECKOUT_KEY,
    DIGESTS_ENV,
    HEADERS,
    KEY,
    KEY_ENV,
    POLICY,
    RISKY,
    SAFE,
    UNKNOWN,
    application,
    feature_names,
    history,
    post,
    push_online,
    register,
)

from mlplatform import DataError, ServingError
from mlplatform.serving.decisions.records import DATASET, parse_lines, record_schema
from mlplatform.serving.decisions.spool import SEGMENT_NAME

# ------------------------------------------------------------------------- feature server
def test_push_and_get_online_features_speak_feast(served):
    platform, deployed, _ = served
    now = datetime.now(UTC) - timedelta(minutes=5)
    pushed = push_online(deployed, "applicant_history", [
        history(RISKY, now, missed_installments_90d=5.0, late_installments_30d=4.0, loans_30d=3.0),
        history(SAFE, now, loans_365d=2.0),
    ])
    assert pushed.status_code == 200, pushed.text
    assert pushed.json()["pushed"] == 2
    merchant = {"merchant_id": 7, "event_timestamp": now.isoformat(), "default_rate_90d": 0.02, "outcomes_90d": 40}
    assert push_online(deployed, "merchant_risk", [merchant]).status_code == 200
    activity = {"merchant_id": 7, "event_timestamp": now.isoformat(), "applications_90d": 300}
    assert push_online(deployed, "merchant_activity", [activity]).status_code == 200

    body = {
        "features": ["applicant_history:missed_installments_90d", "checkout_features:amount_to_avg_prior"],
        "entities": {"applicant_id": [RISKY, UNKNOWN], "amount": [100.0, 50.0], "term": [4, 4]},
    }
    response = post(f"{deployed.url}/get-online-features", body)
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

    by_service = post(f"{deployed.url}/get-online-features", {
        "feature_service": "underwriting_v1",
        "entities": {"applicant_id": [SAFE], "merchant_id": [7], "amount": [10.0], "term": [4]},
        "full_feature_names": True,
    }).json()
    names = by_service["metadata"]["feature_names"]
    assert names[:2] == ["applicant_id", "merchant_id"] and "merchant_risk__default_rate_90d" in names
    assert all(r["statuses"] == ["PRESENT"] for r in by_service["results"])

    unknown_view = post(f"{deployed.url}/get-online-features", {"features": ["nope:x"], "entities": {"applicant_id": [1]}})
    assert unknown_view.status_code == 422 and "nope" in unknown_view.json()["message"]
    health = requests.get(f"{deployed.url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == {"name": "underwriting", "version": 1}
    status = platform.serving.status()
    assert status["status"] == "RUNNING" and status["url"] == deployed.url
    assert status["deployments"]["mlplatform"]["replicas"].get("RUNNING") == 2


# ------------------------------------------------------------------------------ decisions
def test_decisions_come_with_reasons_and_are_logged(served):
    platform, deployed, _ = served
    declined = post(f"{deployed.url}/v1/decisions", application(RISKY)).json()
    assert declined["decision"] == "decline" and declined["fallback"] is False
    assert declined["probability_of_default"] >= POLICY["decline_at"]
    assert declined["model"] == {"name": "underwriting", "version": 1}
    texts = [r["text"] for r in declined["reasons"]]
    assert 1 <= len(texts) <= 4 and "Missed payments in the last 90 days" in texts
    assert len(set(texts)) == len(texts)

    approved = post(f"{deployed.url}/v1/decisions", application(SAFE)).json()
    assert approved["decision"] == "approve" and approved["reasons"] == []

    unknown = post(f"{deployed.url}/v1/decisions", application(UNKNOWN))
    assert unknown.status_code == 200 and unknown.json()["fallback"] is False  # decided on missing features

    over_limit = post(f"{deployed.url}/v1/decisions", application(SAFE, amount=2500.0)).json()
    assert over_limit["decision"] == "decline"
    assert [r["code"] for r in over_limit["reasons"]] == ["amount_above_limit"]

    record = platform.serving.decision(declined["decision_id"])
    assert record["probability_of_default"] == declined["probability_of_default"]
    features = json.loads(record["features"])
    assert json.loads(record["feature_names"]) == feature_names(platform)
    assert features["missed_installments_90d"] == 5.0 and features["order_amount"] == 120.0
    assert json.loads(record["feature_event_timestamps"])["order_amount"] is None
    missing = json.loads(platform.serving.decision(unknown.json()["decision_id"])["features"])
    assert missing["loans_30d"] is None  # unknown applicant: logged as missing, scored as NaN


def test_replay_reproduces_logged_scores_exactly(served):
    platform, deployed, _ = served
    ids = [post(f"{deployed.url}/v1/decisions", application(a)).json()["decision_id"] for a in (RISKY, SAFE, UNKNOWN)]
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
    response = post(f"{deployed.url}/v1/decisions", application(**change))
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]


def test_malformed_missing_and_huge_bodies_are_4xx(served):
    _, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    body = application()
    del body["merchant_id"]
    missing = post(url, body)
    assert missing.status_code == 422 and "merchant_id" in missing.json()["message"]
    not_json = requests.post(url, data=b"{not json", headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
    assert not_json.status_code == 422
    assert requests.post(url, data=b"[1, 2]", headers={**HEADERS, "Content-Type": "application/json"}, timeout=30).status_code == 422
    for number in ("NaN", "Infinity", "1e309"):
        text = json.dumps(application()).replace("120.0", number)
        bad = requests.post(url, data=text, headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
        assert bad.status_code == 422 and "amount" in bad.json()["message"], (number, bad.text)
    huge = application(application_id="a" * 64)
    huge_bytes = json.dumps({**huge, "padding": "x" * 100_000}).encode()
    assert requests.post(url, data=huge_bytes, headers={**HEADERS, "Content-Type": "application/json"}, timeout=30).status_code == 413
    chunked = requests.post(url, data=iter([huge_bytes[:50_000], huge_bytes[50_000:]]), headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
    assert chunked.status_code == 413
    push = post(f"{deployed.url}/push", {"push_source_name": "applicant_history", "df": {"applicant_id": [1]}})
    assert push.status_code == 422 and "event_timestamp" in push.json()["message"]
    both = post(f"{deployed.url}/get-online-features", {"features": ["a:b"], "feature_service": "s", "entities": {"x": [1]}})
    assert both.status_code == 422


def test_api_key_is_required(served):
    platform, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    assert post(url, application(), headers={}).status_code == 401
    assert post(url, application(), headers={"X-API-Key": KEY[:-1] + "y"}).status_code == 401
    assert post(f"{deployed.url}/get-online-features", {"feature_service": "underwriting_v1", "entities": {"applicant_id": [1]}}, headers={}).status_code == 401
    assert requests.get(f"{deployed.url}/health", timeout=30).status_code == 200  # load balancers probe without a key

    saved = {name: os.environ.pop(name) for name in (KEY_ENV, DIGESTS_ENV)}
    try:
        with pytest.raises(ServingError, match=KEY_ENV):
            platform.serving.deploy("underwriting")
    finally:
        os.environ.update(saved)


def test_an_empty_spool_dir_is_refused_before_anything_changes(served):
    platform, deployed, _ = served
    with pytest.raises(ServingError, match="spool_dir is empty"):
        platform.serving.deploy("underwriting", spool_dir="")
    assert platform.serving.spool_dir() == deployed.spool_dir
    assert post(f"{deployed.url}/v1/decisions", application()).status_code == 200


def test_a_retry_gets_the_same_decision(served):
    _, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    body = application(RISKY)
    first = post(url, body).json()
    for _ in range(3):
        again = post(url, body)
        assert again.status_code == 200 and again.json() == first
    # copies racing on both replicas all get one decision
    body = application(SAFE)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(url, body).json()["decision_id"], range(16)))
    assert len(set(answers)) == 1
    changed = post(url, {**body, "amount": 999.0})
    assert changed.status_code == 409 and changed.json()["decision_id"] == answers[0]


# ------------------------------------------------------------------------------- hardening
def _raw(url: str, text: str, headers=HEADERS) -> requests.Response:
    return requests.post(url, data=text.encode(), headers={**headers, "Content-Type": "application/json"}, timeout=30)


def logged_records(platform, deployed, application_id: str) -> list[dict]:
    """Every decision-log record of ``application_id``: in the spool (open and closed segments,
    claims) and in the compacted dataset."""
    found = []
    for folder, _, names in os.walk(deployed.spool_dir):
        for name in names:
            if SEGMENT_NAME.match(name):
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue
                found += [r for r in parse_lines(data)[0] if r["application_id"] == application_id]
    if platform.datasets.exists(DATASET):
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        paths = platform.datasets.file_paths(platform.datasets.get(DATASET))
        table = pads.dataset(paths, schema=record_schema(), format="parquet", filesystem=platform.storage.arrow_fs)
        found += table.to_table(filter=pc.field("application_id") == application_id).to_pylist()
    return found


def test_keys_carry_roles_and_a_checkout_key_can_only_decide(served):
    platform, deployed, _ = served
    checkout = {"X-API-Key": CHECKOUT_KEY}
    decided = post(f"{deployed.url}/v1/decisions", application(SAFE), headers=checkout)
    assert decided.status_code == 200 and decided.json()["decision"] == "approve"
    clean = [history(RISKY, datetime.now(UTC) - timedelta(seconds=30))]
    pushed = post(f"{deployed.url}/push", {"push_source_name": "applicant_history", "df": {c: [r[c] for r in clean] for c in clean[0]}}, headers=checkout)
    assert pushed.status_code == 403 and "write_features" in pushed.json()["message"]
    lookup = {"features": ["applicant_history:missed_installments_90d"], "entities": {"applicant_id": [RISKY]}}
    read = post(f"{deployed.url}/get-online-features", lookup, headers=checkout)
    assert read.status_code == 403 and "read_features" in read.json()["message"]
    internal = requests.get(f"{deployed.url}/v1/internal/replica", headers=checkout, timeout=30)
    assert internal.status_code == 403 and "operate" in internal.json()["message"] and "pid" not in internal.text
    # the refused push changed nothing: RISKY still reads its missed installments
    assert post(f"{deployed.url}/get-online-features", lookup).json()["results"][1]["values"] == [5.0]
    assert post(f"{deployed.url}/v1/decisions", application(RISKY), headers=checkout).json()["decision"] == "decline"

    document = requests.get(f"{deployed.url}/openapi.json", headers=checkout, timeout=30)
    assert document.status_code == 200
    paths = document.json()["paths"]
    for route in ("/v1/decisions", "/get-online-features", "/push"):
        post_op = paths[route]["post"]
        assert "requestBody" in post_op and {"200", "422"} <= set(post_op["responses"]), route
    assert {"/health", "/v1/internal/replica"} <= set(paths)
    assert requests.get(f"{deployed.url}/openapi.json", timeout=30).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('"timestamp": "0001-01-01T00:00:00+01:00"', "timestamp"),
        ('"timestamp": "9999-12-31T23:59:59-01:00"', "timestamp"),
        ('"amount": 1' + "0" * 400, "amount"),
        ('"applicant_id": 9223372036854775808', "applicant_id"),
    ],
)
def test_extreme_decision_values_are_422(served, body, field):
    _, deployed, _ = served
    good = application()
    key = body.split(":")[0].strip('"')
    del good[key]
    text = json.dumps(good)[:-1] + ", " + body + "}"
    answer = _raw(f"{deployed.url}/v1/decisions", text)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["message"]


def test_a_decision_timestamp_far_from_the_clock_is_refused_unless_it_is_a_retry(served):
    _, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    for when in (datetime.now(UTC) - timedelta(days=1), datetime(2025, 1, 2, tzinfo=UTC), datetime.now(UTC) + timedelta(hours=1)):
        answer = post(url, application(SAFE, timestamp=when.isoformat()))
        assert answer.status_code == 422, answer.text
        assert "timestamp" in answer.json()["message"] and "server clock" in answer.json()["message"]


def test_bad_on_demand_and_push_values_are_422_naming_the_field(served):
    platform, deployed, _ = served
    url = f"{deployed.url}/get-online-features"
    for amount, field in (('["abc"]', "amount"), ('[1' + "0" * 400 + "]", "amount"), ("[1e308]", None)):
        text = '{"features": ["checkout_features:amount_to_avg_prior"], "entities": {"applicant_id": [%d], "amount": %s, "term": [4]}}' % (SAFE, amount)
        answer = _raw(url, text)
        if field is None:  # a huge but finite amount is a valid number: answered
            assert answer.status_code == 200, answer.text
            continue
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["message"] and "checkout_features" in answer.json()["message"]
    term = post(url, {"features": ["checkout_features:amount_to_avg_prior"], "entities": {"applicant_id": [SAFE], "amount": [10.0], "term": ["x"]}})
    assert term.status_code == 422 and "term" in term.json()["message"]
    key = post(url, {"features": ["applicant_history:loans_30d"], "entities": {"applicant_id": ["abc"]}})
    assert key.status_code == 422 and "applicant_id" in key.json()["message"]

    row = history(900_200, datetime.now(UTC) - timedelta(minutes=1))
    push_url = f"{deployed.url}/push"
    for column, literal in (("applicant_id", "9223372036854775808"), ("applicant_id", "1e308"), ("loans_30d", "1" + "0" * 400)):
        df = {c: [v] for c, v in row.items()}
        text = json.dumps({"push_source_name": "applicant_history", "to": "online", "df": df})
        text = text.replace(json.dumps({column: [row[column]]})[1:-1], f'"{column}": [{literal}]')
        answer = _raw(push_url, text)
        assert answer.status_code == 422, (column, literal, answer.text)
        assert column in answer.json()["message"]
    lookup = post(url, {"features": ["applicant_history:loans_30d"], "entities": {"applicant_id": [900_200]}}).json()
    assert lookup["results"][1]["statuses"] == ["NOT_FOUND"]  # nothing of a refused push was written


def test_a_far_future_push_is_refused_and_cannot_lock_a_key(served):
    platform, deployed, _ = served
    applicant = 900_300
    now = datetime.now(UTC) - timedelta(minutes=1)
    assert push_online(deployed, "applicant_history", [history(applicant, now, loans_30d=1.0)]).status_code == 200
    for when, word in ((datetime(2262, 1, 1, tzinfo=UTC), "future"), (datetime.now(UTC) + timedelta(hours=1), "future"), (datetime(1990, 1, 1, tzinfo=UTC), "min_event_time")):
        answer = push_online(deployed, "applicant_history", [history(applicant, when, loans_30d=9.0)])
        assert answer.status_code == 422 and "event_timestamp" in answer.json()["message"] and word in answer.json()["message"], answer.text
    with pytest.raises(DataError, match="future"):
        platform.features.push("applicant_history", [history(applicant, datetime(2262, 1, 1, tzinfo=UTC))], to="online")
    later = push_online(deployed, "applicant_history", [history(applicant, now + timedelta(seconds=30), loans_30d=2.0)])
    assert later.status_code == 200
    read = post(f"{deployed.url}/get-online-features", {"features": ["applicant_history:loans_30d"], "entities": {"applicant_id": [applicant]}}).json()
    assert read["results"][1]["values"] == [2.0] and read["results"][1]["statuses"] == ["PRESENT"]


def test_concurrent_copies_are_decided_once_and_logged_once(served):
    platform, deployed, _ = served
    url = f"{deployed.url}/v1/decisions"
    body = application(RISKY)
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: post(url, body), range(50)))
    assert [a.status_code for a in answers] == [200] * 50, [a.text for a in answers if a.status_code != 200][:3]
    assert len({a.json()["decision_id"] for a in answers}) == 1
    assert len({a.text for a in answers}) == 1
    records = logged_records(platform, deployed, body["application_id"])
    assert len(records) == 1, records
    assert records[0]["returned"] is True and records[0]["confirmed"] is True
    assert records[0]["decision_id"] == answers[0].json()["decision_id"]


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
                response = post(self.url, application(RISKY if np.random.random() < 0.5 else SAFE), session=session)
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
    v2 = register(platform, seed=2)
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


def test_with_redis_hung_decisions_fall_back_in_time_and_retries_keep_them(served):
    """Redis paused (SIGSTOP): the idempotency read, the feature read and the answer's write
    share one deadline, so every decision answers with the fallback; after Redis resumes, a
    retry of each (on either replica) gets the decision it was given, never a new one."""
    platform, deployed, redis_proc = served
    url = f"{deployed.url}/v1/decisions"
    deadline = platform.config.serving.deadline.total_seconds()
    bodies = [application(SAFE, amount=60.0 + i) for i in range(24)]

    def timed(body):
        started = time.monotonic()
        answer = post(url, body)
        return answer, time.monotonic() - started

    os.kill(redis_proc.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(24) as pool:
            first = list(pool.map(timed, bodies))
        # a request this node has no answer for, 30 s old: maybe a retry of a decision only the
        # store knows, so it is refused explicitly rather than decided anew
        stale = post(url, application(SAFE, amount=58.0, timestamp=(datetime.now(UTC) - timedelta(seconds=30)).isoformat()))
    finally:
        os.kill(redis_proc.pid, signal.SIGCONT)
    assert stale.status_code == 503 and stale.json()["error"] == "decision_unconfirmed", stale.text
    refused = [(i, a.status_code, f"{took:.2f}s", a.text[:300]) for i, (a, took) in enumerate(first) if a.status_code != 200]
    assert not refused, refused
    assert all(a.json()["fallback"] is True for a, _ in first)
    print(f"hung Redis: slowest decision {max(t for _, t in first):.2f} s against a {deadline:.1f} s deadline")
    retries = [post(url, body) for body in bodies for _ in range(2)]
    assert [r.status_code for r in retries] == [200] * len(retries)
    assert [r.json() for r in retries] == [a.json() for a, _ in first for _ in range(2)]
    for body, (answer, _) in zip(bodies[:4], first):
        records = logged_records(platform, deployed, body["application_id"])
        assert [r["decision_id"] for r in records] == [answer.json()["decision_id"]]
        assert records[0]["confirmed"] is False and records[0]["returned"] is True


def test_fallback_decisions_when_redis_stops(served):
    """Stops Redis for good: keep this test last in the module."""
    platform, deployed, redis_proc = served
    url = f"{deployed.url}/v1/decisions"
    assert post(url, application(SAFE)).json()["fallback"] is False
    redis_proc.terminate()
    redis_proc.wait(timeout=10)
    answers = [post(url, application(SAFE, amount=50.0 + i)) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    bodies = [a.json() for a in answers]
    assert all(b["fallback"] is True for b in bodies)
    assert {b["fallback_reason"] for b in bodies} <= {"feature_store_unavailable", "deadline_exceeded"}
    assert all(b["decision"] == "review" and b["probability_of_default"] is None for b in bodies)  # the configured fallback
    knocked = post(url, application(SAFE, currency="EUR")).json()
    assert knocked["fallback"] is True and knocked["decision"] == "decline"  # policy still applies
    record = platform.serving.decision(bodies[0]["decision_id"])
    assert record["fallback"] is True and record["fallback_reason"] == bodies[0]["fallback_reason"]
    served.close()  # the last user of the session's application: free its CPUs for what follows
