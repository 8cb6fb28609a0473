"""Real-time aggregation semantics against a brute-force oracle (no Ray, no stores)."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.errors import DefinitionError
from mlplatform.features.definitions import Aggregation, Entity, FeatureView, Field, ParquetSource, StreamSource
from mlplatform.features.event_log import ARRIVAL, event_schema
from mlplatform.features.realtime_join import realtime_values
from mlplatform.timestamps import CREATED_TIMESTAMP

S = 1_000_000  # microseconds per second
LATENESS = 50 * S

SOURCE = StreamSource(
    name="activity",
    dataset="streams/activity",
    timestamp_field="ts",
    allowed_lateness=timedelta(seconds=50),
    schema=[Field(name="applicant_id", dtype="int64"), Field(name="amount", dtype="float64"), Field(name="kind", dtype="string")],
)
VIEW = FeatureView(
    name="activity_rt",
    entities=[Entity(name="applicant")],
    source=SOURCE,
    aggregations=[
        Aggregation(function="count", window="100s", name="events_100s"),
        Aggregation(column="amount", function="count", window="300s", name="amounts_300s"),
        Aggregation(column="amount", function="sum", window="100s", name="amount_sum_100s"),
        Aggregation(column="amount", function="mean", window="300s", name="amount_mean_300s"),
        Aggregation(column="amount", function="min", window="60s", name="amount_min_60s"),
        Aggregation(column="amount", function="max", window="300s", name="amount_max_300s"),
        Aggregation(column="amount", function="last_k", k=3, window="300s", name="last_amounts"),
        Aggregation(column="kind", function="last_k", k=2, window="100s", name="last_kinds"),
    ],
)


def oracle(events: list[dict], key: int, t: int) -> dict:
    """The documented semantics, written the slow and obvious way."""
    first: dict[tuple, dict] = {}
    for e in events:
        if e["known_us"] - e["event_us"] > LATENESS:
            continue  # late: counted nowhere
        ident = (e["applicant_id"], e["event_id"])  # an event id is one event of one key
        kept = first.get(ident)
        if kept is None or (e["known_us"], e["arrival"]) < (kept["known_us"], kept["arrival"]):
            first[ident] = e
    usable = [e for e in first.values() if e["applicant_id"] == key and e["event_us"] <= t and e["known_us"] <= t]
    out = {}
    for agg in VIEW.aggregations:
        w = agg.window // timedelta(microseconds=1)
        inside = [e for e in usable if e["event_us"] > t - w]
        if agg.column is None:
            out[agg.feature_name] = len(inside)
            continue
        inside = [e for e in inside if e[agg.column] is not None]
        values = [e[agg.column] for e in inside]
        if agg.function == "count":
            out[agg.feature_name] = len(values)
        elif agg.function == "sum":
            out[agg.feature_name] = math.fsum(values)
        elif agg.function == "mean":
            out[agg.feature_name] = math.fsum(values) / len(values) if values else None
        elif agg.function == "min":
            out[agg.feature_name] = min(values) if values else None
        elif agg.function == "max":
            out[agg.feature_name] = max(values) if values else None
        else:
            ordered = sorted(inside, key=lambda e: (e["event_us"], e["known_us"], e["arrival"], e["event_id"]))
            out[agg.feature_name] = [e[agg.column] for e in ordered][-agg.k :] if ordered else []
    return out


def table_of(events: list[dict]) -> pa.Table:
    schema = event_schema(SOURCE)
    columns = {
        "event_id": [e["event_id"] for e in events],
        "applicant_id": [e["applicant_id"] for e in events],
        "amount": [e["amount"] for e in events],
        "kind": [e["kind"] for e in events],
        "ts": pa.array([e["event_us"] for e in events], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        CREATED_TIMESTAMP: pa.array([e["known_us"] for e in events], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        ARRIVAL: [e["arrival"] for e in events],
    }
    return pa.table(columns).cast(schema)


@st.composite
def event_lists(draw):
    n = draw(st.integers(0, 40))
    events = []
    for i in range(n):
        event_us = draw(st.integers(0, 600)) * S + draw(st.sampled_from([0, 1, 999_999]))
        delay = draw(st.sampled_from([0, 1, 10 * S, LATENESS, LATENESS + 1, 200 * S]))
        events.append({
            # few ids: copies of one event (same or different payloads) are common
            "event_id": f"e{draw(st.integers(0, max(1, n // 2)))}",
            "applicant_id": draw(st.sampled_from([1, 2])),
            "amount": draw(st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.1, 0.2, 1e-9]))),
            "kind": draw(st.sampled_from(["loan", "repay", None])),
            "event_us": event_us,
            "known_us": event_us + delay,
            "arrival": i,  # stream order
        })
    return events


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@settings(max_examples=150, deadline=None)
@given(events=event_lists(), times=st.lists(st.integers(0, 900 * S), min_size=1, max_size=8))
def test_values_equal_the_oracle_at_any_time(events, times):
    table = table_of(events)
    keys = [(1,), (2,), (3,)] * len(times)  # 3 has no events
    at = np.array([t for t in times for _ in range(3)], dtype=np.int64)
    names = [a.feature_name for a in VIEW.aggregations]
    got = realtime_values(VIEW, names, table, keys, at)
    for i, (key, t) in enumerate(zip(keys, at)):
        want = oracle(events, key[0], int(t))
        for name in names:
            assert same(got[name][i], want[name]), (name, key, int(t), got[name][i], want[name])


def test_arrival_order_does_not_change_any_value():
    rng = np.random.default_rng(3)
    events = [
        {"event_id": f"e{i % 7}", "applicant_id": 1, "amount": float(rng.normal()), "kind": "loan",
         "event_us": int(rng.integers(0, 300)) * S, "known_us": 0, "arrival": i}
        for i in range(30)
    ]
    for e in events:
        e["known_us"] = e["event_us"] + int(rng.integers(0, 60)) * S
    at = np.array([100 * S, 250 * S, 400 * S])
    names = [a.feature_name for a in VIEW.aggregations]
    forward = realtime_values(VIEW, names, table_of(events), [(1,)] * 3, at)
    backward = realtime_values(VIEW, names, table_of(events[::-1]), [(1,)] * 3, at)
    assert forward == backward


def test_empty_windows_and_the_event_time_of_the_newest_event():
    events = [{"event_id": "a", "applicant_id": 1, "amount": 5.0, "kind": "loan", "event_us": 10 * S, "known_us": 12 * S, "arrival": 0}]
    got = realtime_values(VIEW, ["events_100s", "amount_sum_100s", "amount_mean_300s", "last_amounts"], table_of(events),
                          [(1,), (1,), (1,), (2,)], np.array([11 * S, 12 * S, 200 * S, 12 * S]))
    # known at 12 s: not yet visible at 11 s, though it happened at 10 s
    assert got["events_100s"] == [0, 1, 0, 0]
    assert got["amount_sum_100s"] == [0.0, 5.0, 0.0, 0.0]
    assert got["amount_mean_300s"] == [None, 5.0, 5.0, None]
    assert got["last_amounts"] == [[], [5.0], [5.0], []]
    assert got["event_timestamp"] == [None, 10 * S, 10 * S, None]


def test_stream_view_definitions_are_checked():
    entity = Entity(name="applicant")
    with pytest.raises(DefinitionError, match="not a field of stream source"):
        FeatureView(name="v", entities=[entity], source=SOURCE, aggregations=[Aggregation(column="nope", function="sum", window="1d")])
    with pytest.raises(DefinitionError, match="numeric column"):
        FeatureView(name="v", entities=[entity], source=SOURCE, aggregations=[Aggregation(column="kind", function="sum", window="1d")])
    with pytest.raises(DefinitionError, match="no ttl"):
        FeatureView(name="v", entities=[entity], source=SOURCE, ttl="1d", aggregations=[Aggregation(function="count", window="1d")])
    with pytest.raises(DefinitionError, match="last_k"):
        Aggregation(column="amount", function="last_k", window="1d")
    batch = ParquetSource(name="b", dataset="raw/b", timestamp_field="ts")
    with pytest.raises(DefinitionError, match="needs a StreamSource"):
        FeatureView(name="v", entities=[entity], source=batch, aggregations=[Aggregation(column="amount", function="last_k", k=2, window="1d")])
    # a stored spec comes back as the same view
    assert FeatureView.model_validate(VIEW.spec()) == VIEW
    assert VIEW.is_realtime and VIEW.features[-1].dtype == "list"


@settings(max_examples=80, deadline=None)
@given(events=event_lists(), times=st.lists(st.integers(0, 900 * S), min_size=1, max_size=6))
def test_events_read_back_from_an_online_store_give_the_oracles_values(events, times):
    """The online path: events encoded as a store keeps them, decoded (``from_encoded``: one
    JSON parse for all payloads), made usable (late dropped, first copy per id) and aggregated."""
    from mlplatform.features.realtime import EventArrays, aggregate, encode_events

    encoded = encode_events(VIEW, table_of(events))
    for key in (1, 2):
        mine = [e for e, raw in zip(encoded, events) if raw["applicant_id"] == key]
        got = aggregate(VIEW, EventArrays.from_encoded(VIEW, mine), np.array(times, dtype=np.int64))
        for i, t in enumerate(times):
            want = oracle(events, key, t)
            for name, value in want.items():
                assert same(got[name][i], value), (name, key, t, got[name][i], value)


def test_a_bad_payload_among_good_ones_is_refused_as_alone():
    from mlplatform.features.realtime import EncodedEvent, EventArrays

    good = [EncodedEvent("k", f"e{i}", i, i, i, '{"amount":1.5,"kind":"loan"}') for i in range(3)]
    arrays = EventArrays.from_encoded(VIEW, good)
    assert arrays.columns["amount"].tolist() == [1.5] * 3 and arrays.columns["kind"].tolist() == ["loan"] * 3
    # two halves of one object would parse as one when joined: each is refused on its own
    halves = [*good, EncodedEvent("k", "x", 9, 9, 9, '{"amount":2'), EncodedEvent("k", "y", 9, 9, 9, '"kind":"repay"}')]
    with pytest.raises(ValueError):
        EventArrays.from_encoded(VIEW, halves)
