"""Point-in-time behaviour sequences, without Ray: a hand-made history, then a brute-force oracle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import torch

from workloads.fraud.sequences import (
    APPLICATION,
    CATEGORIES,
    DELINQUENCY,
    EVENT_TYPES,
    LATE_PAYMENT,
    MISSED,
    PAYMENT,
    output_schema,
    sequences_from_tables,
    to_tensors,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")


def day(d: float) -> datetime:
    return T0 + timedelta(days=d)


def tables(apps: list[tuple], events: list[tuple]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """apps: (application_id, applicant_id, day, category, amount, default, label_day);
    events: (applicant_id, event_type, event_day, known_day, balance_delta, is_late, dpd)."""
    applications = pa.table({
        "application_id": [a[0] for a in apps], "applicant_id": pa.array([a[1] for a in apps], pa.int64()),
        "merchant_category": [a[3] for a in apps], "amount": pa.array([a[4] for a in apps], pa.float64()),
        "application_ts": pa.array([day(a[2]) for a in apps], TS),
    })  # fmt: skip
    outcomes = pa.table({
        "application_id": [a[0] for a in apps], "applicant_id": pa.array([a[1] for a in apps], pa.int64()),
        "default": pa.array([a[5] for a in apps], pa.int64()), "label_ts": pa.array([day(a[6]) for a in apps], TS),
        "application_ts": pa.array([day(a[2]) for a in apps], TS),
    })  # fmt: skip
    # every application also has its origination row, which must not be counted twice
    origination = [(a[1], "origination", a[2], a[2], a[4], 0, 0) for a in apps]
    rows = events + origination
    repayment = pa.table({
        "applicant_id": pa.array([e[0] for e in rows], pa.int64()), "event_type": [e[1] for e in rows],
        "event_ts": pa.array([day(e[2]) for e in rows], TS), "known_ts": pa.array([day(e[3]) for e in rows], TS),
        "balance_delta": pa.array([e[4] for e in rows], pa.float64()),
        "is_late": pa.array([e[5] for e in rows], pa.int64()), "days_past_due": pa.array([e[6] for e in rows], pa.int64()),
    })  # fmt: skip
    return applications, outcomes, repayment


HISTORY = tables(
    apps=[
        ("A1", 1, 0, "fashion", 100.0, 0, 120),
        ("A2", 1, 30, "electronics", 400.0, 1, 150),
        ("A3", 1, 40, "travel", 650.0, 0, 160),
        ("A4", 1, 200, "fashion", 90.0, 1, 320),  # label after the cutoff: no row
        ("B1", 2, 5, "gaming", 80.0, 1, 125),
    ],
    events=[
        (1, "payment", 14, 14, -25.0, 0, 0),
        (1, "missed", 28, 33, 0.0, 0, 5),  # happened before A2, known only after it
        (1, "payment", 39, 40, -25.0, 1, 11),  # known at exactly A3's time: not before it
        (1, "delinquency", 58, 58, 0.0, 0, 30),
        (2, "delinquency", 1, 1, 0.0, 0, 30),  # applicant 2, before B1 (a made-up history)
    ],
)
CUTOFF = day(300)


def rows_by_id(max_events: int) -> dict[str, dict]:
    table = sequences_from_tables(*HISTORY, max_events=max_events, cutoff=CUTOFF)
    assert table.schema == output_schema(max_events)
    return {r["application_id"]: r for r in table.to_pylist()}


def test_only_events_known_strictly_before_the_application_in_time_order():
    rows = rows_by_id(8)
    assert set(rows) == {"A1", "A2", "A3", "B1"}  # A4's label is not known by the cutoff

    def real(row: dict, column: str) -> list:
        return [v for v, m in zip(row[column], row["mask"]) if m]

    assert real(rows["A1"], "event_type") == []  # the first application has no history
    assert real(rows["A2"], "event_type") == [APPLICATION, PAYMENT]  # the missed one was known later
    assert real(rows["A3"], "event_type") == [APPLICATION, PAYMENT, APPLICATION, MISSED]
    assert real(rows["A3"], "days_before") == pytest.approx([40, 26, 10, 7])
    assert real(rows["A3"], "days_past_due") == [0, 0, 0, 5]
    assert real(rows["A3"], "category") == [CATEGORIES.index("fashion"), 0, CATEGORIES.index("electronics"), 0]
    assert real(rows["A3"], "log_amount") == pytest.approx([np.log1p(100), np.log1p(25), np.log1p(400), 0.0])
    assert real(rows["B1"], "event_type") == [DELINQUENCY]  # never another applicant's events
    # right-aligned: padding first, the most recent event last
    assert rows["A3"]["mask"] == [False] * 4 + [True] * 4
    assert rows["A3"]["event_type"][:4] == [0, 0, 0, 0]
    assert rows["A3"]["days_before"][:4] == [0.0] * 4
    assert rows["A2"]["default"] == 1 and rows["A3"]["default"] == 0
    assert rows["A3"]["app_category"] == CATEGORIES.index("travel")
    assert rows["A3"]["app_log_amount"] == pytest.approx(np.log1p(650))


def test_truncated_to_the_most_recent_k():
    rows = rows_by_id(3)
    assert rows["A3"]["event_type"] == [PAYMENT, APPLICATION, MISSED]
    assert rows["A3"]["mask"] == [True, True, True]
    assert rows["A2"]["event_type"] == [0, APPLICATION, PAYMENT]


def test_late_payments_and_splits():
    apps = [("X1", 9, 0, "home", 50.0, 0, 100), ("X2", 9, 100, "home", 50.0, 0, 200)]
    events = [(9, "payment", 20, 21, -10.0, 1, 1)]
    table = sequences_from_tables(*tables(apps, events), max_events=4, cutoff=day(300))
    rows = {r["application_id"]: r for r in table.to_pylist()}
    assert rows["X2"]["event_type"] == [0, 0, APPLICATION, LATE_PAYMENT]
    # out of time: the first application opens train, the last one is in test
    assert rows["X1"]["split"] == "train" and rows["X2"]["split"] == "test"


def test_to_tensors_layout():
    table = sequences_from_tables(*HISTORY, max_events=5, cutoff=CUTOFF)
    t = to_tensors(table)
    b = table.num_rows
    for name in ("event_type", "category", "log_amount", "days_before", "days_past_due", "mask"):
        assert t[name].shape == (b, 5), name
    assert t["event_type"].dtype == torch.int64 and t["mask"].dtype == torch.bool
    assert t["days_before"].dtype == torch.float32
    assert t["label"].shape == (b,) and t["app_category"].shape == (b,)
    assert (t["event_type"][~t["mask"]] == 0).all()


# ------------------------------------------------------------------------------- oracle
def oracle(apps: list[tuple], events: list[tuple], k: int, cutoff_day: float) -> dict[str, list[tuple]]:
    """For each labelled application: its last k (type, days_before) events known before it."""
    type_of = {"payment": PAYMENT, "missed": MISSED, "delinquency": DELINQUENCY}
    out = {}
    for app_id, who, t, _cat, _amount, _default, label_day in apps:
        if label_day > cutoff_day:
            continue
        history = [
            (a[2], a[2], APPLICATION, float(np.float32(np.log1p(a[4])))) for a in apps if a[1] == who and a[2] < t
        ]
        for e in events:
            if e[0] == who and e[3] < t:
                kind = LATE_PAYMENT if e[1] == "payment" and e[5] else type_of[e[1]]
                amount = float(np.float32(np.log1p(-e[4]))) if e[1] == "payment" else 0.0
                history.append((e[3], e[2], kind, amount))
        history.sort()  # known, event time, type, amount
        out[app_id] = [(kind, t - known) for known, _, kind, _ in history[-k:]]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_matches_a_brute_force_oracle(seed):
    rng = np.random.default_rng(seed)
    apps, events = [], []
    for who in range(1, 5):
        for i in range(rng.integers(1, 6)):
            t = int(rng.integers(0, 60))  # whole days: many ties between events and applications
            apps.append((f"P{who}-{i}", who, t, "fashion", float(rng.integers(10, 500)), int(rng.integers(0, 2)),
                         t + int(rng.integers(0, 120))))  # fmt: skip
        for _ in range(rng.integers(0, 12)):
            happened = int(rng.integers(0, 60))
            kind = ["payment", "missed", "delinquency"][rng.integers(0, 3)]
            delta = -float(rng.integers(1, 100)) if kind == "payment" else 0.0
            events.append((who, kind, happened, happened + int(rng.integers(0, 6)), delta, int(rng.integers(0, 2)), 0))
    k = int(rng.integers(1, 7))
    table = sequences_from_tables(*tables(apps, events), max_events=k, cutoff=day(100))
    got = {
        r["application_id"]: [(e, d) for e, d, m in zip(r["event_type"], r["days_before"], r["mask"]) if m]
        for r in table.to_pylist()
    }
    want = oracle(apps, events, k, 100)
    assert set(got) == set(want)
    for app_id, expected in want.items():
        assert [e for e, _ in got[app_id]] == [e for e, _ in expected], app_id
        assert [d for _, d in got[app_id]] == pytest.approx([d for _, d in expected]), app_id
        assert all(d > 0 for _, d in got[app_id]), app_id  # never an event known at/after the application


def test_vocabularies_are_stable():
    # ids are stored in the data: appending is fine, reordering silently corrupts old datasets
    assert EVENT_TYPES[:7] == (
        "<pad>", "application", "payment", "late_payment", "missed", "delinquency", "current_application"
    )
    assert CATEGORIES[:2] == ("<none>", "<other>")
