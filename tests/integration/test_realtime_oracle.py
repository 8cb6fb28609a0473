"""The real-time oracle: random event streams with copies, out-of-order and late events go
through ingest → the event bus → stream processors (Ray actors) → online reads at random
query times, and through the training-set path at the same times; every value equals a
brute-force oracle written from the documented semantics (exact for counts, min, max and
last_k; 1e-9 relative for sums and means), on SQLite and on Redis.

The oracle knows only what a client knows: the events it sent, and for each accepted copy
the stream position and acceptance time the bus returned (one copy per ingest call).
"""

from __future__ import annotations

import math
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from mlplatform import Aggregation, Entity, FeatureView, Field, Platform
from mlplatform.features.definitions import StreamSource
from mlplatform.features.event_log import read_events

S = 1_000_000
LATENESS_S = 30
applicant = Entity(name="applicant", join_keys=["applicant_id"])
source = StreamSource(
    name="repayments",
    dataset="events/repayments",
    timestamp_field="event_ts",
    allowed_lateness=f"{LATENESS_S}s",
    schema=[Field(name="applicant_id", dtype="int64"), Field(name="amount"), Field(name="kind", dtype="string")],
)
view = FeatureView(
    name="repayment_activity",
    entities=[applicant],
    source=source,
    aggregations=[
        Aggregation(function="count", window="20s", name="events_20s"),
        Aggregation(column="amount", function="count", window="1h", name="amounts_1h"),
        Aggregation(column="amount", function="sum", window="60s", name="amount_sum_60s"),
        Aggregation(column="amount", function="mean", window="1h", name="amount_mean_1h"),
        Aggregation(column="amount", function="min", window="20s", name="amount_min_20s"),
        Aggregation(column="amount", function="max", window="60s", name="amount_max_60s"),
        Aggregation(column="amount", function="last_k", k=3, window="1h", name="last_amounts"),
        Aggregation(column="kind", function="last_k", k=2, window="60s", name="last_kinds"),
    ],
)
REFS = [f"{view.name}:{a.feature_name}" for a in view.aggregations]
NAMES = [a.feature_name for a in view.aggregations]
STREAMS = {"processors": 2, "batch_size": 16, "block": "100ms", "flush_interval": "200ms", "claim_idle": "2s", "processor_cpus": 0}


def oracle(copies: list[dict], key: int, t: int) -> dict:
    first: dict[tuple, dict] = {}
    for c in copies:
        if c["known_us"] - c["event_us"] > LATENESS_S * S:
            continue
        ident = (c["applicant_id"], c["event_id"])
        if ident not in first or (c["known_us"], c["position"]) < (first[ident]["known_us"], first[ident]["position"]):
            first[ident] = c
    usable = [c for c in first.values() if c["applicant_id"] == key and c["event_us"] <= t and c["known_us"] <= t]
    out = {}
    for agg in view.aggregations:
        inside = [c for c in usable if c["event_us"] > t - agg.window // timedelta(microseconds=1)]
        if agg.column is None:
            out[agg.feature_name] = len(inside)
            continue
        inside = [c for c in inside if c[agg.column] is not None]
        values = [c[agg.column] for c in inside]
        out[agg.feature_name] = {
            "count": lambda: len(values),
            "sum": lambda: math.fsum(values),
            "mean": lambda: math.fsum(values) / len(values) if values else None,
            "min": lambda: min(values) if values else None,
            "max": lambda: max(values) if values else None,
            "last_k": lambda: [c[agg.column] for c in sorted(inside, key=lambda c: (c["event_us"], c["known_us"], c["position"], c["event_id"]))][-agg.k:],
        }[agg.function]()
    return out


def same(name: str, got, want) -> bool:
    if isinstance(want, float) and name.startswith(("amount_sum", "amount_mean")):
        return got is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(got, float) and got != got:
        got = None
    if hasattr(got, "tolist"):
        got = got.tolist()
    return got == want


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(when: datetime) -> int:
    return int((when - EPOCH) / timedelta(microseconds=1))


def instant(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def send(platform, rng: random.Random, n: int) -> list[dict]:
    """Ingest ``n`` copies one per call (so each copy's acceptance time is known)."""
    copies, sent = [], []
    for i in range(n):
        if sent and rng.random() < 0.25:  # a copy of an earlier event: a client retry, or the same id anew
            event = dict(rng.choice(sent))
            if rng.random() < 0.5:
                event["amount"] = round(rng.uniform(-50, 500), 2)
        else:
            age = rng.choice([0.0, rng.uniform(0, 25), rng.uniform(0, 80)])  # some beyond the lateness
            event = {
                "event_id": f"e{i}-{uuid.uuid4().hex[:4]}",
                "applicant_id": rng.randint(1, 3),
                "amount": None if rng.random() < 0.15 else round(rng.uniform(-50, 500), 2),
                "kind": rng.choice(["loan", "repay", "missed", None]),
                "event_ts": datetime.now(UTC) - timedelta(seconds=age),
            }
            sent.append(event)
        result = platform.features.ingest(source.name, [event])
        copies.append({**event, "event_us": micros(event["event_ts"]), "known_us": micros(result.first_known_at), "position": result.first_position})
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0, 0.3))  # spread acceptance times: query times fall between them
    return copies


def wait_logged(platform, count: int, timeout_s: float = 60.0) -> None:
    """Until the processors logged every accepted copy (they log only what they applied)."""
    deadline = time.monotonic() + timeout_s
    while read_events(platform.storage, source).num_rows < count:
        assert time.monotonic() < deadline, "the processors did not apply and log every accepted event in time"
        time.sleep(0.1)


@pytest.mark.parametrize("online", ["sqlite", "redis"])
def test_online_and_training_values_equal_the_oracle(tmp_path, ray_session, request, online):
    config = {"project": f"oracle{uuid.uuid4().hex[:6]}", "storage": {"root": str(tmp_path / "root")}, "streams": STREAMS}
    if online == "redis":
        config["online_store"] = {"type": "redis", "url": request.getfixturevalue("redis_server").url, "timeout": "2s"}
    platform = Platform.from_config(config)
    platform.features.apply([view])
    processors = platform.features.start_processors().ready()
    all_copies: list[dict] = []
    try:
        for seed in (1, 2):  # the second round adds to the state the first left
            rng = random.Random(seed * 7919 + len(online))
            copies = send(platform, rng, 45)
            all_copies += copies
            wait_logged(platform, len(all_copies))
            known = sorted(c["known_us"] for c in copies)
            times = sorted({rng.randint(known[0] - 2 * S, known[-1] + 2 * S) for _ in range(6)} | {known[len(known) // 2]})
            keys = [1, 2, 3, 4]  # 4 never has an event
            checked = 0
            for t in times:
                got = platform.features.get_online_features(REFS, {"applicant_id": keys}, now=instant(t)).to_dict()
                for i, key in enumerate(keys):
                    want = oracle(all_copies, key, t)
                    for name in NAMES:
                        assert same(name, got[name][i], want[name]), ("online", online, seed, key, t, name, got[name][i], want[name])
                        checked += 1
            rows = pd.DataFrame([{"applicant_id": k, "ts": instant(t)} for t in times for k in keys])
            offline = platform.features.get_historical_features(rows, REFS, entity_timestamp="ts").to_pandas()
            for row in offline.to_dict("records"):
                t = micros(pd.Timestamp(row["ts"]).to_pydatetime())
                want = oracle(all_copies, row["applicant_id"], t)
                for name in NAMES:
                    assert same(name, row[name], want[name]), ("offline", online, seed, row["applicant_id"], t, name, row[name], want[name])
                    checked += 1
            assert checked == 2 * len(times) * len(keys) * len(NAMES)
    finally:
        processors.stop()
