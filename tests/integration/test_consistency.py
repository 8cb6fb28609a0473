"""The consistency report on decisions: served values equal the offline recomputation, and a
stale online row, a dropped event and a changed on-demand function are each flagged on the
feature they affect, and only there.

Decision records are written the way the decision engine writes them: the values one
``get_online_features`` call returned, the request's fields and the lookup's time.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa

from mlplatform import Aggregation, Entity, FeatureService, FeatureView, Field, OnDemandFeatureView, Platform, RequestSource
from mlplatform.features.definitions import ParquetSource, StreamSource
from mlplatform.features.event_log import append_events, read_events

applicant = Entity(name="applicant", join_keys=["applicant_id"])
profile = FeatureView(
    name="profile",
    entities=[applicant],
    source=ParquetSource(name="profiles", dataset="raw/profiles", timestamp_field="ts"),
    schema=[Field(name="income", dtype="float64"), Field(name="segment", dtype="string")],
)
stream = StreamSource(
    name="loans",
    dataset="events/loans",
    timestamp_field="loan_ts",
    schema=[Field(name="applicant_id", dtype="int64"), Field(name="amount")],
)
activity = FeatureView(
    name="loan_activity",
    entities=[applicant],
    source=stream,
    aggregations=[
        Aggregation(function="count", window="1d", name="loans_24h"),
        Aggregation(column="amount", function="sum", window="1d", name="borrowed_24h"),
    ],
)
checkout = RequestSource(name="checkout", schema=[Field(name="amount", dtype="float64")])


def ratio_v1(inputs: dict) -> dict:
    return {"amount_to_income": [a / i if i else None for a, i in zip(inputs["amount"], inputs["income"], strict=True)]}


def ratio_v2(inputs: dict) -> dict:  # the "fixed" function deployed after the decisions
    return {"amount_to_income": [a / i * 12 if i else None for a, i in zip(inputs["amount"], inputs["income"], strict=True)]}


def ratio_view(udf) -> OnDemandFeatureView:
    return OnDemandFeatureView(
        name="ratios", sources=(checkout, profile), schema=(Field(name="amount_to_income"),), udf=udf, mode="python"
    )


service = FeatureService(name="checkout_v1", features=["profile:income", "profile:segment", "loan_activity:loans_24h",
                                                      "loan_activity:borrowed_24h", "ratios:amount_to_income"])
STREAMS = {"processors": 1, "batch_size": 50, "block": "100ms", "flush_interval": "200ms", "claim_idle": "2s", "processor_cpus": 0}


def decide(platform: Platform, applicant_id: int, amount: float) -> dict:
    """A decision record as the engine logs it (features read at its ``created_at``)."""
    now = datetime.now(UTC)
    entities = {"applicant_id": [applicant_id], "amount": [amount]}
    values = platform.features.get_online_features(service.name, entities, now=now).to_dict()
    features = {name: values[name][0] for name in ("income", "segment", "loans_24h", "borrowed_24h", "amount_to_income")}
    request = {"application_id": f"app-{uuid.uuid4().hex[:8]}", "applicant_id": applicant_id, "amount": amount,
               "currency": "USD", "term": 4, "timestamp": now.isoformat()}
    return {"decision_id": uuid.uuid4().hex, "request": json.dumps(request), "features": json.dumps(features),
            "created_at": now.isoformat(), "fallback": False, "returned": True}


def test_served_values_match_and_each_fault_is_flagged_on_its_feature(tmp_path, ray_session):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this module
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}, "streams": STREAMS})
    platform.features.apply([profile, activity, ratio_view(ratio_v1), service])
    old = datetime.now(UTC) - timedelta(hours=2)
    platform.features.push("profile", [
        {"applicant_id": i, "event_timestamp": old, "income": 1000.0 * i, "segment": f"s{i % 2}"} for i in range(1, 7)
    ])
    processors = platform.features.start_processors().ready()
    try:
        now = datetime.now(UTC)
        events = [{"event_id": f"l{i}", "applicant_id": 1 + i % 6, "amount": 10.0 * i, "loan_ts": now - timedelta(minutes=i)} for i in range(30)]
        platform.features.ingest("loans", events)
        deadline = time.monotonic() + 60
        while read_events(platform.storage, stream).num_rows < len(events):
            assert time.monotonic() < deadline, "processors did not apply the events"
            time.sleep(0.1)
        clean = [decide(platform, i, 250.0 + i) for i in range(1, 7)]
        report = platform.features.consistency(service.name, records=clean)
        assert report.flagged == [] and report.decisions == 6
        assert set(report.per_feature["exact_match_rate"]) == {1.0}
        assert report.per_feature["compared"].tolist() == [6] * 5

        # 1. stale online state: a newer offline row the online store never got (as a
        #    materialization that did not run would leave it); decisions still read the old one
        platform.features.push("profile", [{"applicant_id": 2, "event_timestamp": now - timedelta(minutes=5),
                                             "income": 9999.0, "segment": "s0"}], to="offline")
        # 2. a dropped event: in the offline log (what training reads), never applied online
        dropped = pa.table({
            "event_id": ["dropped-1"], "applicant_id": [3], "amount": [500.0],
            "loan_ts": pa.array([now - timedelta(minutes=1)], pa.timestamp("us", tz="UTC")),
            "created_timestamp": pa.array([now - timedelta(seconds=50)], pa.timestamp("us", tz="UTC")),
            "stream_position": [10**15],
        })
        append_events(platform.storage, stream, dropped)
        faulty = [decide(platform, i, 250.0 + i) for i in range(1, 7)]
        # 3. the on-demand function changed after these decisions were made
        platform.features.apply([ratio_view(ratio_v2)])
        report = platform.features.consistency(service.name, records=faulty)
        rates = dict(zip(report.per_feature["ref"], report.per_feature["exact_match_rate"]))
        assert sorted(report.flagged) == ["amount_to_income", "borrowed_24h", "income", "loans_24h"], report.summary()
        assert rates["profile:income"] == 5 / 6 and rates["profile:segment"] == 1.0  # the stale row's segment is equal
        assert rates["loan_activity:loans_24h"] == 5 / 6 and rates["loan_activity:borrowed_24h"] == 5 / 6
        assert rates["ratios:amount_to_income"] == 0.0
        worst = report.examples.set_index("ref")
        assert worst.loc["profile:income", "served"] == 2000.0 and worst.loc["profile:income", "offline"] == 9999.0
        assert worst.loc["loan_activity:borrowed_24h", "abs_diff"] == 500.0

        written = report.write(platform.storage, "reports/consistency/test")
        assert set(written) == {"rows", "per_feature", "summary", "report", "png"}
        assert platform.storage.read_bytes("reports/consistency/test/match_rate.png").startswith(b"\x89PNG")
        assert "Flagged" in platform.storage.read_bytes("reports/consistency/test/summary.md").decode()
    finally:
        processors.stop()
