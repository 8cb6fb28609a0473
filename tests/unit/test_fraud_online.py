"""The fraud model's input served from the online store, without Ray: generated raw tables go
through the workload's own steps (apply, event logs, online event state in a SQLite store),
then ``model_inputs`` at each labelled application's time must equal that application's
training sequence row exactly, array for array."""

from __future__ import annotations

import logging
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mlplatform.errors import DataError
from mlplatform.jobs.steps import StepRunner
from mlplatform.platform import Platform
from workloads.fraud.features import applicant_behaviour
from workloads.fraud.online import input_arrays, model_inputs, online_steps
from workloads.fraud.sequences import (
    CATEGORIES,
    DELINQUENCY,
    LATE_PAYMENT,
    MISSED,
    PAYMENT,
    sequences_from_tables,
    to_tensors,
)
from workloads.fraud.windows import query_sequences
from workloads.underwriting.generate import (
    DataConfig,
    generate_merchants,
    generate_shard,
)

CONFIG = DataConfig(applications=1_500, merchants=20, seed=11, shards=1)
K = 8
# The workload defaults to raw/fraud; raw/underwriting (the same generator's schema) must work too.
PREFIX = "raw/underwriting"
SECOND = timedelta(seconds=1)


def _with_ties(tables: dict[str, pa.Table]) -> tuple[pa.Table, dict[str, str]]:
    """The repayment events plus three made-up ones for one applicant with several labelled
    applications: a payment known at exactly one application's time (a tie with the
    application: not in its history), and a missed installment and a delinquency known at the
    same time as an earlier payment (ties among history events: ordered by event time, type)."""
    apps = tables["applications"].sort_by([("applicant_id", "ascending"), ("application_ts", "ascending")])
    events = tables["repayment_events"]
    counts = pc.value_counts(apps.column("applicant_id"))
    busy = next(int(c["values"].as_py()) for c in counts if c["counts"].as_py() >= 4)
    mine = apps.filter(pc.equal(apps.column("applicant_id"), busy))
    target = mine.slice(2, 1).to_pylist()[0]  # its third application
    payments = events.filter(
        pc.and_(
            pc.and_(pc.equal(events.column("applicant_id"), busy), pc.equal(events.column("event_type"), "payment")),
            pc.less(events.column("known_ts"), pa.scalar(target["application_ts"], events.schema.field("known_ts").type)),
        )
    ).to_pylist()
    earlier = payments[-1]
    base = {k: earlier[k] for k in ("applicant_id", "merchant_id", "application_id")}
    made_up = [
        {**base, "event_id": "tie-at-application", "event_type": "payment", "event_ts": target["application_ts"],
         "known_ts": target["application_ts"], "balance_delta": -12.5, "is_late": 0, "days_past_due": 0},
        {**base, "event_id": "tie-missed", "event_type": "missed", "event_ts": earlier["known_ts"] - 3 * SECOND,
         "known_ts": earlier["known_ts"], "balance_delta": 0.0, "is_late": 0, "days_past_due": 5},
        {**base, "event_id": "tie-delinquency", "event_type": "delinquency", "event_ts": earlier["event_ts"],
         "known_ts": earlier["known_ts"], "balance_delta": 0.0, "is_late": 0, "days_past_due": 30},
    ]  # fmt: skip
    defaults = {"loan_amount": None, "is_loan": 0, "is_missed": 0}
    extra = pa.Table.from_pylist([{**defaults, **e} for e in made_up], schema=events.schema)
    return pa.concat_tables([events, extra]), {"tie": target["application_id"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tables = generate_shard(CONFIG, 0)
    repayment, marks = _with_ties(tables)
    raw = {**tables, "repayment_events": repayment, "merchants": generate_merchants(CONFIG)}
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("fraud") / "root")}})
    for name, table in raw.items():
        platform.datasets.publish(f"{PREFIX}/{name}", table)
    results = StepRunner(platform.storage).run_all(online_steps(platform, prefix=PREFIX))
    sequences = sequences_from_tables(
        tables["applications"], tables["outcomes"], repayment, max_events=K, cutoff=CONFIG.end
    )
    merchant_of = dict(zip(*(tables["applications"].column(c).to_pylist() for c in ("application_id", "merchant_id"))))
    requests = [
        {"applicant_id": r["applicant_id"], "merchant_id": merchant_of[r["application_id"]], "amount": amount,
         "term": 4, "timestamp": r["application_ts"]}
        for r, amount in zip(sequences.select(["application_id", "applicant_id", "application_ts"]).to_pylist(),
                             _amounts(tables["applications"], sequences), strict=True)
    ]  # fmt: skip
    return {"platform": platform, "sequences": sequences, "requests": requests, "results": results, **marks}


def _amounts(applications: pa.Table, sequences: pa.Table) -> list[float]:
    amount = dict(zip(*(applications.column(c).to_pylist() for c in ("application_id", "amount"))))
    return [amount[a] for a in sequences.column("application_id").to_pylist()]


def test_the_steps_publish_every_event(world):
    results = world["results"]
    assert results["event log/fraud_events"] > 0 and results["event log/merchant_profiles"] == CONFIG.merchants
    # every logged event is online: the view's retention trims none of the generated history
    assert results["online events/applicant_behaviour"] == results["event log/fraud_events"]
    assert results["online events/merchant_profile"] == CONFIG.merchants


def test_served_input_equals_the_training_row_exactly(world):
    """Every labelled application, in one batch (one round trip per view): applicants with
    several applications in the batch each see only the stored history, never each other."""
    sequences, requests = world["sequences"], world["requests"]
    want = input_arrays(sequences)
    got = model_inputs(world["platform"].features, requests, max_events=K)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the cases the test is about are in it
    mask = want["mask"]
    assert (~mask.any(axis=1)).sum() > 10  # applicants with no history yet
    assert mask.all(axis=1).sum() > 10  # histories longer than K, truncated
    assert (want["event_type"] == LATE_PAYMENT).any() and (want["event_type"] == MISSED).any()


def test_ties_with_the_application_and_within_the_history(world):
    sequences, requests = world["sequences"], world["requests"]
    row = sequences.column("application_id").to_pylist().index(world["tie"])
    got = model_inputs(world["platform"].features, [requests[row]], max_events=K)
    want = input_arrays(sequences.slice(row, 1))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the three events known at one time, in the kernel's order: the missed installment
    # happened first; the payment and the delinquency at one event time go by type id
    assert got["event_type"][0, -3:].tolist() == [MISSED, PAYMENT, DELINQUENCY]
    assert len(set(got["days_before"][0, -3:].tolist())) == 1
    # the payment known at the application's own time is not in its history, but the
    # applicant's next application sees it
    paid = np.float32(np.log1p(12.5))
    assert paid not in got["log_amount"][0]
    applicant, at = requests[row]["applicant_id"], requests[row]["timestamp"]
    later = min((r for r in requests if r["applicant_id"] == applicant and r["timestamp"] > at), key=lambda r: r["timestamp"])
    seen = model_inputs(world["platform"].features, [later], max_events=K)
    assert paid in seen["log_amount"][0]


def _random_history(seed: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    """A few applicants' applications and repayment events on whole days: ties everywhere
    (events known at an application's time, two applications at one time, events known
    together), late knowledge and unknown categories."""
    rng = np.random.default_rng(seed)
    t0 = CONFIG.start
    apps, events = [], []
    for who in range(1, 5):
        for i in range(int(rng.integers(1, 7))):
            apps.append({"application_id": f"P{who}-{i}", "applicant_id": who, "application_ts": t0 + timedelta(days=int(rng.integers(0, 40))),
                         "merchant_category": ["fashion", "travel", "not-a-category", None][int(rng.integers(0, 4))],
                         "amount": float(rng.integers(10, 500)), "default": int(rng.integers(0, 2))})  # fmt: skip
        for j in range(int(rng.integers(0, 12))):
            happened = int(rng.integers(0, 40))
            kind = ["payment", "missed", "delinquency", "origination"][int(rng.integers(0, 4))]
            events.append({"applicant_id": who, "event_type": kind, "event_ts": t0 + timedelta(days=happened),
                           "known_ts": t0 + timedelta(days=happened + int(rng.integers(0, 4))),
                           "balance_delta": -float(rng.integers(1, 100)) if kind == "payment" else 0.0,
                           "is_late": int(rng.integers(0, 2)), "days_past_due": int(rng.integers(0, 40))})  # fmt: skip
    ts = pa.timestamp("us", tz="UTC")
    applications = pa.Table.from_pylist(apps, schema=pa.schema([
        ("application_id", pa.string()), ("applicant_id", pa.int64()), ("application_ts", ts),
        ("merchant_category", pa.string()), ("amount", pa.float64()), ("default", pa.int64()),
    ]))  # fmt: skip
    outcomes = applications.append_column("label_ts", applications.column("application_ts"))
    repayment = pa.Table.from_pylist(events, schema=pa.schema([
        ("applicant_id", pa.int64()), ("event_type", pa.string()), ("event_ts", ts), ("known_ts", ts),
        ("balance_delta", pa.float64()), ("is_late", pa.int64()), ("days_past_due", pa.int64()),
    ]))  # fmt: skip
    return applications, outcomes, repayment


@pytest.mark.parametrize("seed", range(20))
def test_the_query_kernel_cuts_the_training_window(seed):
    """``windows.query_sequences`` (serving's cut) against ``sequences_from_tables`` (training's)
    on the same raw tables, all applications queried in one batch."""
    applications, outcomes, repayment = _random_history(seed)
    k = int(np.random.default_rng(seed).integers(1, 7))
    training = sequences_from_tables(applications, outcomes, repayment, max_events=k, cutoff=CONFIG.end)
    by_id = {a["application_id"]: a for a in applications.to_pylist()}
    order = [by_id[a] for a in training.column("application_id").to_pylist()]
    queries = pa.Table.from_pylist(order, schema=applications.schema)
    served = query_sequences(applications, repayment, queries, max_events=k)
    assert served.column("applicant_id").equals(training.column("applicant_id"))
    for name, array in input_arrays(training).items():
        np.testing.assert_array_equal(input_arrays(served)[name], array, err_msg=name)


def test_input_arrays_are_to_tensors_as_numpy(world):
    table = world["sequences"].slice(0, 50)
    tensors = to_tensors(table)
    arrays = input_arrays(table)
    assert set(arrays) == set(tensors) - {"label"}
    for name, array in arrays.items():
        assert array.dtype == tensors[name].numpy().dtype, name
        np.testing.assert_array_equal(array, tensors[name].numpy(), err_msg=name)


def test_an_unknown_applicant_and_merchant(world):
    now = world["requests"][0]["timestamp"]
    got = model_inputs(
        world["platform"].features,
        [{"applicant_id": 10**12, "merchant_id": 10**6, "amount": 50.0, "timestamp": now},
         {"applicant_id": 10**12, "merchant_id": None, "amount": 0.0, "timestamp": now.replace(tzinfo=None)}],
        max_events=K,
    )  # fmt: skip
    assert not got["mask"].any() and not got["event_type"].any() and not got["days_before"].any()
    assert got["app_category"].tolist() == [CATEGORIES.index("<other>")] * 2
    assert got["app_log_amount"].tolist() == [np.float32(np.log1p(50.0)), 0.0]


def test_a_merchant_category_is_as_known_at_the_request_time(world):
    request = world["requests"][0]
    got = model_inputs(world["platform"].features, [request], max_events=K)["app_category"]
    assert got[0] not in (0, 1)  # a generated merchant's listed category
    before = {**request, "timestamp": CONFIG.start - timedelta(days=1)}  # before any merchant was onboarded
    assert model_inputs(world["platform"].features, [before], max_events=K)["app_category"][0] == 1


def test_no_requests_and_bad_requests(world):
    features = world["platform"].features
    empty = model_inputs(features, [], max_events=K)
    assert empty["event_type"].shape == (0, K) and empty["app_category"].shape == (0,)
    good = world["requests"][0]
    for bad, words in [
        ({k: v for k, v in good.items() if k != "timestamp"}, "lacks ['timestamp']"),
        ({**good, "applicant_id": "42"}, "applicant_id must be an integer"),
        ({**good, "amount": float("nan")}, "amount must be a finite number"),
        ({**good, "timestamp": "2024-01-01"}, "timestamp must be a datetime"),
    ]:
        with pytest.raises(DataError, match=words.replace("[", r"\[").replace("]", r"\]")):
            model_inputs(features, [good, bad], max_events=K)


def test_the_steps_are_skipped_when_up_to_date_and_rerun_when_the_state_is_gone(world, caplog):
    platform = world["platform"]
    with caplog.at_level(logging.INFO, logger="mlplatform.jobs"):
        StepRunner(platform.storage).run_all(online_steps(platform, prefix=PREFIX))
    lines = [r.getMessage() for r in caplog.records if r.name == "mlplatform.jobs"]
    assert sum("up to date" in line for line in lines) == 4, lines  # the two logs and the two views
    platform.features.online_store.drop_events(applicant_behaviour.name)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlplatform.jobs"):
        StepRunner(platform.storage).run_all(online_steps(platform, prefix=PREFIX))
    lines = [r.getMessage() for r in caplog.records if r.name == "mlplatform.jobs"]
    reloaded = [line for line in lines if line.startswith("[online events] applicant_behaviour")]
    assert reloaded and "up to date" not in reloaded[0], lines
    # and the state is whole again
    test_served_input_equals_the_training_row_exactly(world)


def test_one_instant_in_any_form_gets_one_input(world):
    """A request's time as a naive UTC datetime, an aware one in UTC or another zone, or a
    pandas Timestamp: the same instant, the same window."""
    import pandas as pd
    from zoneinfo import ZoneInfo

    request = world["requests"][40]
    at = request["timestamp"]
    forms = [at, at.replace(tzinfo=None), at.astimezone(ZoneInfo("America/New_York")), pd.Timestamp(at)]
    want = model_inputs(world["platform"].features, [request], max_events=K)
    assert want["mask"].any()
    for form in forms:
        got = model_inputs(world["platform"].features, [{**request, "timestamp": form}], max_events=K)
        for name in want:
            assert got[name].tobytes() == want[name].tobytes(), (form, name)
