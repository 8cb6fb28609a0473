"""The windowed-aggregation kernel against a brute-force oracle, plus readable examples."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplatform.errors import DataError
from mlplatform.features import Aggregation
from mlplatform.features._windows import boundary_indices, event_time_range, window_aggregate

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
BASE = datetime(2024, 3, 1, tzinfo=timezone.utc)
H = timedelta(hours=1)
D = timedelta(days=1)


# ---------------------------------------------------------------------------------------------
# The oracle: for every entity and every boundary, scan every event and apply the definition.


def _agg_value(function: str, xs: list[float]):
    if function == "count":
        return len(xs)
    if function == "sum":
        return float(sum(xs)) if xs else 0.0
    if not xs:
        return None
    if function == "mean":
        return sum(xs) / len(xs)
    return float(min(xs)) if function == "min" else float(max(xs))


def oracle(events: list[dict], aggregations, *, cadence, delay, start, end) -> list[tuple]:
    """Rows ``(key, T, created, *values)`` the definition asks for, sorted."""
    k0 = (start - EPOCH) // cadence
    k_last = (end - EPOCH) // cadence
    keys = sorted({e["key"] for e in events if e["key"] is not None})
    rows = []
    for key in keys:
        mine = [e for e in events if e["key"] == key and e["event"] is not None]
        previous = None
        for k in range(k0, k_last + 1):
            t = EPOCH + k * cadence
            values = []
            for agg in aggregations:
                xs = []
                for e in mine:
                    known = e["event"] if e.get("created") is None else max(e["event"], e["created"])
                    if not (t - agg.window < e["event"] <= t and known <= t):
                        continue
                    if agg.column is None:
                        xs.append(1.0)
                    elif e[agg.column] is not None and not math.isnan(e[agg.column]):
                        xs.append(e[agg.column])
                values.append(_agg_value(agg.function, xs))
            if k > k0 and values != previous:
                rows.append((key, t, t + delay, *values))
            previous = values
    return sorted(rows)


def _table(events: list[dict], ts_type=pa.timestamp("us", tz="UTC")) -> pa.Table:
    return pa.table(
        {
            "key": pa.array([e["key"] for e in events], pa.int64()),
            "event_ts": pa.array([e["event"] for e in events], ts_type),
            "known_ts": pa.array([e.get("created") for e in events], ts_type),
            "x": pa.array([e.get("x") for e in events], pa.float64()),
            "y": pa.array([e.get("y") for e in events], pa.int64()),
        }
    )


def _rows(table: pa.Table, aggregations) -> list[tuple]:
    names = ["key", "event_timestamp", "created_timestamp", *[a.feature_name for a in aggregations]]
    cols = [table.column(n).to_pylist() for n in names]
    return sorted(zip(*cols))


def run(events, aggregations, *, cadence=D, delay=timedelta(0), start, end, created=True, ts_type=None):
    table = _table(events, ts_type) if ts_type is not None else _table(events)
    out = window_aggregate(
        table,
        join_keys=["key"],
        event_ts="event_ts",
        created_ts="known_ts" if created else None,
        aggregations=aggregations,
        cadence=cadence,
        availability_delay=delay,
        start=start,
        end=end,
    )
    return out, _rows(out, aggregations)


# ---------------------------------------------------------------------------------------------
# Property test

CADENCES = [D, 6 * H, 8 * H, 2 * D]
WINDOWS = [6 * H, D, 36 * H, 2 * D, 3 * D, 7 * D]
FUNCTIONS = ["count", "sum", "mean", "min", "max"]


@st.composite
def scenarios(draw):
    cadence = draw(st.sampled_from(CADENCES))
    hour = 3600 * 10**6
    # Times are drawn on a grid of hours (so they often sit exactly on boundaries and exactly a
    # window away from one), with some arbitrary microsecond offsets.
    def instant():
        hours = draw(st.integers(-24 * 10, 24 * 12))
        jitter = draw(st.one_of(st.just(0), st.just(1), st.just(-1), st.integers(0, hour - 1)))
        return BASE + timedelta(microseconds=hours * hour + jitter)

    n = draw(st.integers(0, 25))
    events = []
    for _ in range(n):
        event = instant() if draw(st.integers(0, 20)) else None
        lag = draw(st.sampled_from([None, None, 0, 1, 6, 24, 30, 24 * 4]))
        created = None if lag is None or event is None else event + timedelta(hours=lag)
        if created is not None and draw(st.booleans()):
            created -= timedelta(hours=draw(st.integers(1, 48)))  # created before the event: still known at event
        events.append(
            {
                "key": draw(st.sampled_from([1, 2, 3, 3, None] if draw(st.integers(0, 10)) else [1])),
                "event": event,
                "created": created,
                # dyadic values: float sums are exact, so change detection is exact too
                "x": draw(st.one_of(st.none(), st.integers(-20, 20).map(lambda v: v / 4))),
                "y": draw(st.one_of(st.none(), st.integers(0, 90))),
            }
        )
    aggregations = []
    for i in range(draw(st.integers(1, 6))):
        function = draw(st.sampled_from(FUNCTIONS))
        column = draw(st.sampled_from([None, "x", "y"] if function == "count" else ["x", "y"]))
        aggregations.append(
            Aggregation(column=column, function=function, window=draw(st.sampled_from(WINDOWS)), name=f"f{i}")
        )
    start = BASE + timedelta(hours=draw(st.integers(-24 * 3, 24 * 6)), minutes=draw(st.sampled_from([0, 0, 30])))
    end = start + timedelta(hours=draw(st.integers(1, 24 * 6)))
    delay = draw(st.sampled_from([timedelta(0), 2 * H, D]))
    return events, aggregations, cadence, delay, start, end


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_kernel_matches_oracle(scenario):
    events, aggregations, cadence, delay, start, end = scenario
    _, got = run(events, aggregations, cadence=cadence, delay=delay, start=start, end=end)
    want = oracle(events, aggregations, cadence=cadence, delay=delay, start=start, end=end)
    assert got == want


@settings(max_examples=80, deadline=None)
@given(scenarios(), st.integers(1, 200))
def test_consecutive_ranges_equal_one_range(scenario, cut_hours):
    events, aggregations, cadence, delay, start, end = scenario
    middle = min(start + timedelta(hours=cut_hours), end - timedelta(microseconds=1))
    if middle <= start:
        return
    _, whole = run(events, aggregations, cadence=cadence, delay=delay, start=start, end=end)
    _, first = run(events, aggregations, cadence=cadence, delay=delay, start=start, end=middle)
    _, second = run(events, aggregations, cadence=cadence, delay=delay, start=middle, end=end)
    assert sorted(first + second) == whole


# ---------------------------------------------------------------------------------------------
# Examples a reader can follow

SUM_3D = Aggregation(column="x", function="sum", window="3d", name="x_sum_3d")
MAX_3D = Aggregation(column="x", function="max", window="3d", name="x_max_3d")
ROWS_3D = Aggregation(function="count", window="3d", name="rows_3d")


def day(n: int, hours: float = 0) -> datetime:
    return BASE + timedelta(days=n, hours=hours)


def test_event_leaving_the_window_emits_the_lower_value():
    events = [
        {"key": 1, "event": day(0, 10), "x": 5.0},  # enters at day 1, leaves at day 4
        {"key": 1, "event": day(1, 10), "x": 2.0},  # enters at day 2, leaves at day 5
    ]
    _, rows = run(events, [SUM_3D, MAX_3D, ROWS_3D], start=day(0), end=day(10), created=False)
    assert rows == [
        (1, day(1), day(1), 5.0, 5.0, 1),
        (1, day(2), day(2), 7.0, 5.0, 2),
        (1, day(4), day(4), 2.0, 2.0, 1),  # the 5.0 left the window
        (1, day(5), day(5), 0.0, None, 0),  # empty window: sum 0, max null, count 0
    ]


def test_no_row_when_nothing_changes():
    events = [
        {"key": 1, "event": day(0, 1), "x": 3.0},
        {"key": 1, "event": day(2, 1), "x": 0.0},  # sum and max unchanged when it enters
        {"key": 2, "event": day(0, 1), "x": 1.0},
    ]
    _, rows = run(events, [SUM_3D, MAX_3D], start=day(0), end=day(3), created=False)
    assert rows == [(1, day(1), day(1), 3.0, 3.0), (2, day(1), day(1), 1.0, 1.0)]


def test_window_is_half_open_and_counts_only_known_events():
    events = [
        {"key": 1, "event": day(1), "x": 1.0},  # on boundary day 1: in (day 1 - 3d, day 1]
        {"key": 1, "event": day(1, 12), "created": day(3, 1), "x": 10.0},  # known only after day 3
    ]
    _, rows = run(events, [SUM_3D], start=day(0), end=day(6))
    assert rows == [
        (1, day(1), day(1), 1.0),
        # day 4: the first event is exactly 3 days old, so out; the second is known now
        (1, day(4), day(4), 10.0),
        (1, day(5), day(5), 0.0),
    ]


def test_late_events_known_after_they_left_the_window_never_count():
    events = [{"key": 1, "event": day(0, 1), "created": day(5), "x": 1.0}]
    _, rows = run(events, [SUM_3D], start=day(0), end=day(8))
    assert rows == []


def test_baseline_before_start_is_computed_not_emitted():
    events = [{"key": 1, "event": day(0, 1), "x": 4.0}]
    _, rows = run(events, [SUM_3D], start=day(1), end=day(8), created=False)
    # The state at day 1 (the baseline) already holds the 4.0; the first change is it leaving.
    assert rows == [(1, day(4), day(4), 0.0)]


def test_six_hour_cadence_and_availability_delay():
    agg = Aggregation(column="x", function="mean", window="12h", name="x_mean_12h")
    events = [{"key": 1, "event": day(0, 7), "x": 2.0}, {"key": 1, "event": day(0, 13), "x": 4.0}]
    _, rows = run(events, [agg], cadence=6 * H, delay=H, start=day(0), end=day(1, 6), created=False)
    assert rows == [
        (1, day(0, 12), day(0, 13), 2.0),
        (1, day(0, 18), day(0, 19), 3.0),
        (1, day(1, 0), day(1, 1), 4.0),  # the 07:00 event is 17h old
        (1, day(1, 6), day(1, 7), None),
    ]


def test_nulls_are_skipped_and_counted_apart():
    aggs = [
        Aggregation(column="x", function="count", window="3d", name="n_x"),
        Aggregation(function="count", window="3d", name="n_rows"),
        Aggregation(column="x", function="min", window="3d", name="x_min"),
        Aggregation(column="x", function="sum", window="3d", name="x_sum"),
    ]
    events = [{"key": 1, "event": day(0, 1), "x": None}, {"key": 1, "event": day(0, 2), "x": float("nan")}]
    _, rows = run(events, aggs, start=day(0), end=day(1), created=False)
    assert rows == [(1, day(1), day(1), 0, 2, None, 0.0)]


def test_timestamps_in_any_unit_or_zone_are_utc_instants():
    zone = timezone(timedelta(hours=-7))
    events = [{"key": 1, "event": day(0, 23).astimezone(zone), "x": 1.0}]
    for ts_type in (pa.timestamp("ns", tz="UTC"), pa.timestamp("us", tz="America/Los_Angeles"), pa.timestamp("ms")):
        plain = [{**e, "event": e["event"].astimezone(timezone.utc).replace(tzinfo=None)} for e in events]
        _, rows = run(plain if ts_type.tz is None else events, [SUM_3D], start=day(0), end=day(2),
                      created=False, ts_type=ts_type)
        assert rows == [(1, day(1), day(1), 1.0)]


def test_output_schema_and_composite_string_keys():
    table = pa.table(
        {
            "country": ["se", "se", "de", None],
            "shop": pa.array([1, 1, 1, 1], pa.int32()),
            "ts": pa.array([day(0, 1), day(0, 2), day(0, 3), day(0, 4)], pa.timestamp("us", tz="UTC")),
        }
    )
    out = window_aggregate(
        table, join_keys=["country", "shop"], event_ts="ts", created_ts=None, aggregations=[ROWS_3D],
        cadence=D, availability_delay=timedelta(0), start=day(0), end=day(1),
    )
    assert out.schema.names == ["country", "shop", "event_timestamp", "created_timestamp", "rows_3d"]
    assert out.schema.field("shop").type == pa.int32()
    assert out.schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert out.schema.field("rows_3d").type == pa.int64()
    assert sorted(zip(out.column("country").to_pylist(), out.column("rows_3d").to_pylist())) == [("de", 1), ("se", 2)]


def test_empty_input_and_bad_input():
    out, rows = run([], [SUM_3D], start=day(0), end=day(2))
    assert rows == [] and out.schema.field("x_sum_3d").type == pa.float64()
    with pytest.raises(DataError, match="before end"):
        run([], [SUM_3D], start=day(2), end=day(2))
    with pytest.raises(DataError, match="'missing'"):
        window_aggregate(
            _table([]), join_keys=["key"], event_ts="event_ts", created_ts=None,
            aggregations=[Aggregation(column="missing", function="sum", window="1d")],
            cadence=D, availability_delay=timedelta(0), start=day(0), end=day(1),
        )


def test_event_time_range_reaches_back_one_window_before_the_baseline():
    lo, hi = event_time_range([SUM_3D, ROWS_3D], D, day(2, 5), day(9, 5))
    assert (lo, hi) == (day(2) - 3 * D, day(9))
    assert boundary_indices(day(2), day(9), D) == ((day(2) - EPOCH) // D, (day(9) - EPOCH) // D)
