"""Generated bad requests against the deployed serving application: none may get a 5xx, and
the service must answer correctly afterwards.

Two generators, both bounded and derandomized (the same requests every run):

- schemathesis over the OpenAPI document the service publishes (``GET /openapi.json``, with
  the key): valid and invalid bodies for every operation it describes, checked with
  ``not_a_server_error`` and the response-schema conformance check;
- hypothesis strategies of our own (``_fuzz_strategies``, shared with
  benchmarks/fuzz_serving.py, which sends ten thousand a route) sent as raw JSON bytes with
  ``requests``, for what schemathesis does not write: numbers past float64 and int64 (``1e400``,
  400-digit integers), timestamps at the years 1 and 9999 with offsets, escaped lone surrogates,
  NUL and right-to-left text, 100,000-deep nestings, oversized strings and lists, wrong types,
  unknown keys, odd content types and paths; plus the hand-written requests of the bug classes
  found before (``KNOWN``).

Every answer must be below 500; a request certainly invalid (unknown or missing top-level
key, a body that is not an object, the known bug classes) must get a 4xx, and a 422 must carry
JSON ``{"error", "message"}``. Afterwards: the same replicas (none crashed and restarted),
``/health`` ok, and a known decision and feature lookup answer exactly as before the fuzzing.

Requests sent (printed per route with ``-s``): 80 per POST operation and one per GET operation
from schemathesis, 36 known ones, 250 per POST route and 40 per GET route from our strategies:
about 1,150, which take ~25 s on two cores after the application is deployed.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from _fuzz_runner import Fuzzer, record_finding, show_body
from _fuzz_strategies import CHECK_APPLICANT, CHECK_MERCHANT, GET_ROUTES, KNOWN, POST_ROUTES, REQUESTS
from _serving_app import HEADERS, KEY

pytestmark = pytest.mark.integration

SCHEMATHESIS_EXAMPLES = 80  # per operation, positive and negative together
POST_EXAMPLES = 250  # per POST route, from our strategies
GET_EXAMPLES = 40  # per GET route
CHECK_FEATURES = ["applicant_history:missed_installments_90d", "applicant_history:avg_loan_amount_365d",
                  "merchant_risk:default_rate_90d", "checkout_features:amount_to_avg_prior", "checkout_features:term_installments"]


def _report(tally, what: str) -> str:
    lines = [f"{what}: {len(tally.server_errors)} answers >= 500, {len(tally.broken)} broken contracts"]
    for f in (tally.server_errors + tally.broken)[:20]:
        lines.append(f"  {f['method']} {f['path'][:80]} -> {f['status']} ({f.get('why', 'server error')}) [{f['label'][:100]}]")
        lines.append(f"    body: {show_body(f['body'], 600)}")
        lines.append(f"    response: {f['response'][:400]}")
    return "\n".join(lines)


def _lookup(url: str) -> requests.Response:
    body = {"features": CHECK_FEATURES,
            "entities": {"applicant_id": [CHECK_APPLICANT], "merchant_id": [CHECK_MERCHANT], "amount": [300.0], "term": [6]}}
    return requests.post(f"{url}/get-online-features", json=body, headers=HEADERS, timeout=60)


def _decide(url: str) -> requests.Response:
    body = {"application_id": f"fuzz-check-{uuid.uuid4().hex[:16]}", "applicant_id": CHECK_APPLICANT, "merchant_id": CHECK_MERCHANT,
            "amount": 300.0, "currency": "USD", "term": 6, "timestamp": datetime.now(UTC).isoformat()}
    return requests.post(f"{url}/v1/decisions", json=body, headers=HEADERS, timeout=60)


def _replicas() -> set[str]:
    """The names of the live Serve replica actors: a replica that died and was replaced comes
    back under a new name."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"] and "mlplatform" in a["name"]}


@pytest.fixture(scope="module")
def before(served):
    """Rows for the fuzz test's own applicant and merchant (never pushed to by the fuzzing),
    and the service's answers about them before any bad request."""
    _, deployed, _ = served
    when = (datetime.now(UTC) - timedelta(minutes=30)).isoformat()
    history = {f"{k}_{w}": [1.0] for w in ("30d", "90d", "365d") for k in ("loans", "late_installments", "missed_installments", "max_days_past_due")}
    history.update(missed_installments_90d=[3.0], outstanding_balance=[50.0], avg_loan_amount_365d=[150.0])
    pushes = [
        ("applicant_history", {"applicant_id": [CHECK_APPLICANT], "event_timestamp": [when], **history}),
        ("merchant_risk", {"merchant_id": [CHECK_MERCHANT], "event_timestamp": [when], "default_rate_90d": [0.04], "outcomes_90d": [25]}),
        ("merchant_activity", {"merchant_id": [CHECK_MERCHANT], "event_timestamp": [when], "applications_90d": [90]}),
    ]
    for view, df in pushes:
        pushed = requests.post(f"{deployed.url}/push", json={"push_source_name": view, "df": df}, headers=HEADERS, timeout=60)
        assert pushed.status_code == 200, pushed.text
    lookup = _lookup(deployed.url)
    assert lookup.status_code == 200, lookup.text
    values = [r["values"][0] for r in lookup.json()["results"]]
    assert values == [CHECK_APPLICANT, CHECK_MERCHANT, 3.0, 150.0, 0.04, 2.0, 6]  # 300 / 150 for amount_to_avg_prior
    decision = _decide(deployed.url)
    assert decision.status_code == 200, decision.text
    assert decision.json()["fallback"] is False
    replicas = _replicas()
    assert len(replicas) == 3, replicas  # the two ingress replicas and the fraud_remote model's one
    return {"lookup": lookup.json(), "decision": decision.json(), "replicas": replicas}


def test_schemathesis_over_the_published_openapi_finds_no_server_error(served, before):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    _, deployed, _ = served
    assert requests.get(f"{deployed.url}/openapi.json", timeout=60).status_code == 401  # the document needs a key too
    schema = schemathesis.openapi.from_url(f"{deployed.url}/openapi.json", headers=HEADERS, timeout=60)
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    expected = {"POST /v1/decisions", "POST /get-online-features", "POST /push", "GET /health", "GET /v1/internal/replica",
                "POST /v2/models/{name}/infer", "POST /v2/models/{name}/versions/{version}/infer", "POST /v1/models/{name}/predict",
                "GET /v2/models/{name}", "GET /v2/models/{name}/ready", "GET /v2/health/ready"}
    assert expected <= labels, labels

    session = requests.Session()
    sent: dict[str, int] = {}
    failures: list[str] = []
    checks = [not_a_server_error, response_schema_conformance]

    def fuzz(op) -> None:
        label = f"{op.method.upper()} {op.path}"
        modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)

        @settings(max_examples=SCHEMATHESIS_EXAMPLES, database=None, deadline=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
        @given(case=st.one_of(*(op.as_strategy(generation_mode=m) for m in modes)))
        def run(case) -> None:
            response = case.call(base_url=deployed.url, session=session, headers=HEADERS, timeout=60)
            sent[label] = sent.get(label, 0) + 1
            try:
                case.validate_response(response, checks=checks, headers=HEADERS)
            except Exception as exc:  # collect them all rather than stop and shrink the first
                body = response.request.body
                body = body if isinstance(body, bytes) or body is None else body.encode()
                failures.append(f"{label} -> {response.status_code}: {str(exc)[:1500]}\n  body: {show_body(body, 600)}")
                if response.status_code >= 500:
                    record_finding({"source": "test_fuzz_serving schemathesis", "route": op.path, "label": label, "method": case.method,
                                    "path": response.request.path_url, "headers": {}, "status": response.status_code,
                                    "response": response.text, "body": body})

        run()

    started = time.monotonic()
    for op in operations:
        fuzz(op)
    print(f"\nschemathesis: {sum(sent.values())} requests in {time.monotonic() - started:.1f}s: {sent}")
    assert not failures, f"{len(failures)} failed checks:\n" + "\n".join(failures[:15])


def test_generated_bad_requests_never_get_a_server_error(served, before):
    _, deployed, _ = served
    fuzzer = Fuzzer(deployed.url, KEY, workers=4, source="test_fuzz_serving")
    started = time.monotonic()
    try:
        for request in KNOWN:
            fuzzer.submit(request)
        fuzzer.wait()
        for route in POST_ROUTES:
            fuzzer.drive(REQUESTS[route], examples=POST_EXAMPLES)
        for route in GET_ROUTES:
            fuzzer.drive(REQUESTS[route], examples=GET_EXAMPLES)
    finally:
        fuzzer.close()
    print(f"\nstrategies: {fuzzer.tally.total()} requests in {time.monotonic() - started:.1f}s\n{fuzzer.tally.table()}")
    tally = fuzzer.tally
    assert not tally.server_errors and not tally.broken, _report(tally, "generated requests")
    for route in POST_ROUTES:
        assert tally.counts[route].get("4xx", 0) > POST_EXAMPLES // 2, tally.counts[route]  # mostly refused, as they should be


def test_the_service_answers_correctly_after_the_fuzzing(served, before):
    _, deployed, _ = served
    assert _replicas() == before["replicas"]  # no replica died and was replaced
    health = requests.get(f"{deployed.url}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    lookup = _lookup(deployed.url)
    assert lookup.status_code == 200, lookup.text
    assert lookup.json()["results"] == before["lookup"]["results"]  # values, statuses and event times
    decision = _decide(deployed.url)
    assert decision.status_code == 200, decision.text
    now, then = decision.json(), before["decision"]
    assert now["fallback"] is False and now["decision"] == then["decision"]
    assert now["probability_of_default"] == then["probability_of_default"] and now["model"] == then["model"]
    assert now["reasons"] == then["reasons"]
