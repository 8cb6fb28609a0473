"""The feature planner: the one answer to "which views and columns does this request read",
shared by training sets, online lookup and serving's catalog."""

from __future__ import annotations

import pytest

from mlplatform import NotFoundError, Platform
from mlplatform.features.planner import plan_features
from mlplatform.serving.catalog import FeatureCatalog
from workloads.underwriting.features import DEFINITIONS, applicant_history


@pytest.fixture
def store(tmp_path):
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    platform.features.apply(DEFINITIONS)
    return platform.features


def _shape(plan):
    return (
        {name: (view.name, names) for name, (view, names) in plan.views.items()},
        {name: (view.name, names) for name, (view, names) in plan.on_demand.items()},
    )


def test_on_demand_sources_are_read_whole_and_requested_order_is_kept(store):
    refs = ["merchant_risk:outcomes_90d", "checkout_features:amount_to_avg_prior", "applicant_history:loans_30d",
            "merchant_risk:default_rate_90d", "merchant_risk:outcomes_90d", "checkout_features:order_amount"]
    plan = plan_features(store, refs)
    views, on_demand = _shape(plan)
    every_history_feature = [f.name for f in applicant_history.features]
    assert list(views) == ["merchant_risk", "applicant_history"]
    assert views["merchant_risk"][1] == ["outcomes_90d", "default_rate_90d"]  # once each, first-requested order
    # the on-demand view reads its source view whole, after what was asked of it
    assert views["applicant_history"][1] == ["loans_30d", *(f for f in every_history_feature if f != "loans_30d")]
    assert on_demand == {"checkout_features": ("checkout_features", ["amount_to_avg_prior", "order_amount"])}
    assert plan.entity_columns() == {
        "merchant_id": "join key of view 'merchant_risk'",
        "applicant_id": "join key of view 'applicant_history'",
        "amount": "request field of on-demand view 'checkout_features'",
        "term": "request field of on-demand view 'checkout_features'",
    }


def test_the_store_and_servings_catalog_plan_alike(store):
    refs = store.resolve_features("underwriting_v1")
    assert _shape(plan_features(FeatureCatalog(store), refs)) == _shape(plan_features(store, refs))


def test_an_unknown_view_is_named(store):
    with pytest.raises(NotFoundError, match="'ghost'"):
        plan_features(store, ["ghost:x"])
