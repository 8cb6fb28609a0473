"""The model server against the deployed application, with real clients: the Open Inference
Protocol (V2) through ``tritonclient`` (an off-the-shelf V2 client) and as the spec's JSON,
for the LightGBM decision model and the fraud transformer (torch); the feature-aware predict
route; the checkout decision composing both models (and without the fraud model past its
deadline); replay of both; a new version behind an alias reaching traffic with no failed
request. Runs before test_serving.py, which shuts the shared application down."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import requests
from _fraud_builders import SLOW_APPLICANT, SLOW_S
from _serving_app import (
    CHECKOUT_KEY,
    FRAUD_DEADLINE_S,
    FRAUD_K,
    HEADERS,
    KEY,
    POLICY,
    SAFE,
    application,
    history,
    post,
    push_online,
    register_fraud,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app(served):
    """The served application with SAFE's history and merchant 7 online. (tritonclient adds its
    own headers to the dict it is given: it always gets a copy of HEADERS.)"""
    platform, deployed, _ = served
    now = datetime.now(UTC) - timedelta(minutes=5)
    assert push_online(deployed, "applicant_history", [history(SAFE, now, loans_365d=2.0), history(SLOW_APPLICANT, now)]).status_code == 200
    merchant = {"merchant_id": 7, "event_timestamp": now.isoformat(), "default_rate_90d": 0.02, "outcomes_90d": 40}
    assert push_online(deployed, "merchant_risk", [merchant]).status_code == 200
    return served


def _client(deployed):
    import tritonclient.http as triton

    return triton.InferenceServerClient(url=deployed.url.removeprefix("http://"), network_timeout=60.0, connection_timeout=60.0)


def _fraud_rows(served, n: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The first ``n`` training rows of the fraud world, as model inputs, and their requests."""
    from workloads.fraud.online import input_arrays

    world = served.fraud
    rows = world["sequences"].slice(0, n)
    apps = world["tables"]["applications"]
    by_id = {r["application_id"]: r for r in apps.select(["application_id", "merchant_id", "amount"]).to_pylist()}
    requests_ = [
        {"applicant_id": r["applicant_id"], "merchant_id": by_id[r["application_id"]]["merchant_id"],
         "amount": by_id[r["application_id"]]["amount"], "timestamp": r["application_ts"]}
        for r in rows.select(["application_id", "applicant_id", "application_ts"]).to_pylist()
    ]  # fmt: skip
    return input_arrays(rows), requests_


# ---------------------------------------------------------------------- V2 with tritonclient
def test_v2_health_and_metadata_of_both_models_with_an_off_the_shelf_client(app):
    _, deployed, _ = app
    client = _client(deployed)
    assert client.is_server_live() and client.is_server_ready()  # open routes: no key needed
    assert requests.get(f"{deployed.url}/v2/health/ready", timeout=30).json() == {"ready": True}
    server = client.get_server_metadata(headers=dict(HEADERS))
    assert server["name"] == "mlplatform" and "binary_tensor_data" in server["extensions"]

    underwriting = client.get_model_metadata("underwriting", headers=dict(HEADERS))
    assert underwriting["platform"] == "lightgbm" and underwriting["versions"] == ["1"]
    assert [o["name"] for o in underwriting["outputs"]] == ["probability"] and underwriting["outputs"][0]["datatype"] == "FP64"
    assert {i["datatype"] for i in underwriting["inputs"]} == {"FP64"} and all(i["shape"] == [-1] for i in underwriting["inputs"])

    fraud = client.get_model_metadata("fraud", headers=dict(HEADERS))
    assert fraud["platform"] == "torch" and fraud["versions"] == ["1"]
    shapes = {i["name"]: (i["datatype"], i["shape"]) for i in fraud["inputs"]}
    assert shapes["event_type"] == ("INT64", [-1, FRAUD_K]) and shapes["mask"] == ("BOOL", [-1, FRAUD_K])
    assert shapes["app_log_amount"] == ("FP32", [-1])
    assert client.is_model_ready("underwriting", headers=dict(HEADERS)) and client.is_model_ready("fraud", headers=dict(HEADERS))
    assert not client.is_model_ready("fraud", model_version="7", headers=dict(HEADERS))


def test_v2_infer_lightgbm_equals_the_booster_bit_for_bit(app):
    import tritonclient.http as triton

    from mlplatform.models.encoding import encode_frame

    platform, deployed, _ = app
    client = _client(deployed)
    booster = platform.models.load("underwriting", version=1).model
    names = booster.feature_name()
    rng = np.random.default_rng(3)
    x = rng.poisson(1.0, (5, len(names))).astype(np.float64)
    x[0, 0] = np.nan  # a missing value travels as NaN in binary data
    expected = booster.predict(encode_frame(booster, pd.DataFrame(x, columns=names)))
    for binary in (True, False):
        inputs = []
        for j, name in enumerate(names):
            tensor = triton.InferInput(name, [5], "FP64")
            tensor.set_data_from_numpy(x[:, j] if binary else np.nan_to_num(x[:, j], nan=1.0), binary_data=binary)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput("probability", binary_data=binary)]
        result = client.infer("underwriting", inputs, outputs=outputs, headers=dict(HEADERS))
        got = result.as_numpy("probability")
        want = expected if binary else booster.predict(encode_frame(booster, pd.DataFrame(np.nan_to_num(x, nan=1.0), columns=names)))
        assert got.dtype == np.float64 and np.array_equal(got, want), (binary, got, want)
        assert result.get_response()["model_version"] == "1"


def test_v2_infer_torch_with_tritonclient_and_as_the_spec_json(app):
    import tritonclient.http as triton

    platform, deployed, _ = app
    client = _client(deployed)
    arrays, _ = _fraud_rows(app, 6)
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), {"int64": "INT64", "float32": "FP32", "bool": "BOOL"}[str(array.dtype)])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    got = client.infer("fraud", inputs, headers=dict(HEADERS)).as_numpy("probability")  # binary outputs: the client's default

    _, predictor = platform.models.load_predictor("fraud", version=1)
    want = predictor.predict(arrays)["probability"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    body = {"id": "spec-json", "inputs": [
        {"name": n, "shape": list(a.shape), "datatype": {"int64": "INT64", "float32": "FP32", "bool": "BOOL"}[str(a.dtype)],
         "data": a.reshape(-1).tolist()} for n, a in arrays.items()]}
    response = post(f"{deployed.url}/v2/models/fraud/infer", body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json"), response.text
    doc = response.json()
    assert doc["model_name"] == "fraud" and doc["model_version"] == "1" and doc["id"] == "spec-json"
    (out,) = doc["outputs"]
    assert out["name"] == "probability" and out["datatype"] == "FP64" and out["shape"] == [6]
    np.testing.assert_allclose(out["data"], want, rtol=0, atol=1e-6)


def test_v2_errors_are_clear_and_scoped(app):
    _, deployed, _ = app
    url = deployed.url
    ok = {"inputs": [{"name": "app_log_amount", "shape": [1], "datatype": "FP32", "data": [5.0]}]}
    assert post(f"{url}/v2/models/nope/infer", ok).status_code == 404
    missing = post(f"{url}/v2/models/fraud/infer", ok)
    assert missing.status_code == 422 and "missing" in missing.json()["message"], missing.text
    wrong = {"inputs": [{"name": "app_log_amount", "shape": [2], "datatype": "FP32", "data": [5.0]}]}
    assert "needs 2 elements" in post(f"{url}/v2/models/fraud/infer", wrong).json()["message"]
    assert post(f"{url}/v2/models/fraud/versions/9/infer", ok).json()["error"].startswith("version_not_served: ")
    assert requests.post(f"{url}/v2/models/fraud/infer", json=ok, timeout=30).status_code == 401
    checkout_only = requests.post(f"{url}/v2/models/fraud/infer", json=ok, headers={"X-API-Key": CHECKOUT_KEY}, timeout=30)
    assert checkout_only.status_code == 403
    broken = requests.post(f"{url}/v2/models/fraud/infer", data=b"{", headers={**HEADERS, "Content-Type": "application/json"}, timeout=30)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["message"]


def test_a_model_in_a_deployment_of_its_own_answers_as_one_in_the_ingress(app):
    """``fraud_remote`` (the same weights) runs in replicas of its own, called through a
    deployment handle: the path a GPU model takes. Its metadata, V2 infer and predict match
    the in-ingress ``fraud`` exactly; its errors reach the client the same way."""
    platform, deployed, _ = app
    arrays, requests_ = _fraud_rows(app, 4)
    body = {"inputs": [
        {"name": n, "shape": list(a.shape), "datatype": {"int64": "INT64", "float32": "FP32", "bool": "BOOL"}[str(a.dtype)],
         "data": a.reshape(-1).tolist()} for n, a in arrays.items()]}
    local, remote = (post(f"{deployed.url}/v2/models/{m}/infer", body) for m in ("fraud", "fraud_remote"))
    assert remote.status_code == 200, remote.text
    assert remote.json()["outputs"] == local.json()["outputs"]
    meta = requests.get(f"{deployed.url}/v2/models/fraud_remote", headers=HEADERS, timeout=30).json()
    assert meta["platform"] == "torch" and meta["inputs"] == requests.get(f"{deployed.url}/v2/models/fraud", headers=HEADERS, timeout=30).json()["inputs"]
    entities = {"applicant_id": [r["applicant_id"] for r in requests_], "merchant_id": [r["merchant_id"] for r in requests_],
                "amount": [r["amount"] for r in requests_], "timestamp": [r["timestamp"].isoformat() for r in requests_]}
    predicted = post(f"{deployed.url}/v1/models/fraud_remote/predict", {"entities": entities})
    assert predicted.status_code == 200, predicted.text
    np.testing.assert_allclose(predicted.json()["outputs"]["probability"], local.json()["outputs"][0]["data"], rtol=0, atol=1e-6)
    bad = post(f"{deployed.url}/v2/models/fraud_remote/infer", {"inputs": body["inputs"][:-1]})
    assert bad.status_code == 422 and "missing" in bad.json()["message"], bad.text
    status = platform.serving.status()["deployments"]
    assert status["model-fraud_remote"]["replicas"].get("RUNNING") == 1, status


# --------------------------------------------------------------------- feature-aware predict
def test_predict_looks_features_up_online_for_the_lightgbm_model(app):
    platform, deployed, _ = app
    body = {"entities": {"applicant_id": [SAFE, 123_456_789], "merchant_id": [7, 7], "amount": [120.0, 50.0], "term": [4, 4]}}
    response = post(f"{deployed.url}/v1/models/underwriting/predict", body)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["model_name"] == "underwriting" and doc["model_version"] == "1"
    features = {f["name"]: f for f in doc["features"]}
    assert features["loans_365d"]["values"] == [2.0, None] and features["loans_365d"]["statuses"] == ["PRESENT", "NOT_FOUND"]
    assert features["loans_365d"]["event_timestamps"][0] is not None
    booster = platform.models.load("underwriting", version=1).model
    from mlplatform.models.encoding import encode_features

    for i in range(2):
        row = {name: features[name]["values"][i] for name in booster.feature_name()}
        assert doc["outputs"]["probability"][i] == float(booster.predict(encode_features(booster, row))[0])


def test_served_transformer_score_equals_batch_scoring_for_the_same_applicant_and_time(app):
    """The CPU equality the issue asks for: /v1/models/fraud/predict (the input built from the
    online event state by the workload's builder) against the evaluation path (the training
    kernel's sequence rows scored in a batch by the same version), within 1e-5."""
    platform, deployed, _ = app
    arrays, requests_ = _fraud_rows(app, 12)
    _, predictor = platform.models.load_predictor("fraud", version=1)
    batch = predictor.predict(arrays)["probability"]
    body = {"entities": {
        "applicant_id": [r["applicant_id"] for r in requests_], "merchant_id": [r["merchant_id"] for r in requests_],
        "amount": [r["amount"] for r in requests_], "timestamp": [r["timestamp"].isoformat() for r in requests_]}}
    response = post(f"{deployed.url}/v1/models/fraud/predict", body)
    assert response.status_code == 200, response.text
    served = np.array(response.json()["outputs"]["probability"])
    assert np.abs(served - batch).max() <= 1e-5, (served, batch)
    built = {f["name"]: np.array(f["values"]) for f in response.json()["features"]}
    np.testing.assert_array_equal(built["event_type"], arrays["event_type"])  # the same history, exactly


# ------------------------------------------------------------------------ composed decisions
def _decide(deployed, **overrides):
    response = post(f"{deployed.url}/v1/decisions", application(**overrides))
    assert response.status_code == 200, response.text
    return response.json()


def test_the_decision_composes_the_pd_and_fraud_models_and_replays_both(app):
    platform, deployed, _ = app
    small = _decide(deployed, applicant_id=SAFE, amount=60.0)
    assert small["decision"] == "approve" and small["fallback"] is False, small
    large = _decide(deployed, applicant_id=SAFE, amount=1990.0)
    assert large["decision"] == "decline", large
    assert large["reasons"][0] == {"code": "fraud_risk", "text": POLICY["model_rules"][0]["text"]}
    assert large["probability_of_default"] < POLICY["approve_below"]  # the PD alone would have approved

    for answer in (small, large):
        record = platform.serving.decision(answer["decision_id"])
        (fraud,) = json.loads(record["rule_models"])
        assert fraud["model_name"] == "fraud" and fraud["model_version"] == 1 and fraud["status"] == "scored"
        assert fraud["model_sha256"] == platform.models.get("fraud", version=1).artifacts["model.safetensors"]
        assert sorted(fraud["inputs"]) == sorted(["event_type", "category", "log_amount", "days_before", "days_past_due", "mask", "app_category", "app_log_amount"])
        replayed = platform.serving.replay(answer["decision_id"])
        assert replayed.identical, replayed
        (model,) = replayed.rule_models
        assert model.identical and model.replayed_score == fraud["score"]
    assert json.loads(platform.serving.decision(large["decision_id"])["rule_models"])[0]["score"] >= POLICY["model_rules"][0]["decline_at"]


def test_a_fraud_model_past_its_deadline_leaves_the_decision_to_the_pd_model(app):
    platform, deployed, _ = app
    started = time.monotonic()
    answer = _decide(deployed, applicant_id=SLOW_APPLICANT, amount=1990.0)
    took = time.monotonic() - started
    assert took < SLOW_S, f"the decision waited for the slow fraud model ({took:.2f}s)"
    assert answer["fallback"] is False and all(r["code"] != "fraud_risk" for r in answer["reasons"]), answer
    record = platform.serving.decision(answer["decision_id"])
    (fraud,) = json.loads(record["rule_models"])
    assert fraud["status"] == "deadline_exceeded" and "score" not in fraud
    assert took >= FRAUD_DEADLINE_S * 0.9
    replayed = platform.serving.replay(answer["decision_id"])
    assert replayed.identical and replayed.rule_models[0].status == "deadline_exceeded"


# ----------------------------------------------------------------------------------- rollout
def test_a_new_fraud_version_shadows_then_reaches_traffic_with_no_failed_request(app):
    platform, deployed, _ = app
    arrays, _ = _fraud_rows(app, 2)
    body = json.dumps({"inputs": [
        {"name": n, "shape": list(a.shape), "datatype": {"int64": "INT64", "float32": "FP32", "bool": "BOOL"}[str(a.dtype)],
         "data": a.reshape(-1).tolist()} for n, a in arrays.items()]})
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(f"{deployed.url}/v2/models/fraud/infer", data=body,
                                 headers={"X-API-Key": KEY, "Content-Type": "application/json"}, timeout=60)
                results.append((r.status_code, r.json().get("model_version", r.text) if r.status_code == 200 else r.text))

    v2 = register_fraud(platform, app.fraud["sequences"], seed=2)
    # first as the shadow: decisions log its score beside the served version's, and nothing else changes
    platform.models.set_alias("fraud", "candidate", v2)
    deadline = time.monotonic() + 60
    shadow = None
    while shadow is None and time.monotonic() < deadline:
        answer = _decide(deployed, applicant_id=SAFE, amount=80.0)
        (fraud,) = json.loads(platform.serving.decision(answer["decision_id"])["rule_models"])
        assert fraud["model_version"] == 1
        shadow = fraud.get("shadow")
        time.sleep(0.3)
    assert shadow is not None and shadow["alias"] == "candidate" and shadow["model_version"] == v2 and 0.0 <= shadow["score"] <= 1.0, shadow
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        platform.models.set_alias("fraud", "production", v2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(1 for s, v in results[-10:] if v == str(v2)) < 10:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        platform.models.set_alias("fraud", "production", 1)  # the later modules' decisions use v1
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v in results]
    assert versions[0] == "1" and versions[-1] == str(v2) and len(results) > 20, versions[-20:]
