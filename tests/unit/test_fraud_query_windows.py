"""Serving's NumPy cut of the fraud windows (``query_windows``) against the Arrow kernel
training runs (``windows.query_sequences`` and ``sequences_from_tables``): generated
histories, bit for bit, array for array."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplatform.errors import DataError
from workloads.fraud.online import input_arrays
from workloads.fraud.query_windows import History, cut_windows
from workloads.fraud.windows import CATEGORIES, LATE_PAYMENT, query_sequences, sequences_from_tables

BASE_US = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp()) * 1_000_000
HOUR_US = 3_600_000_000
TS = pa.timestamp("us", tz="UTC")

# Few distinct times (hours, sometimes a microsecond later) so that ties are everywhere:
# events known at a query's time, events known together, applications at one time.
times = st.builds(lambda h, us: BASE_US + h * HOUR_US + us, st.integers(0, 48), st.sampled_from([0, 0, 1]))
categories = st.sampled_from([CATEGORIES[2], CATEGORIES[3], CATEGORIES[-1], "<none>", "<other>", "not-listed", None])
amounts = st.one_of(
    st.none(), st.sampled_from([0.0, -0.0, -5.0, 1.0, 129.0]), st.floats(-1e3, 1e9, allow_nan=False, allow_infinity=False)
)
applicants = st.sampled_from([1, 2, 3, -7, 2**40])
application = st.fixed_dictionaries(
    {"applicant_id": applicants, "merchant_category": categories, "amount": amounts, "application_ts": times}
)
repayment = st.fixed_dictionaries({
    "applicant_id": applicants,
    "event_type": st.sampled_from(["payment", "payment", "missed", "delinquency", "origination"]),
    "event_ts": times, "known_ts": times,  # known before it happened, at it, or long after (late)
    "balance_delta": st.one_of(st.none(), st.sampled_from([0.0, -0.0, -12.5, 3.0]), st.floats(-1e6, 1e6)),
    "is_late": st.sampled_from([0, 1, None]),
    "days_past_due": st.one_of(st.none(), st.integers(-5, 2**31)),
})  # fmt: skip
query = st.fixed_dictionaries(
    {"applicant_id": st.one_of(applicants, st.just(99)), "merchant_category": categories,
     "amount": st.floats(-10, 1e6, allow_nan=False), "application_ts": times}
)  # fmt: skip

APP_SCHEMA = pa.schema([
    ("application_id", pa.string()), ("applicant_id", pa.int64()), ("merchant_category", pa.string()),
    ("amount", pa.float64()), ("application_ts", TS),
])  # fmt: skip
REP_SCHEMA = pa.schema([
    ("applicant_id", pa.int64()), ("event_type", pa.string()), ("event_ts", TS), ("known_ts", TS),
    ("balance_delta", pa.float64()), ("is_late", pa.int64()), ("days_past_due", pa.int64()),
])  # fmt: skip


def _tables(apps: list[dict], reps: list[dict]) -> tuple[pa.Table, pa.Table]:
    apps = [{"application_id": f"A{i}", **a} for i, a in enumerate(apps)]
    return pa.Table.from_pylist(_as_times(apps), schema=APP_SCHEMA), pa.Table.from_pylist(_as_times(reps), schema=REP_SCHEMA)


def _as_times(rows: list[dict]) -> list[dict]:
    stamp = lambda us: datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)
    return [{k: stamp(v) if k.endswith("_ts") else v for k, v in r.items()} for r in rows]


def _histories(apps: list[dict], reps: list[dict]) -> dict[int, History]:
    """Each applicant's History, from the rows as plain Python values (None for null)."""
    by: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for a in apps:
        by[a["applicant_id"]][0].append(a)
    for r in reps:
        by[r["applicant_id"]][1].append(r)
    columns = lambda rows, names: {n: [r[n] for r in rows] for n in names}
    app_cols = ("merchant_category", "amount", "application_ts")
    rep_cols = ("event_type", "event_ts", "known_ts", "balance_delta", "is_late", "days_past_due")
    return {who: History.of(columns(a, app_cols), columns(r, rep_cols)) for who, (a, r) in by.items()}


def _fast(apps: list[dict], reps: list[dict], queries: list[dict], k: int) -> dict[str, np.ndarray]:
    histories = _histories(apps, reps)
    return cut_windows(
        [histories.get(q["applicant_id"], History.empty()) for q in queries],
        np.array([q["application_ts"] for q in queries], np.int64),
        [q["merchant_category"] for q in queries],
        [q["amount"] for q in queries],
        max_events=k,
    )


def _assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        # bytes, not values: NaN equals NaN and -0.0 differs from 0.0
        assert got[name].tobytes() == array.tobytes(), (name, got[name], array)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    apps=st.lists(application, max_size=14),
    reps=st.lists(repayment, max_size=30),
    queries=st.lists(query, min_size=1, max_size=6),
    k=st.integers(1, 12),
)
def test_equals_query_sequences_bit_for_bit(apps, reps, queries, k):
    """Any histories and queries: no events, ties, events known after the query or late,
    more events than K, nulls, unknown applicants, several queries of one applicant."""
    history_apps, history_reps = _tables(apps, reps)
    query_table = pa.Table.from_pylist(_as_times(queries), schema=APP_SCHEMA.remove(0))
    want = input_arrays(query_sequences(history_apps, history_reps, query_table, max_events=k))
    _assert_identical(_fast(apps, reps, queries, k), want)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(apps=st.lists(application, min_size=1, max_size=14), reps=st.lists(repayment, max_size=30), k=st.integers(1, 12))
def test_equals_the_training_rows(apps, reps, k):
    """Every application queried at its own time gets its training sequence row."""
    history_apps, history_reps = _tables(apps, reps)
    outcomes = history_apps.append_column("default", pa.array([0] * len(apps), pa.int64())).append_column(
        "label_ts", history_apps.column("application_ts")
    )
    training = sequences_from_tables(history_apps, outcomes, history_reps, max_events=k, cutoff=datetime(2030, 1, 1, tzinfo=UTC))
    order = [int(a_id[1:]) for a_id in training.column("application_id").to_pylist()]  # "A<i>": apps[i]
    assert sorted(order) == list(range(len(apps)))
    _assert_identical(_fast(apps, reps, [apps[i] for i in order], k), input_arrays(training))


def test_a_worked_example():
    """Two applicants; K = 3: truncation, a tie with the query time, a late payment, padding."""
    h = HOUR_US
    apps = [
        {"applicant_id": 1, "merchant_category": CATEGORIES[2], "amount": 100.0, "application_ts": BASE_US},
        {"applicant_id": 1, "merchant_category": None, "amount": None, "application_ts": BASE_US + 5 * h},
    ]
    reps = [
        {"applicant_id": 1, "event_type": "payment", "event_ts": BASE_US + h, "known_ts": BASE_US + 2 * h,
         "balance_delta": -25.0, "is_late": 1, "days_past_due": 3},
        {"applicant_id": 1, "event_type": "missed", "event_ts": BASE_US + 3 * h, "known_ts": BASE_US + 10 * h,
         "balance_delta": None, "is_late": None, "days_past_due": None},  # known at the second query's time
        {"applicant_id": 1, "event_type": "origination", "event_ts": BASE_US, "known_ts": BASE_US,
         "balance_delta": 100.0, "is_late": 0, "days_past_due": 0},  # the application itself: dropped
    ]  # fmt: skip
    queries = [
        {"applicant_id": 1, "merchant_category": "not-listed", "amount": 50.0, "application_ts": BASE_US + 10 * h},
        {"applicant_id": 2, "merchant_category": CATEGORIES[3], "amount": 0.0, "application_ts": BASE_US + 10 * h},
    ]
    got = _fast(apps, reps, queries, 3)
    assert got["mask"].tolist() == [[True, True, True], [False, False, False]]
    assert got["event_type"][0].tolist() == [1, LATE_PAYMENT, 1]  # the missed payment is not known before t
    assert got["days_before"][0].tolist() == [np.float32(hours / 24) for hours in (10, 8, 5)]
    assert np.isnan(got["log_amount"][0, 2]) and got["log_amount"][0, 1] == np.float32(np.log1p(25.0))
    assert got["days_past_due"][0].tolist() == [0.0, 3.0, 0.0] and got["category"][0].tolist() == [2, 0, 1]
    assert got["app_category"].tolist() == [1, 3] and not got["event_type"][1].any()


def test_an_unknown_event_type_is_refused_as_by_the_kernel():
    events: dict[str, Any] = {"event_type": ["payment", "chargeback"], "event_ts": [0, 0], "known_ts": [0, 0],
                              "balance_delta": [0.0, 0.0], "is_late": [0, 0], "days_past_due": [0, 0]}  # fmt: skip
    with pytest.raises(DataError, match=r"event_type\(s\) \['chargeback'\]"):
        History.of({"merchant_category": [], "amount": [], "application_ts": []}, events)


def test_no_queries():
    got = cut_windows([], np.zeros(0, np.int64), [], [], max_events=4)
    assert got["event_type"].shape == (0, 4) and got["app_log_amount"].shape == (0,)
