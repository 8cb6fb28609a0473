"""platform.features.backfill on a real local Ray (and a loopback S3), against a brute-force oracle."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from mlplatform import (
    Aggregation,
    DataError,
    DefinitionError,
    Entity,
    FeatureView,
    Field,
    NotFoundError,
    ParquetSource,
    Platform,
    RequestSource,
    on_demand_feature_view,
)
from mlplatform.features.store import offline_dataset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

T0 = datetime(2024, 1, 1, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
user = Entity(name="user", join_keys=["user_id"])
events_source = ParquetSource(name="tx", dataset="raw/tx", timestamp_field="ts", created_timestamp_field="known")
AGGREGATIONS = [
    Aggregation(column="amount", function="sum", window="7d", name="amount_7d"),
    Aggregation(column="amount", function="mean", window="30d", name="avg_amount_30d"),
    Aggregation(column="amount", function="max", window="3d", name="max_amount_3d"),
    Aggregation(column="amount", function="min", window="30d", name="min_amount_30d"),
    Aggregation(function="count", window="30d", name="tx_30d"),
    Aggregation(column="amount", function="count", window="7d", name="amounts_7d"),
]
daily = FeatureView(name="user_tx", entities=[user], source=events_source, aggregations=AGGREGATIONS)
six_hourly = FeatureView(
    name="user_tx_6h",
    entities=[user],
    source=events_source,
    aggregations=AGGREGATIONS[:3],
    cadence="6h",
    availability_delay="1h",
)
plain = FeatureView(
    name="user_last_tx",
    entities=[user],
    source=events_source,
    schema=[Field(name="amount", dtype="float64"), Field(name="channel", dtype="string")],
)
request = RequestSource(name="req", schema=[Field(name="amount")])


@on_demand_feature_view(sources=[request], schema=[Field(name="doubled")])
def doubled(df):  # pragma: no cover - never called: on-demand views have nothing to backfill
    return df * 2


def _source(seed: int, n: int = 600, users: int = 25) -> list[dict]:
    """Random events over Jan-Feb 2024, some exactly on midnights, some known days later, some
    amounts null."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        minutes = int(rng.integers(0, 60 * 24 * 60))
        if i % 7 == 0:
            minutes -= minutes % (60 * 24)  # exactly on a boundary
        event = T0 - timedelta(days=10) + timedelta(minutes=minutes)
        rows.append(
            {
                "user_id": int(rng.integers(0, users)),
                "ts": event,
                "known": event + timedelta(hours=int(rng.choice([0, 0, 0, 5, 30, 100]))),
                "amount": None if i % 11 == 0 else float(rng.integers(-40, 400)) / 4,
                "channel": str(rng.choice(["web", "app"])),
            }
        )
    return rows


def _publish(platform: Platform, rows: list[dict]) -> None:
    # Event times in another zone and unit than the platform's: read as UTC instants.
    table = pa.table(
        {
            "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
            "ts": pa.array([r["ts"] for r in rows], pa.timestamp("us", tz="UTC")).cast(pa.timestamp("ns", tz="America/New_York")),
            "known": pa.array([r["known"] for r in rows], pa.timestamp("us", tz="UTC")),
            "amount": pa.array([r["amount"] for r in rows], pa.float64()),
            "channel": pa.array([r["channel"] for r in rows], pa.string()),
        }
    )
    platform.datasets.publish("raw/tx", table)


def oracle(rows: list[dict], view: FeatureView, start: datetime, end: datetime) -> list[tuple]:
    """For every user and boundary, scan every event; keep boundaries where a value changed."""
    cadence = view.cadence
    k0, k_last = (start - EPOCH) // cadence, (end - EPOCH) // cadence
    out = []
    for key in sorted({r["user_id"] for r in rows}):
        mine = [r for r in rows if r["user_id"] == key]
        previous = None
        for k in range(k0, k_last + 1):
            t = EPOCH + k * cadence
            values = []
            for agg in view.aggregations:
                xs = [
                    1.0 if agg.column is None else r[agg.column]
                    for r in mine
                    if t - agg.window < r["ts"] <= t and max(r["ts"], r["known"]) <= t
                ]
                xs = [x for x in xs if x is not None]
                values.append(
                    {
                        "count": len(xs),
                        "sum": sum(xs),
                        "mean": sum(xs) / len(xs) if xs else None,
                        "min": min(xs) if xs else None,
                        "max": max(xs) if xs else None,
                    }[agg.function]
                )
            if k > k0 and values != previous:
                out.append((key, t, t + view.availability_delay, *values))
            previous = values
    return sorted(out)


def offline_rows(platform: Platform, view: FeatureView) -> list[tuple]:
    table = platform.datasets.read_table(offline_dataset(view.name))
    names = ["user_id", "event_timestamp", "created_timestamp", *[f.name for f in view.features]]
    return sorted(zip(*[table.column(n).to_pylist() for n in names]))


def _same(got: list[tuple], want: list[tuple]) -> bool:
    def close(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)
        return a == b

    return len(got) == len(want) and all(len(g) == len(w) and all(map(close, g, w)) for g, w in zip(got, want))


@pytest.fixture
def platform(tmp_path) -> Platform:
    return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})


def test_backfill_matches_the_oracle(platform, caplog):
    rows = _source(seed=1)
    _publish(platform, rows)
    platform.features.apply([daily])
    caplog.set_level(logging.INFO, logger="mlplatform.features.backfill")  # the start line and the summary
    result = platform.features.backfill("user_tx", "2024-01-01", datetime(2024, 2, 15))
    printed = [record.getMessage() for record in caplog.records if record.name == "mlplatform.features.backfill"]

    want = oracle(rows, daily, T0, datetime(2024, 2, 15, tzinfo=UTC))
    assert _same(offline_rows(platform, daily), want)
    version = platform.datasets.get(offline_dataset("user_tx"))
    assert result.version == version and version.version == 1
    assert result.rows_out == len(want) == version.rows
    # events read: from the baseline (Jan 1) minus the longest window (30d) to the last boundary
    assert result.rows_in == sum(T0 - timedelta(days=30) < r["ts"] <= datetime(2024, 2, 15, tzinfo=UTC) for r in rows)
    assert result.partitions == 45 and version.partitions == sorted({f"{w[1]:%Y-%m-%d}" for w in want})
    assert version.metadata == {
        "view": "user_tx",
        "view_version": daily.version,
        "data_version": daily.data_version,
        "start": "2024-01-01T00:00:00+00:00",
        "end": "2024-02-15T00:00:00+00:00",
    }
    assert printed[-1] == result.summary() and "events/s" in printed[-1]
    schema = platform.datasets.read_table(offline_dataset("user_tx")).schema
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("tx_30d").type == pa.int64() and schema.field("amount_7d").type == pa.float64()


def test_consecutive_ranges_equal_one_range_and_reruns_replace(platform):
    # A 6-hourly view cut at 13:00: the dates on either side of the cut are each written twice.
    rows = _source(seed=2, n=300, users=10)
    _publish(platform, rows)
    platform.features.apply([six_hourly])
    a, b, c = T0, datetime(2024, 1, 20, 13, tzinfo=UTC), datetime(2024, 2, 10, tzinfo=UTC)
    platform.features.backfill(six_hourly, a, b)
    platform.features.backfill(six_hourly, b, c)
    want = oracle(rows, six_hourly, a, c)
    assert _same(offline_rows(platform, six_hourly), want)

    again = platform.features.backfill(six_hourly, a, b)
    assert again.version.version == 3
    assert _same(offline_rows(platform, six_hourly), want)  # replaced, not duplicated


def test_rerun_after_the_source_lost_its_events_empties_the_range(platform):
    rows = _source(seed=5, n=100, users=5)
    _publish(platform, rows)
    platform.features.apply([daily])
    first = platform.features.backfill("user_tx", "2024-01-01", "2024-01-31")
    assert first.rows_out > 0 and first.kernel_seconds > 0
    _publish(platform, [r for r in rows if r["ts"] > datetime(2024, 3, 1, tzinfo=UTC)])  # none are
    again = platform.features.backfill("user_tx", "2024-01-01", "2024-01-31")
    assert (again.rows_in, again.rows_out, again.partitions) == (0, 0, 30)
    assert offline_rows(platform, daily) == []  # every date of the range was replaced, even with nothing


def test_plain_view_copies_rows_in_range(platform):
    rows = _source(seed=3, n=200)
    _publish(platform, rows)
    platform.features.apply([plain])
    cut = datetime(2024, 1, 15, 9, 30, tzinfo=UTC)
    platform.features.backfill("user_last_tx", "2024-01-01", cut)
    result = platform.features.backfill("user_last_tx", cut, "2024-02-01")
    table = platform.datasets.read_table(offline_dataset("user_last_tx"))
    got = sorted(
        zip(*[table.column(n).to_pylist() for n in ["user_id", "event_timestamp", "created_timestamp", "amount", "channel"]])
    )
    want = sorted(
        (r["user_id"], r["ts"], r["known"], r["amount"], r["channel"])
        for r in rows
        if T0 < r["ts"] <= datetime(2024, 2, 1, tzinfo=UTC)
    )
    assert got == want
    assert result.rows_in == result.rows_out == sum(cut < r["ts"] <= datetime(2024, 2, 1, tzinfo=UTC) for r in rows)


def test_bad_input_names_the_problem(platform):
    with pytest.raises(NotFoundError, match="user_tx"):
        platform.features.backfill("user_tx", "2024-01-01", "2024-02-01")
    platform.features.apply([daily])
    with pytest.raises(NotFoundError, match="raw/tx"):
        platform.features.backfill("user_tx", "2024-01-01", "2024-02-01")
    platform.datasets.publish("raw/tx", pa.table({"user_id": [1], "ts": [T0]}))
    with pytest.raises(DataError, match="'known'"):
        platform.features.backfill("user_tx", "2024-01-01", "2024-02-01")
    with pytest.raises(DataError, match="before end"):
        platform.features.backfill("user_tx", "2024-02-01", "2024-02-01")
    with pytest.raises(DataError, match="not a point in time"):
        platform.features.backfill("user_tx", "yesterday-ish", "2024-02-01")
    changed = FeatureView(name="user_tx", entities=[user], source=events_source, aggregations=AGGREGATIONS[:1])
    with pytest.raises(DefinitionError, match="apply it"):
        platform.features.backfill(changed, "2024-01-01", "2024-02-01")
    platform.features.apply([doubled])
    with pytest.raises(DefinitionError, match="on-demand"):
        platform.features.backfill("doubled", "2024-01-01", "2024-02-01")


def test_backfill_on_s3(s3_server, s3_bucket):
    platform = Platform.from_config({"storage": {"root": f"s3://{s3_bucket}/bf", "s3": {"endpoint_url": s3_server}}})
    rows = _source(seed=4, n=150, users=8)
    _publish(platform, rows)
    platform.features.apply([daily])
    end = datetime(2024, 1, 20, tzinfo=UTC)
    result = platform.features.backfill("user_tx", T0, end)
    assert result.version.name == offline_dataset("user_tx")
    assert _same(offline_rows(platform, daily), oracle(rows, daily, T0, end))
