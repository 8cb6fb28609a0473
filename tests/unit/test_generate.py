"""The synthetic BNPL data set: determinism, exact schemas, and facts that agree with each other
(the ledger, the events, the event streams and the labels), checked against independent pandas
recomputations."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pytest
from pydantic import ValidationError

from workloads.underwriting.features import checkouts, repayments
from workloads.underwriting.generate import (
    DEFAULT_DPD,
    GRACE,
    KNOWN_AFTER_DECISION,
    OUTCOME_HORIZON,
    DataConfig,
    generate_merchants,
    generate_shard,
    shard_count,
)

CONFIG = DataConfig(applications=6_000, merchants=40, shards=3, seed=3)
END = pd.Timestamp(CONFIG.end)
DAY = pd.Timedelta(days=1)

TS = "timestamp[us, tz=UTC]"
EXPECTED_SCHEMAS = {
    "applicants": [("applicant_id", "int64"), ("signup_ts", TS), ("channel", "string")],
    "merchants": [("merchant_id", "int64"), ("merchant_category", "string"), ("onboarded_ts", TS)],
    "applications": [
        ("application_id", "string"), ("applicant_id", "int64"), ("merchant_id", "int64"),
        ("merchant_category", "string"), ("amount", "double"), ("currency", "string"), ("term", "int64"),
        ("installment_period_days", "int64"), ("application_ts", TS),
    ],
    "checkout_events": [
        ("event_id", "string"), ("application_id", "string"), ("applicant_id", "int64"), ("merchant_id", "int64"),
        ("amount", "double"), ("checkout_ts", TS), ("known_ts", TS),
    ],
    "installments": [
        ("application_id", "string"), ("applicant_id", "int64"), ("merchant_id", "int64"),
        ("installment_no", "int64"), ("due_ts", TS), ("amount_due", "double"), ("paid_ts", TS),
        ("days_past_due", "int64"), ("status", "string"),
    ],
    "repayment_events": [
        ("event_id", "string"), ("applicant_id", "int64"), ("merchant_id", "int64"), ("application_id", "string"),
        ("event_type", "string"), ("event_ts", TS), ("known_ts", TS), ("loan_amount", "double"),
        ("balance_delta", "double"), ("is_loan", "int64"), ("is_late", "int64"), ("is_missed", "int64"),
        ("days_past_due", "int64"),
    ],
    "outcomes": [
        ("application_id", "string"), ("applicant_id", "int64"), ("merchant_id", "int64"),
        ("merchant_category", "string"), ("application_ts", TS), ("label_ts", TS), ("default", "int64"),
        ("label_known", "bool"),
    ],
}  # fmt: skip

# Substrings of column names that would mean a protected attribute (or a proxy) leaked in,
# or a hidden driver of the simulation was written out.
FORBIDDEN = (
    "age", "birth", "dob", "sex", "gender", "race", "ethnic", "marital", "married", "nation", "origin",
    "religio", "name", "zip", "postcode", "postal", "address", "citizen", "disab", "pregnan",
    "risk", "score", "latent", "hidden", "tier", "propensity",
)  # fmt: skip


def _all(config: DataConfig) -> dict[str, pa.Table]:
    shards = [generate_shard(config, i) for i in range(shard_count(config))]
    tables = {t: pa.concat_tables([s[t] for s in shards]) for t in shards[0]}
    tables["merchants"] = generate_merchants(config)
    return tables


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    return _all(CONFIG)


@pytest.fixture(scope="module")
def frames(tables) -> dict[str, pd.DataFrame]:
    return {name: t.to_pandas() for name, t in tables.items()}


# ------------------------------------------------------------------------ determinism
def test_same_config_gives_identical_tables(tables):
    again = _all(CONFIG)
    for name, table in tables.items():
        assert table.equals(again[name]), name


def test_other_seed_gives_other_data(tables):
    other = _all(CONFIG.model_copy(update={"seed": 4}))
    for name in ("applicants", "merchants", "applications", "checkout_events", "installments", "repayment_events", "outcomes"):
        assert not tables[name].equals(other[name]), name


def test_number_of_shards_does_not_change_the_data(tables):
    single = _all(CONFIG.model_copy(update={"shards": 1}))
    assert shard_count(CONFIG) == 3
    for name, table in tables.items():
        assert table.equals(single[name]), name


def test_shards_partition_applicants(tables):
    shards = [generate_shard(CONFIG, i) for i in range(shard_count(CONFIG))]
    seen: set[int] = set()
    for shard in shards:
        ids = set(shard["applicants"]["applicant_id"].to_pylist())
        assert ids and not ids & seen
        seen |= ids
        for name in ("applications", "checkout_events", "installments", "repayment_events", "outcomes"):
            assert set(shard[name]["applicant_id"].to_pylist()) <= ids, name
    app_ids = tables["applications"]["application_id"].to_pylist()
    assert len(app_ids) == len(set(app_ids)) == CONFIG.applications
    for stream in ("checkout_events", "repayment_events"):
        ids = tables[stream]["event_id"]
        assert ids.null_count == 0 and len(ids.unique()) == tables[stream].num_rows, stream


def test_shard_out_of_range():
    with pytest.raises(ValueError, match="shard 3 out of range"):
        generate_shard(CONFIG, 3)


# ---------------------------------------------------------------------------- shapes
def test_exact_schemas(tables):
    assert set(tables) == set(EXPECTED_SCHEMAS)
    for name, table in tables.items():
        assert [(f.name, str(f.type)) for f in table.schema] == EXPECTED_SCHEMAS[name], name


def test_no_protected_attributes_or_hidden_drivers(tables):
    for name, table in tables.items():
        for column in table.column_names:
            hits = [word for word in FORBIDDEN if word in column]
            assert not hits, f"{name}.{column} looks like {hits}"


def test_config_validation():
    naive = DataConfig(start=datetime(2023, 1, 1), end="2023-06-01")
    assert naive.start == datetime(2023, 1, 1, tzinfo=timezone.utc)
    assert naive.end == datetime(2023, 6, 1, tzinfo=timezone.utc)
    shifted = DataConfig(start=datetime(2023, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))))
    assert shifted.start == datetime(2023, 1, 1, tzinfo=timezone.utc)
    for bad, field in [
        ({"applications": 0}, "applications"),
        ({"shards": 0}, "shards"),
        ({"currency": "usd"}, "currency"),
        ({"seed": -1}, "seed"),
        ({"colour": "red"}, "colour"),
    ]:
        with pytest.raises(ValidationError) as err:
            DataConfig(**bad)
        assert err.value.errors()[0]["loc"] == (field,), bad
    with pytest.raises(ValidationError, match="end .* must be at least one day after start"):
        DataConfig(start="2024-01-01", end="2023-01-01")


# --------------------------------------------------------------- facts agree with each other
def test_applications_fall_in_the_period_after_signup_and_onboarding(frames):
    apps = frames["applications"]
    assert (apps["application_ts"] >= pd.Timestamp(CONFIG.start)).all()
    assert (apps["application_ts"] < END).all()
    signup = apps["applicant_id"].map(frames["applicants"].set_index("applicant_id")["signup_ts"])
    assert (apps["application_ts"] >= signup).all()
    merchants = frames["merchants"].set_index("merchant_id")
    assert (apps["application_ts"] >= apps["merchant_id"].map(merchants["onboarded_ts"])).all()
    assert (apps["merchant_category"] == apps["merchant_id"].map(merchants["merchant_category"])).all()
    assert (apps["amount"] > 0).all() and (apps["currency"] == "USD").all()
    plans = set(zip(apps["term"], apps["installment_period_days"]))
    assert plans == {(4, 14), (6, 30), (12, 30)}


def test_ledger_matches_the_plan(frames):
    apps = frames["applications"].set_index("application_id")
    inst = frames["installments"]
    per_loan = inst.groupby("application_id").agg(n=("installment_no", "size"), due=("amount_due", "sum"))
    assert (per_loan["n"] == apps.loc[per_loan.index, "term"]).all()
    assert (per_loan["due"] - apps.loc[per_loan.index, "amount"]).abs().max() < 1e-6
    period = inst["application_id"].map(apps["installment_period_days"])
    start = inst["application_id"].map(apps["application_ts"])
    assert (inst["due_ts"] == start + inst["installment_no"] * period * DAY).all()
    # nothing paid after the data's end is known
    assert (inst["paid_ts"].dropna() <= END).all()


def test_status_and_days_past_due_follow_from_the_ledger(frames):
    inst = frames["installments"]
    late_by = inst["paid_ts"] - inst["due_ts"]
    unpaid = inst["paid_ts"].isna()
    expected_dpd = (late_by.where(~unpaid, END - inst["due_ts"]).clip(lower=pd.Timedelta(0)) // DAY).astype("int64")
    assert (inst["days_past_due"] == expected_dpd).all()
    status = pd.Series("on_time", index=inst.index)
    status[~unpaid & (late_by > pd.Timedelta(0))] = "late"
    status[unpaid] = "pending"
    status[(~unpaid & (late_by >= GRACE)) | (unpaid & (inst["due_ts"] + GRACE <= END))] = "missed"
    assert (inst["status"] == status).all()
    assert set(status) == {"on_time", "late", "missed", "pending"}


def test_default_labels_recomputed_from_the_ledger(frames):
    inst = frames["installments"].merge(frames["applications"][["application_id", "application_ts"]])
    horizon = pd.Timedelta(OUTCOME_HORIZON)
    dpd = pd.Timedelta(days=DEFAULT_DPD)
    seen_by = (inst["application_ts"] + horizon).where(inst["application_ts"] + horizon <= END, END)
    reached = inst["paid_ts"].isna() | (inst["paid_ts"] - inst["due_ts"] >= dpd)
    inst["bad"] = reached & (inst["due_ts"] + dpd <= seen_by)
    expected = inst.groupby("application_id")["bad"].any().astype("int64")
    out = frames["outcomes"].set_index("application_id")
    assert (out["default"] == expected.reindex(out.index)).all()
    assert (out["label_ts"] == out["application_ts"] + horizon).all()
    assert (out["label_known"] == (out["label_ts"] <= END)).all()
    known = out[out["label_known"]]
    assert 0.03 < known["default"].mean() < 0.15


def test_events_never_known_after_end_nor_before_they_happen(frames):
    ev = frames["repayment_events"]
    assert (ev["known_ts"] <= END).all()
    assert (ev["known_ts"] >= ev["event_ts"]).all()
    assert set(ev["event_type"]) == {"origination", "payment", "missed", "delinquency"}
    checkout = frames["checkout_events"]
    assert (checkout["known_ts"] <= END).all()
    assert (checkout["known_ts"] >= checkout["checkout_ts"]).all()


def test_stream_events_are_known_within_the_allowed_lateness(frames):
    """Every event reaches its stream in time to count: none would be dropped as late."""
    for source, table in [(checkouts, "checkout_events"), (repayments, "repayment_events")]:
        ev = frames[table]
        lag = ev["known_ts"] - ev[source.timestamp_field]
        assert (lag >= pd.Timedelta(0)).all() and (lag <= source.allowed_lateness).all(), source.name
        assert ev[source.event_id_field].is_unique, source.name
        names = {f.name for f in source.schema_} | {source.event_id_field, source.timestamp_field, "known_ts"}
        assert names <= set(ev.columns), source.name


def test_checkout_events_are_the_applications_known_after_their_decision(frames):
    apps = frames["applications"].set_index("application_id")
    checkout = frames["checkout_events"].set_index("application_id").loc[apps.index]
    assert len(frames["checkout_events"]) == len(apps)
    assert (checkout["event_id"] == checkout.index + "-checkout").all()
    assert (checkout[["applicant_id", "merchant_id", "amount"]] == apps[["applicant_id", "merchant_id", "amount"]]).all().all()
    assert (checkout["checkout_ts"] == apps["application_ts"]).all()
    assert (checkout["known_ts"] == apps["application_ts"] + KNOWN_AFTER_DECISION).all()


def test_events_agree_with_the_ledger(frames):
    ev = frames["repayment_events"]
    inst = frames["installments"]
    apps = frames["applications"]

    orig = ev[ev["event_type"] == "origination"].set_index("application_id").loc[apps["application_id"]]
    assert (orig["event_ts"].values == apps["application_ts"].values).all()
    # booked once decided: a decision (or a training row) at the checkout's time does not see it
    assert (orig["known_ts"].values == (apps["application_ts"] + KNOWN_AFTER_DECISION).values).all()
    assert (orig["loan_amount"].values == apps["amount"].values).all()
    assert (orig["is_loan"] == 1).all() and ev.loc[ev["event_type"] != "origination", "loan_amount"].isna().all()

    paid = inst.dropna(subset=["paid_ts"])
    pay = ev[ev["event_type"] == "payment"]
    assert len(pay) == len(paid)
    assert (pay["event_ts"] == pay["known_ts"]).all()
    joined = pay.merge(paid, left_on=["application_id", "event_ts"], right_on=["application_id", "paid_ts"])
    assert len(joined) == len(paid)
    assert (joined["balance_delta"] == -joined["amount_due"]).all()
    assert (joined["is_late"] == (joined["paid_ts"] > joined["due_ts"]).astype("int64")).all()

    missed = ev[ev["event_type"] == "missed"]
    ledger_missed = inst[inst["status"] == "missed"]
    assert len(missed) == len(ledger_missed) == missed["is_missed"].sum()
    # declared missed when the grace period ends unpaid, and known then
    assert (missed["known_ts"] == missed["event_ts"]).all()
    assert (missed["days_past_due"] == GRACE.days).all()
    assert set(zip(missed["application_id"], missed["event_ts"])) == set(
        zip(ledger_missed["application_id"], ledger_missed["due_ts"] + GRACE)
    )

    for days in (30, 60, 90):
        rows = ev[(ev["event_type"] == "delinquency") & (ev["days_past_due"] == days)]
        late = inst[
            (inst["due_ts"] + pd.Timedelta(days=days) <= END)
            & (inst["paid_ts"].isna() | (inst["paid_ts"] - inst["due_ts"] >= pd.Timedelta(days=days)))
        ]
        assert len(rows) == len(late), days
        assert (rows["known_ts"] == rows["event_ts"]).all()
        assert set(zip(rows["application_id"], rows["known_ts"])) == set(
            zip(late["application_id"], late["due_ts"] + pd.Timedelta(days=days))
        )

    # The balance of each loan: the principal less what was paid by the end.
    balance = ev.groupby("application_id")["balance_delta"].sum()
    owed = inst[inst["paid_ts"].isna()].groupby("application_id")["amount_due"].sum()
    assert (balance - owed.reindex(balance.index, fill_value=0.0)).abs().max() < 1e-6


def test_repayment_history_predicts_default(frames):
    """The point of the data set: what was known before an application says something."""
    ev = frames["repayment_events"]
    bad = ev.loc[ev["event_type"] == "missed", ["applicant_id", "known_ts"]].sort_values("known_ts")
    out = frames["outcomes"]
    out = out[out["label_known"]].sort_values("application_ts")
    prior = pd.merge_asof(
        out, bad.assign(prior_miss=1), left_on="application_ts", right_on="known_ts", by="applicant_id",
        allow_exact_matches=False,
    )  # fmt: skip
    rates = prior.groupby(prior["prior_miss"].fillna(0))["default"].mean()
    assert rates[1] > 2 * rates[0]


def _seen_at_checkout(apps: pd.DataFrame, events: pd.DataFrame, time: str, window: pd.Timedelta) -> pd.Series:
    """Per application: the applicant's events a real-time feature counts at the checkout:
    event time in (t - window, t] and known by t (a brute-force join on the applicant)."""
    events = events[["applicant_id", time, "known_ts"]]
    pairs = apps[["application_id", "applicant_id", "application_ts"]].merge(events, on="applicant_id")
    t = pairs["application_ts"]
    inside = (pairs[time] > t - window) & (pairs[time] <= t) & (pairs["known_ts"] <= t)
    counts = pairs[inside].groupby("application_id").size()
    return counts.reindex(apps["application_id"], fill_value=0).set_axis(apps.index)


def test_loan_stacking_and_a_fresh_missed_installment_raise_default(frames):
    """The hidden model gives the real-time signals real weight: checkouts in the 24 hours
    before, and an installment missed in the 7 days before, as the features see them."""
    out = frames["outcomes"]
    apps = out[out["label_known"]].reset_index(drop=True)
    ev = frames["repayment_events"]
    stacked = _seen_at_checkout(apps, frames["checkout_events"], "checkout_ts", pd.Timedelta(hours=24))
    fresh = _seen_at_checkout(apps, ev[ev["event_type"] == "missed"], "event_ts", pd.Timedelta(days=7))
    recent = _seen_at_checkout(apps, ev[ev["event_type"] == "missed"], "event_ts", pd.Timedelta(days=30))
    # an application's own checkout and origination are known a second after it: never seen
    assert stacked.max() < 10 and 0.03 < (stacked > 0).mean() < 0.25
    rate = apps.groupby(stacked > 0)["default"].mean()
    assert rate[True] > 1.4 * rate[False], rate
    assert 0.01 < (fresh > 0).mean() < 0.15
    rate = apps.groupby(fresh > 0)["default"].mean()
    assert rate[True] > 3 * rate[False], rate
    # fresher than the 30-day history says: among applicants with a miss in the last 30 days,
    # one in the last 7 days is worse
    month = apps[recent > 0]
    rate = month.groupby(fresh[recent > 0] > 0)["default"].mean()
    assert rate[True] > 1.3 * rate[False], rate
