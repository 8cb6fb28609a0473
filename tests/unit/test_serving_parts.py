"""The serving parts that need no Ray: policy rules, request validation, the idempotency store
(SQLite; Redis runs in the integration tests) and the ingress choice."""

from __future__ import annotations

import json
import threading

import pytest
from pydantic import ValidationError

from mlplatform import ConfigError, load_config
from mlplatform.serving.engine import answer_for
from mlplatform.serving.idempotency import SqliteIdempotencyStore
from mlplatform.serving.ingress import plan_ingress
from mlplatform.decision_policy import DecisionPolicy
from mlplatform.serving.schemas import DecisionRequest, FeatureRequest, PushRequest

APPLICATION = {
    "application_id": "app-1", "applicant_id": 1, "merchant_id": 2, "amount": 100.0,
    "currency": "USD", "term": 4, "timestamp": "2026-01-31T09:00:00",
}


def test_policy_thresholds_knockouts_and_fallback():
    policy = DecisionPolicy(approve_below=0.1, decline_at=0.3, max_amount=1000, fallback_approve_up_to=50)
    assert [policy.by_score(p) for p in (0.0, 0.0999, 0.1, 0.2999, 0.3, 1.0)] == [
        "approve", "approve", "review", "review", "decline", "decline"]
    codes = [r.code for r in policy.knockouts(amount=5000, currency="EUR", term=5)]
    assert codes == ["amount_above_limit", "currency_not_offered", "term_not_offered"]
    assert policy.fallback(amount=50, currency="USD", term=4) == ("approve", [])
    assert policy.fallback(amount=51, currency="USD", term=4) == ("review", [])
    decision, reasons = policy.fallback(amount=10, currency="EUR", term=4)
    assert decision == "decline" and reasons[0].code == "currency_not_offered"


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ({"approve_below": 0.5, "decline_at": 0.2}, "approve_below"),
        ({"currencies": ["usd"]}, "usd"),
        ({"terms": [0]}, "terms"),
        ({"shadow_alias": "Candidate!"}, "shadow_alias"),
        ({"threshold": 0.2}, "threshold"),
    ],
)
def test_bad_policy_config_names_the_field(policy, words):
    with pytest.raises(ConfigError, match=words):
        load_config({"serving": {"policy": policy}})


def test_decision_request_validation():
    parsed = DecisionRequest.model_validate({**APPLICATION, "application_id": 42})
    assert parsed.application_id == "42" and parsed.timestamp.utcoffset().total_seconds() == 0  # naive = UTC
    for bad in ({"amount": -1}, {"amount": float("nan")}, {"applicant_id": "1"}, {"applicant_id": True},
                {"term": 4.0}, {"currency": "usd"}, {"extra": 1}, {"application_id": "a b"}):
        with pytest.raises(ValidationError) as info:
            DecisionRequest.model_validate({**APPLICATION, **bad})
        assert next(iter(bad)) in str(info.value)


def test_feature_and_push_requests_need_exactly_one_target():
    with pytest.raises(ValidationError, match="exactly one"):
        FeatureRequest.model_validate({"entities": {"applicant_id": [1]}})
    with pytest.raises(ValidationError, match="exactly one"):
        FeatureRequest.model_validate({"features": ["a:b"], "feature_service": "s", "entities": {"applicant_id": [1]}})
    assert FeatureRequest.model_validate({"feature_service": "s", "entities": {"x": [1]}}).target() == "s"
    assert PushRequest.model_validate({"feature_view": "v", "df": {"x": [1]}}).view() == "v"
    assert PushRequest.model_validate({"push_source_name": "v", "df": {"x": [1]}}).to == "online"  # Feast's default


def test_sqlite_idempotency_first_writer_wins_across_threads(tmp_path):
    store = SqliteIdempotencyStore(tmp_path / "d.db")
    assert store.get_many(["a", "b"]) == [None, None]
    results: list = []

    def put(value: str) -> None:
        results.append((value, store.put_if_absent_many([("a", value)])[0]))

    threads = [threading.Thread(target=put, args=(f"answer-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [value for value, existing in results if existing is None]
    assert len(winners) == 1
    assert {existing for _, existing in results if existing is not None} == set(winners)
    assert store.get_many(["a", "b"]) == [winners[0], None]


def test_stored_answer_is_replayed_or_conflicts():
    response = {"decision_id": "d1", "decision": "approve"}
    stored = json.dumps({"fingerprint": "f1", "response": response})
    assert answer_for(stored, "f1") == (200, json.dumps(response, separators=(",", ":")).encode())
    status, body = answer_for(stored, "f2")
    assert status == 409 and json.loads(body)["decision_id"] == "d1"


def test_ingress_plan(monkeypatch):
    assert not plan_ingress("off").fast
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/haproxy")
    assert not plan_ingress("auto").fast  # no binary: the default proxy, with a warning
    forced = plan_ingress("on")
    assert forced.fast and forced.controller_options() == {"runtime_env": {"env_vars": {
        "RAY_SERVE_HAPROXY_BINARY_PATH": "/nonexistent/haproxy",  # the operator's RAY_SERVE_* settings travel too
        "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/sh")  # any executable stands in
    assert plan_ingress("auto").fast
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert not plan_ingress("auto").fast  # an explicit opt-out wins over auto
