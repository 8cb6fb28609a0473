"""Data-quality expectations, profiles and checks, without Ray: what a user relies on when a
view declares ``quality`` — bounds mean exactly what they say, a batch-by-batch profile
equals the whole table's, and a strict failure names view, feature, expectation, observed
value and bound."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform import (
    Aggregation,
    DefinitionError,
    Entity,
    Expectation,
    FeatureView,
    ParquetSource,
    Platform,
    Quality,
    QualityError,
)
from mlplatform.evaluation.card_markdown import render_markdown
from mlplatform.evaluation.metrics import decile_edges, evaluate as evaluate_split, psi
from mlplatform.quality.api import DataQuality
from mlplatform.quality.checks import dtype_matches, evaluate, psi_from_counts
from mlplatform.quality.profile import ColumnSpec, ProfileSpec, empty, merge, profile_table
from mlplatform.quality.report import QualityReport

END = datetime(2024, 7, 1, tzinfo=UTC)


def _view(quality: Quality | None = None, **kw) -> FeatureView:
    return FeatureView(
        name="history",
        entities=[Entity(name="applicant")],
        source=ParquetSource(name="events", dataset="raw/events", timestamp_field="ts"),
        aggregations=[
            Aggregation(name="loans_90d", column="is_loan", function="sum", window="90d"),
            Aggregation(name="dpd_max_90d", column="dpd", function="max", window="90d"),
        ],
        quality=quality,
        **kw,
    )


# ----------------------------------------------------------------------- definitions
def test_expectations_are_part_of_the_version_but_not_of_the_data_version():
    plain = _view()
    strict = _view(Quality(policy="strict", features={"loans_90d": Expectation(max_null_rate=0.0)}))
    assert "quality" not in plain.spec()  # views without expectations keep their versions
    assert strict.version != plain.version
    assert strict.data_version == plain.data_version  # tightening a bound needs no backfill
    rebuilt = FeatureView.model_validate(strict.spec())
    assert rebuilt == strict and rebuilt.version == strict.version


def test_registry_records_a_change_of_expectations_without_force(tmp_path):
    platform = Platform.from_config({"storage": {"root": str(tmp_path)}})
    platform.features.apply([_view(Quality(policy="warn"))])
    result = platform.features.apply([_view(Quality(policy="strict", max_staleness="2d"))])
    (change,) = result.changed
    assert change.details == ("quality policy: 'warn' -> 'strict'", "quality max_staleness: None -> '2d'")
    result = platform.features.apply([_view(Quality(policy="strict", max_staleness="2d",
                                                    features={"loans_90d": Expectation(min=0)}))])
    assert result.changed[0].details == ("quality of loans_90d changed",)
    assert platform.features.get_feature_view("history").quality.policy == "strict"


@pytest.mark.parametrize(
    "quality, words",
    [
        ({"features": {"nope": {}}}, "quality names features ['nope']"),
        ({"features": {"loans_90d": {"min": 5, "max": 1}}}, "min 5.0 is greater than max 1.0"),
        ({"features": {"loans_90d": {"min": 0, "allowed": [1]}}}, "either a range"),
        ({"features": {"loans_90d": {"max_null_rate": 1.5}}}, "max_null_rate"),
        ({"policy": "block"}, "policy"),
        ({"max_staleness": "-1d"}, "max_staleness"),
        ({"features": {"loans_90d": {"max_psi": 0}}}, "max_psi"),
        ({"features": {"loans_90d": {"bogus": 1}}}, "bogus"),
    ],
)
def test_bad_expectations_are_refused_by_name(quality, words):
    spec = _view().spec()
    with pytest.raises(DefinitionError) as err:
        FeatureView(**{**spec, "quality": quality})
    assert words in str(err.value)


def test_range_on_a_string_feature_is_refused():
    from mlplatform.features import Field

    with pytest.raises(DefinitionError, match="need a numeric feature"):
        FeatureView(
            name="plain", entities=[Entity(name="applicant")],
            source=ParquetSource(name="events", dataset="raw/events", timestamp_field="ts"),
            schema=[Field(name="segment", dtype="string")],
            quality=Quality(features={"segment": Expectation(min=0)}),
        )


# -------------------------------------------------------------------------- profiles
SPEC = ProfileSpec(
    columns=[
        ColumnSpec("x", "x", "float64", min=-1.0, max=1.0, edges=(-0.5, 0.0, 0.5)),
        ColumnSpec("k", "k", "int64", allowed=(1, 2, 3)),
        ColumnSpec("s", "s", "string", allowed=("a", "b")),
    ],
    timestamp="event_timestamp",
)

rows = st.lists(
    st.tuples(
        st.one_of(st.none(), st.just(float("nan")), st.floats(-3, 3)),
        st.one_of(st.none(), st.integers(0, 5)),
        st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
        st.integers(0, 10**12),
    ),
    max_size=60,
)


def _table(data):
    return pa.table({
        "x": pa.array([r[0] for r in data], pa.float64()),
        "k": pa.array([r[1] for r in data], pa.int64()),
        "s": pa.array([r[2] for r in data], pa.string()),
        "event_timestamp": pa.array([r[3] for r in data], pa.timestamp("us", tz="UTC")),
    })


def _oracle(data):
    xs = [r[0] for r in data if r[0] is not None and not math.isnan(r[0])]
    ks = [r[1] for r in data if r[1] is not None]
    ss = [r[2] for r in data if r[2] is not None]
    hist = [0, 0, 0, 0]
    for x in xs:
        hist[sum(x >= e for e in (-0.5, 0.0, 0.5))] += 1
    return {
        "rows": len(data),
        "x_nulls": len(data) - len(xs),
        "x_min": min(xs) if xs else None,
        "x_out": sum(1 for x in xs if x < -1 or x > 1),
        "x_hist": hist,
        "k_disallowed": sum(1 for k in ks if k not in (1, 2, 3)),
        "s_disallowed": sum(1 for s in ss if s not in ("a", "b")),
        "newest": max((r[3] for r in data), default=None),
    }


@settings(max_examples=150, deadline=None)
@given(rows, st.lists(st.integers(0, 60), max_size=4))
def test_profile_of_batches_merged_equals_brute_force(data, cuts):
    table = _table(data)
    bounds = sorted({0, len(data), *[min(c, len(data)) for c in cuts]})
    merged = empty(SPEC)
    for lo, hi in reversed(list(zip(bounds, bounds[1:]))):  # any order
        merged = merge(merged, profile_table(table.slice(lo, hi - lo), SPEC))
    want = _oracle(data)
    x, k, s = (merged["columns"][c] for c in ("x", "k", "s"))
    assert merged["rows"] == want["rows"] and merged["newest"] == want["newest"]
    assert x["nulls"] == want["x_nulls"] and x["min"] == want["x_min"] and x["out_of_range"] == want["x_out"]
    assert x["hist"] == want["x_hist"]
    assert k["disallowed"] == want["k_disallowed"] and s["disallowed"] == want["s_disallowed"]
    if len(data):
        assert merged == profile_table(table, SPEC)


def test_training_set_rows_without_a_value_are_counted_apart():
    spec = ProfileSpec([ColumnSpec("a", "v__a", "float64"), ColumnSpec("b", "b", "int64")], skip_uncovered=True)
    table = pa.table({"v__a": pa.array([None, float("nan"), 1.0, None]), "b": pa.array([None, None, None, 4])})
    prof = profile_table(table, spec)
    assert (prof["rows"], prof["uncovered"]) == (2, 2)
    assert (prof["columns"]["a"]["nulls"], prof["columns"]["b"]["nulls"]) == (1, 1)
    assert merge(prof, prof)["uncovered"] == 4


def test_missing_column_counts_as_null_and_fails_its_dtype():
    prof = profile_table(pa.table({"event_timestamp": pa.array([0], pa.timestamp("us"))}), SPEC)
    assert prof["columns"]["x"]["nulls"] == 1 and prof["columns"]["x"]["types"] == ["missing"]
    checks = evaluate(Quality(), {"x": "float64"}, prof, reference=None, end=None)
    assert [(c.expectation, c.status, c.observed) for c in checks] == [("dtype", "failed", "missing")]


@pytest.mark.parametrize(
    "declared, types, non_integral, ok",
    [
        ("int64", ["int64"], 0, True),
        ("int64", ["double"], 0, True),       # pandas made integers with nulls floats
        ("int64", ["double"], 3, False),
        ("float64", ["int32"], 0, True),
        ("string", ["large_string"], 0, True),
        ("string", ["int64"], 0, False),
        ("bool", ["bool"], 0, True),
        ("list", ["list<item: double>"], 0, True),
        ("float64", ["string"], 0, False),
    ],
)
def test_dtype_matches(declared, types, non_integral, ok):
    assert dtype_matches(declared, types, non_integral) is ok


# ---------------------------------------------------------------------------- checks
def _profile(values, dtype=pa.float64(), newest=END - timedelta(days=1), edges=None):
    spec = ProfileSpec([ColumnSpec("f", "f", "float64", min=0.0, max=10.0, edges=edges)], "event_timestamp")
    ts = pa.array([newest] * len(values), pa.timestamp("us", tz="UTC"))
    return profile_table(pa.table({"f": pa.array(values, dtype), "event_timestamp": ts}), spec)


def _by(checks):
    return {c.expectation: c for c in checks}


def test_null_rate_bound_is_inclusive():
    q = Quality(features={"f": Expectation(max_null_rate=0.3)})
    at = _by(evaluate(q, {"f": "float64"}, _profile([1.0] * 7 + [None] * 3), reference=None, end=END))
    over = _by(evaluate(q, {"f": "float64"}, _profile([1.0] * 6 + [None] * 4), reference=None, end=END))
    assert at["max_null_rate"].status == "passed" and at["max_null_rate"].observed == pytest.approx(0.3)
    assert over["max_null_rate"].status == "failed" and over["max_null_rate"].observed == pytest.approx(0.4)


def test_range_checks_report_the_offending_extreme():
    q = Quality(features={"f": Expectation(min=0, max=10)})
    checks = _by(evaluate(q, {"f": "float64"}, _profile([0.0, 10.0, 11.5, None]), reference=None, end=END))
    assert checks["min"].status == "passed"
    assert (checks["max"].status, checks["max"].observed, checks["max"].bound) == ("failed", 11.5, 10.0)
    assert "1 values outside" in checks["max"].detail


def test_staleness_against_the_range_end_and_skipped_for_training_sets():
    q = Quality(max_staleness="2d")
    fresh = _by(evaluate(q, {}, _profile([1.0], newest=END - timedelta(days=2)), reference=None, end=END))
    stale = _by(evaluate(q, {}, _profile([1.0], newest=END - timedelta(days=3)), reference=None, end=END))
    none = _by(evaluate(q, {}, _profile([1.0]), reference=None, end=None))
    assert fresh["max_staleness"].status == "passed"
    assert stale["max_staleness"].status == "failed" and stale["max_staleness"].observed == 3 * 86400
    assert none["max_staleness"].status == "skipped"


def test_psi_equals_the_evaluation_metric_and_is_skipped_without_a_reference():
    rng = np.random.default_rng(1)
    ref, cur = rng.normal(0, 1, 5000), rng.normal(0.5, 1, 3000)
    edges = decile_edges(ref)
    shares = (np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)).tolist()
    prof = _profile(cur.tolist(), edges=tuple(edges))
    assert psi_from_counts(shares, prof["columns"]["f"]["hist"]) == pytest.approx(psi(ref, cur), rel=1e-12)
    q = Quality(features={"f": Expectation(max_psi=0.1)})
    flagged = _by(evaluate(q, {"f": "float64"}, prof, reference={"features": {"f": {"edges": edges, "shares": shares}}}, end=END))
    assert flagged["max_psi"].status == "failed" and flagged["max_psi"].observed > 0.1
    skipped = _by(evaluate(q, {"f": "float64"}, prof, reference=None, end=END))
    assert skipped["max_psi"].status == "skipped" and "no production model" in skipped["max_psi"].detail


# ------------------------------------------------------------ reports and the gate
def _gate(tmp_path):
    platform = Platform.from_config({"storage": {"root": str(tmp_path)}})

    def no_ray():
        raise AssertionError("checking a profile needs no Ray")

    return DataQuality(platform.storage, platform.datasets, models=platform.models, connect_ray=no_ray,
                       resolve_view=platform.features.resolve_view)


def test_strict_failure_names_view_feature_expectation_observed_and_bound(tmp_path):
    gate = _gate(tmp_path)
    view = _view(Quality(policy="strict", features={"loans_90d": Expectation(max_null_rate=0.05, min=0)}))
    plan = gate.plan(view)
    table = pa.table({"loans_90d": pa.array([1.0, None, None, 2.0]), "dpd_max_90d": pa.array([1.0] * 4),
                      "event_timestamp": pa.array([END] * 4, pa.timestamp("us", tz="UTC"))})
    with pytest.raises(QualityError) as err:
        gate.check(plan, profile_table(table, plan.spec), stage="backfill", start=None, end=END)
    text = str(err.value)
    for words in ("backfill of feature view 'history' refused", "'loans_90d'", "max_null_rate", "observed 0.5", "bound 0.05"):
        assert words in text
    (stored,) = gate.reports("history")
    assert stored.stage == "backfill" and not stored.passed and stored.key in text


def test_warn_records_the_report_and_returns_it(tmp_path):
    gate = _gate(tmp_path)
    view = _view(Quality(policy="warn", features={"loans_90d": Expectation(max_null_rate=0.0)}))
    plan = gate.plan(view)
    table = pa.table({"loans_90d": pa.array([None, 1.0]), "dpd_max_90d": pa.array([1.0, 2.0]),
                      "event_timestamp": pa.array([END] * 2, pa.timestamp("us", tz="UTC"))})
    report = gate.check(plan, profile_table(table, plan.spec), stage="materialize", start=None, end=END)
    again = gate.check(plan, profile_table(table.slice(1), plan.spec), stage="materialize", start=None, end=END)
    assert report.line().startswith("history: 2 rows, 2 passed, 1 failed, 0 skipped; worst: feature 'loans_90d' max_null_rate")
    assert [r.key for r in gate.reports("history")] == [report.key, again.key]  # versioned, oldest first
    assert gate.latest("history", "materialize") == again and again.passed
    assert QualityReport.from_json(report.to_json()) == report


def test_model_card_shows_the_training_sets_validation():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 400), rng.random(400)
    lineage = {"training_set": {"name": "uw", "version": 3, "rows": 400, "quality": {
        "history": {"policy": "strict", "rows": 400, "uncovered": 12, "passed": 9, "failed": [], "skipped": 2, "report": "quality/history/x.json"},
        "merchants": {"policy": "warn", "rows": 400, "passed": 3, "failed": ["feature 'rate' max: observed 2, bound 1"],
                      "skipped": 0, "report": ""},
    }}}
    text = render_markdown({"test": evaluate_split(y, s)}, model_name="pd", version=1, lineage=lineage, params={},
                           importance=[], examples=[], intended_use="", limitations=[])
    section = text.split("## Data quality", 1)[1].split("\n## ", 1)[0]
    assert "| `history` | strict | 400 | 12 | 9 | 0 | 2 | — |" in section
    assert "| `merchants` | warn | 400 | 0 | 3 | 1 | 0 | feature 'rate' max: observed 2, bound 1 |" in section
