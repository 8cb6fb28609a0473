"""The underwriting workload's streams without Ray: the generated history as the offline log
holds it, the real-time views' values on it against a brute-force count, the request-time
features from ``last_k`` lists (online lists and training-set arrays alike), and the
counterfactual the live event chooses its applicant with."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlplatform.features.event_log import ARRIVAL, event_schema
from mlplatform.features.realtime_join import realtime_values
from mlplatform.timestamps import CREATED_TIMESTAMP
from workloads.underwriting.event_history import STREAM_TABLES, history_table
from workloads.underwriting.features import (
    DEFINITIONS,
    applicant_checkouts,
    checkouts,
    live_activity_features,
    recent_repayments,
    repayments,
    underwriting_v1,
)
from workloads.underwriting.generate import GRACE, DataConfig, generate_shard
from workloads.underwriting.live_event import DAYS, INPUTS, MISSED, with_missed_installment

CONFIG = DataConfig(applications=3_000, merchants=30, seed=5, shards=1)


@pytest.fixture(scope="module")
def shard() -> dict[str, pa.Table]:
    return generate_shard(CONFIG, 0)


@pytest.fixture(scope="module")
def logs(shard) -> dict[str, pa.Table]:
    return {s.name: history_table(s, shard[STREAM_TABLES[s.name]], 1) for s in (checkouts, repayments)}


def test_history_is_logged_with_its_known_times_and_positions(shard, logs):
    for source in (checkouts, repayments):
        table, log = shard[STREAM_TABLES[source.name]], logs[source.name]
        assert log.schema == event_schema(source)
        assert log.num_rows == table.num_rows
        assert log.column(CREATED_TIMESTAMP).equals(table.column("known_ts"))
        assert log.column(source.event_id_field).equals(table.column(source.event_id_field))
        assert log.column(ARRIVAL).to_pylist() == list(range(1, table.num_rows + 1))
    # a later piece of a table continues the positions
    assert history_table(checkouts, shard["checkout_events"].slice(10, 5), 11).column(ARRIVAL).to_pylist() == list(range(11, 16))


def _brute(apps: pd.DataFrame, events: pd.DataFrame, time: str, window: timedelta) -> list[pd.DataFrame]:
    """Per application, the applicant's events real and known at its time, in window, in
    the order ``last_k`` uses (event time, acceptance, position)."""
    out = []
    for app in apps.itertuples():
        t = app.application_ts
        mine = events[(events["applicant_id"] == app.applicant_id) & (events[CREATED_TIMESTAMP] <= t)]
        mine = mine[(mine[time] > t - window) & (mine[time] <= t)]
        out.append(mine.sort_values([time, CREATED_TIMESTAMP, ARRIVAL]))
    return out


def test_realtime_values_on_the_history_equal_a_brute_force_count(shard, logs):
    apps = shard["applications"].to_pandas()
    checkout_log, repayment_log = logs["checkouts"].to_pandas(), logs["repayments"].to_pandas()
    # the rows that have something to count, and some that have not
    busy = set(checkout_log["applicant_id"].value_counts().loc[lambda c: c > 3].index)
    missed = set(repayment_log.loc[repayment_log["is_missed"] == 1, "applicant_id"])
    rows = pd.concat([
        apps[apps["applicant_id"].isin(busy)].head(150), apps[apps["applicant_id"].isin(missed)].head(150), apps.head(50),
    ]).drop_duplicates("application_id").reset_index(drop=True)  # fmt: skip
    at = np.array([t.value // 1000 for t in rows["application_ts"]], dtype=np.int64)  # UTC µs
    keys = [(k,) for k in rows["applicant_id"]]

    names = [a.feature_name for a in applicant_checkouts.aggregations]
    got = realtime_values(applicant_checkouts, names, logs["checkouts"], keys, at)
    day = _brute(rows, checkout_log, "checkout_ts", timedelta(hours=24))
    hour = _brute(rows, checkout_log, "checkout_ts", timedelta(hours=1))
    month = _brute(rows, checkout_log, "checkout_ts", timedelta(days=30))
    assert got["checkouts_24h"] == [len(e) for e in day]
    assert got["checkouts_1h"] == [len(e) for e in hour]
    assert np.allclose(got["checkout_amount_24h"], [e["amount"].sum() for e in day])
    assert got["recent_checkout_amounts"] == [e["amount"].tolist()[-5:] for e in month]
    assert sum(v > 0 for v in got["checkouts_24h"]) > 10  # stacking happens in these rows

    names = [a.feature_name for a in recent_repayments.aggregations]
    got = realtime_values(recent_repayments, names, logs["repayments"], keys, at)
    week = _brute(rows, repayment_log, "event_ts", timedelta(days=7))
    month = _brute(rows, repayment_log, "event_ts", timedelta(days=30))
    assert got["missed_installments_7d"] == [float(e["is_missed"].sum()) for e in week]
    assert got["late_payments_7d"] == [float(e["is_late"].sum()) for e in week]
    assert got[DAYS] == [e["days_past_due"].tolist()[-3:] for e in month]
    assert sum(v > 0 for v in got["missed_installments_7d"]) > 10
    # an application never sees its own checkout or origination (known a second later)
    assert all(e["application_id"].ne(a).all() for e, a in zip(day, rows["application_id"], strict=True))


def test_live_activity_features_from_lists_and_arrays_alike():
    rows = {
        "amount": [300.0, 300.0, None, 80.0],
        "term": [4, 4, 4, 6],
        "recent_checkout_amounts": [[100.0, 200.0], np.array([100.0, 200.0]), [50.0], []],
        "recent_days_past_due": [[0, 5], np.array([0, 5]), None, np.array([], dtype=np.int64)],
    }
    rows.update({name: [0] * 4 for name in INPUTS if name not in rows})
    out = live_activity_features.transform_rows(rows, 4)
    assert out["amount_to_recent_checkouts"] == [2.0, 2.0, None, None]
    assert out["worst_recent_days_past_due"] == [5.0, 5.0, None, None]


def test_a_missed_installment_counts_as_the_views_count_it():
    row = {name: 0 for name in INPUTS}
    row.update(amount=200.0, term=4, recent_checkout_amounts=[100.0], recent_days_past_due=[0, 3, 1], **{MISSED: 0.0})
    after = with_missed_installment(row)
    assert after[MISSED] == 1.0 and row[MISSED] == 0.0
    assert after[DAYS] == [3, 1, GRACE.days]  # the newest of the last 3
    assert after["worst_recent_days_past_due"] == float(GRACE.days)
    assert after["amount_to_recent_checkouts"] == 2.0
    empty = with_missed_installment({**row, DAYS: [], MISSED: None})
    assert empty[MISSED] == 1 and empty[DAYS] == [GRACE.days]


def test_every_model_feature_has_a_reason_and_is_a_number():
    views = {d.name: d for d in DEFINITIONS if hasattr(d, "features") and not isinstance(d, type(underwriting_v1))}
    for ref in underwriting_v1.features:
        view, name = ref.split(":")
        field = next(f for f in views[view].features if f.name == name)
        assert field.reason, ref
        assert field.dtype in ("int64", "float64"), ref  # a list (last_k) reaches the model through an on-demand view
    realtime = {r.split(":")[0] for r in underwriting_v1.features} & {applicant_checkouts.name, recent_repayments.name}
    assert realtime == {applicant_checkouts.name, recent_repayments.name}
