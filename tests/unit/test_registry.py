"""Feature definitions and the registry: validation, versions, diffs, the schema-change guard."""

from __future__ import annotations

import pyarrow as pa
import pytest

from mlplatform import (
    Aggregation,
    ConflictError,
    DefinitionError,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    NotFoundError,
    ParquetSource,
    Platform,
)
from workloads.underwriting.features import DEFINITIONS


@pytest.fixture
def platform(tmp_path):
    return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})


applicant = Entity(name="applicant", join_keys=["applicant_id"])
events = ParquetSource(name="events", dataset="raw/events", timestamp_field="event_ts")


def history(window="90d", ttl="400d", **extra) -> FeatureView:
    return FeatureView(
        name="history",
        entities=[applicant],
        source=events,
        ttl=ttl,
        aggregations=[Aggregation(column="is_missed", function="sum", window=window, name="missed"), *extra.get("more", [])],
    )


def test_apply_twice_is_a_noop(platform):
    first = platform.features.apply(DEFINITIONS)
    assert first.revision == 1
    assert {c.action for c in first.changes} == {"added"}
    second = platform.features.apply(DEFINITIONS)
    assert second.revision is None
    assert second.changed == []
    assert "no changes" in str(second)
    assert platform.features.registry.revision() == 1


def test_change_gives_diff_and_new_version(platform):
    platform.features.apply([history()])
    old = platform.features.get_feature_view("history").version
    result = platform.features.apply([history(ttl="30d")])
    (change,) = result.changed
    assert change.kind == "feature_view" and change.name == "history"
    assert change.old_version == old and change.new_version != old
    assert "ttl: '400d' -> '30d'" in str(result)
    assert platform.features.get_feature_view("history").ttl.days == 30
    assert [h["version"] for h in platform.features.registry.history("feature_view", "history")] == [
        old,
        change.new_version,
    ]


def test_added_feature_is_listed_in_diff(platform):
    platform.features.apply([history()])
    more = [Aggregation(column="is_late", function="sum", window="30d", name="late")]
    result = platform.features.apply([history(more=more)])
    assert "+ aggregation late" in str(result)


def test_schema_change_on_view_with_data_is_refused(platform):
    platform.features.apply([history()])
    platform.datasets.publish("offline/history", pa.table({"applicant_id": [1], "missed": [0.0]}))
    with pytest.raises(ConflictError, match="already has offline data") as info:
        platform.features.apply([history(window="30d")])
    assert "force=True" in str(info.value)
    # the registry still holds the old definition
    assert platform.features.get_feature_view("history").aggregations[0].window.days == 90
    # a change that does not affect stored data is fine
    assert platform.features.apply([history(ttl="200d")]).revision == 2
    # and force records the new version
    forced = platform.features.apply([history(window="30d", ttl="200d")], force=True)
    assert forced.revision == 3
    assert platform.features.get_feature_view("history").aggregations[0].window.days == 30


def test_schema_change_without_data_is_allowed(platform):
    platform.features.apply([history()])
    assert platform.features.apply([history(window="30d")]).revision == 2


def test_dry_run_writes_nothing(platform):
    result = platform.features.apply(DEFINITIONS, dry_run=True)
    assert result.dry_run and result.revision is None and result.changed
    assert platform.features.registry.revision() == 0


def test_unknown_feature_in_service_is_refused(platform):
    bad = FeatureService(name="svc", features=["history:nope"])
    with pytest.raises(DefinitionError, match="view 'history' has no feature 'nope'"):
        platform.features.apply([history(), bad])


def test_unknown_view_in_service_is_refused(platform):
    bad = FeatureService(name="svc", features=["ghost:missed"])
    with pytest.raises(DefinitionError, match="unknown view 'ghost'"):
        platform.features.apply([history(), bad])


def test_redefined_entity_is_refused(platform):
    platform.features.apply([history()])
    other = Entity(name="applicant", join_keys=["customer_id"])
    view = FeatureView(
        name="other", entities=[other], source=events, aggregations=[Aggregation(function="count", window="1d")]
    )
    with pytest.raises(DefinitionError, match="join keys"):
        platform.features.apply([view])


def test_two_objects_with_one_name_are_refused(platform):
    with pytest.raises(DefinitionError, match="both named 'history'"):
        platform.features.apply([history(), history(window="30d")])


def test_non_definition_is_refused(platform):
    with pytest.raises(DefinitionError, match="cannot apply"):
        platform.features.apply(["history"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: history(ttl="-1d"), "ttl: duration must not be negative"),
        (lambda: history(ttl="0s"), "ttl must be positive"),
        (lambda: Aggregation(column="x", function="median", window="1d"), "function"),
        (lambda: Aggregation(column="x", function="sum", window="0s"), "window must be positive"),
        (lambda: Aggregation(function="sum", window="1d"), "needs a column"),
        (
            lambda: history(more=[Aggregation(column="is_late", function="sum", window="30d", name="missed")]),
            "duplicate feature names ['missed']",
        ),
        (lambda: FeatureService(name="s", features=["no_colon"]), "bad feature reference 'no_colon'"),
        (lambda: FeatureService(name="s", features=["a:b", "a:b"]), "duplicate feature references"),
        (lambda: Entity(name="Bad Name"), "name"),
        (
            lambda: FeatureView(name="v", entities=[applicant], source=events, schema=[Field(name="x")],
                                aggregations=[Aggregation(function="count", window="1d")]),
            "exactly one of 'schema'",
        ),
    ],
)
def test_invalid_definitions_raise_definition_error(build, message):
    with pytest.raises(DefinitionError) as info:
        build()
    assert message in str(info.value)


def test_get_and_list_each_kind(platform):
    platform.features.apply(DEFINITIONS)
    features = platform.features
    assert [e.name for e in features.list_entities()] == ["applicant", "merchant"]
    assert [v.name for v in features.list_feature_views()] == [
        "applicant_checkouts", "applicant_history", "merchant_activity", "merchant_risk", "recent_repayments"
    ]
    assert [s.name for s in features.list_stream_sources()] == ["checkouts", "repayments"]
    inputs = features.get_on_demand_feature_view("checkout_features").input_columns  # request fields, then view features
    assert inputs[:2] == ["amount", "term"] and "avg_loan_amount_365d" in inputs
    assert [s.name for s in features.list_feature_services()] == ["underwriting_v1"]
    assert [r.name for r in features.list_request_sources()] == ["checkout"]
    assert [s.name for s in features.list_sources()] == ["applications", "loan_outcomes", "repayment_events"]
    odfv = features.get_on_demand_feature_view("checkout_features")
    assert [f.name for f in odfv.features] == ["order_amount", "term_installments", "amount_to_avg_prior"]
    assert features.get_entity("applicant").join_keys == ("applicant_id",)
    with pytest.raises(NotFoundError, match="no feature_view named 'ghost'"):
        features.get_feature_view("ghost")
    refs = features.resolve_features("underwriting_v1")
    assert "applicant_history:missed_installments_90d" in refs
    assert "checkout_features:amount_to_avg_prior" in refs


def test_registered_definitions_round_trip(platform):
    from workloads.underwriting.features import applicant_history, checkout_features

    platform.features.apply(DEFINITIONS)
    assert platform.features.get_feature_view("applicant_history") == applicant_history
    odfv = platform.features.get_on_demand_feature_view("checkout_features")
    assert odfv.version == checkout_features.version
    assert odfv.udf is checkout_features.udf
    assert odfv.mode == checkout_features.mode == "python"


def test_python_mode_on_demand_view_gives_the_same_values_offline_and_online():
    # Offline the udf is fed from a pandas batch (nulls as NaN), online from looked-up values
    # (nulls as None); both must reach it, and come back, the same way.
    import math

    import pandas as pd

    from workloads.underwriting.features import applicant_history, checkout_features

    history = {f.name: [1.0, 2.0, 3.0, 4.0] for f in applicant_history.features}
    history["avg_loan_amount_365d"] = [50.0, None, 0.0, 80.0]
    online = {"amount": [100.0, 50.0, 75.0, None], "term": [3, 4, 6, 4], **history}
    offline = pd.DataFrame({k: [math.nan if v is None else v for v in vs] for k, vs in online.items()}, index=[7, 8, 9, 10])

    by_row = checkout_features.transform_rows(online, 4)
    frame = checkout_features.transform(offline)
    assert by_row == {
        "order_amount": [100.0, 50.0, 75.0, None],
        "term_installments": [3, 4, 6, 4],
        "amount_to_avg_prior": [2.0, None, None, None],
    }
    assert list(frame.index) == [7, 8, 9, 10] and list(frame.columns) == list(by_row)
    for name, values in by_row.items():
        assert [None if pd.isna(v) else v for v in frame[name]] == values


def test_python_mode_udf_that_breaks_its_contract_is_named():
    from mlplatform.features.definitions import OnDemandFeatureView, RequestSource

    request = RequestSource(name="req", schema=[Field(name="amount", dtype="float64")])
    view = OnDemandFeatureView(
        name="short", sources=(request,), schema=(Field(name="doubled"),), udf=_drops_a_row, mode="python"
    )
    with pytest.raises(DefinitionError, match="'short'.*list of 2 values.*doubled"):
        view.transform_rows({"amount": [1.0, 2.0]}, 2)


def _drops_a_row(inputs: dict) -> dict:
    return {"doubled": [2 * a for a in inputs["amount"][:1]]}
