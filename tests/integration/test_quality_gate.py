"""Data quality on a real local Ray: a strict view refuses a bad upstream batch at backfill and
at materialization while the previous offline version and online values stay exactly as
they were; a drifted feature is flagged by name against the production model's training set."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlplatform import Entity, Expectation, FeatureView, Field, ParquetSource, Platform, Quality, QualityError
from mlplatform.features.store import offline_dataset
from mlplatform.features.training_sets import save_training_set
from mlplatform.jobs.quality_steps import quality_steps
from mlplatform.jobs.steps import StepRunner

T0 = datetime(2024, 1, 1, tzinfo=UTC)
END = T0 + timedelta(days=10)
UTC_US = pa.timestamp("us", tz="UTC")
applicant = Entity(name="applicant", join_keys=["applicant_id"])
KEYS = 200


def _profile_view(policy: str) -> FeatureView:
    return FeatureView(
        name="profile",
        entities=[applicant],
        source=ParquetSource(name="profile_events", dataset="raw/profile_events", timestamp_field="ts"),
        schema=[Field(name="income"), Field(name="dependants", dtype="int64")],
        quality=Quality(
            policy=policy,
            max_staleness="2d",
            features={
                "income": Expectation(max_null_rate=0.05, min=0),
                "dependants": Expectation(max_null_rate=0.0, min=0, max=20),
            },
        ),
    )


def _events(seed: int, null_share: float = 0.0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = KEYS * 5
    income = rng.gamma(2.0, 2000.0, n)
    income[rng.random(n) < null_share] = np.nan
    return pa.table({
        "applicant_id": pa.array(np.arange(n) % KEYS, pa.int64()),
        "ts": pa.array([T0 + timedelta(hours=int(h)) for h in rng.integers(1, 10 * 24, n)], UTC_US),
        "income": pa.array(income, pa.float64(), from_pandas=True),  # NaN -> null
        "dependants": pa.array(rng.integers(0, 5, n), pa.int64()),
    })


def _platform(tmp_path) -> Platform:
    return Platform.from_config({"project": f"q{uuid.uuid4().hex[:8]}", "storage": {"root": str(tmp_path / "root")}})


def _online(platform: Platform) -> dict:
    got = platform.features.get_online_features(
        ["profile:income", "profile:dependants"], {"applicant_id": list(range(KEYS))}, now=END
    )
    return got.to_json_dict()


def test_strict_refuses_nulls_at_backfill_and_materialize_and_keeps_what_was_published(tmp_path, ray_session):
    platform = _platform(tmp_path)
    features, datasets = platform.features, platform.datasets
    features.apply([_profile_view("strict")])
    datasets.publish("raw/profile_events", _events(1))
    good = features.backfill("profile", T0, END)
    features.materialize(T0, END - timedelta(days=3), ["profile"])
    before_online = _online(platform)
    before_offline = datasets.read_table(offline_dataset("profile"))
    assert sum(v is None for v in before_online["results"][1]["values"]) == 0  # every key has a value

    # a bad upstream batch: 30% of incomes null
    datasets.publish("raw/profile_events", _events(2, null_share=0.3))
    with pytest.raises(QualityError) as err:
        features.backfill("profile", T0, END)
    for words in ("backfill of feature view 'profile' refused", "feature 'income' max_null_rate", "bound 0.05"):
        assert words in str(err.value)
    assert datasets.get(offline_dataset("profile")).version == good.version.version
    assert datasets.read_table(offline_dataset("profile")).equals(before_offline)

    # published under warn (recorded), then refused at materialization once strict again:
    # a full run and an incremental one (its upserts could not be undone) write nothing online
    features.apply([_profile_view("warn")])
    warned = features.backfill("profile", T0, END)
    assert warned.version.version == good.version.version + 1
    latest = platform.quality.latest("profile", "backfill")
    assert latest.policy == "warn" and [c.feature for c in latest.failed] == ["income"]
    features.apply([_profile_view("strict")])
    generation = features.online_store.current_generation(features.get_feature_view("profile"))
    with pytest.raises(QualityError, match="materialize of feature view 'profile' refused"):
        features.materialize(T0, END, ["profile"])
    with pytest.raises(QualityError, match="materialize of feature view 'profile' refused"):
        features.materialize_incremental(END, ["profile"])
    assert features.online_store.current_generation(features.get_feature_view("profile")) == generation
    assert _online(platform) == before_online  # bit for bit: values, statuses, event times

    # validate on demand, and the job's one line per view
    with pytest.raises(QualityError, match="validate of feature view 'profile' refused"):
        platform.quality.validate("profile")
    stages = [r.stage for r in platform.quality.reports("profile")]
    assert stages == ["backfill", "materialize", "backfill", "backfill", "materialize", "materialize", "validate"]
    assert [r.passed for r in platform.quality.reports("profile")] == [True, True, False, False, False, False, False]
    features.apply([_profile_view("warn")])
    (step,) = quality_steps(platform.quality, features, datasets)
    report = StepRunner(platform.storage).run(step).value
    assert report.line().startswith(f"profile: {warned.rows_out:,} rows, ")
    assert "1 failed" in report.line() and "worst: feature 'income' max_null_rate" in report.line()


def _apps_view(policy: str = "warn") -> FeatureView:
    drift = Expectation(max_psi=0.2)
    return FeatureView(
        name="apps",
        entities=[applicant],
        source=ParquetSource(name="app_events", dataset="raw/app_events", timestamp_field="ts"),
        schema=[Field(name="utilisation"), Field(name="tenure")],
        quality=Quality(policy=policy, features={"utilisation": drift, "tenure": drift}),
    )


def _app_events(seed: int, shift: float) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = KEYS
    return pa.table({
        "applicant_id": pa.array(np.arange(n), pa.int64()),
        "ts": pa.array([T0 + timedelta(hours=1)] * n, UTC_US),
        "utilisation": pa.array(rng.normal(0.0, 1.0, n)),
        "tenure": pa.array(rng.normal(shift, 1.0, n)),
    })


REFS = ["apps:utilisation", "apps:tenure"]


def _joined(platform: Platform) -> object:
    entities = pd.DataFrame({
        "applicant_id": np.arange(KEYS),
        "application_ts": [T0 + timedelta(days=2)] * KEYS,
        "default": np.arange(KEYS) % 2,
    })
    return platform.features.get_historical_features(entities, REFS, entity_timestamp="application_ts").materialize()


def _save(platform: Platform, ds: object) -> object:
    return save_training_set(platform.features, "apps_set", ds, features=REFS, label="default",
                             timestamp_column="application_ts", splits={"train": (T0, T0 + timedelta(days=5))})


def test_drift_is_flagged_on_the_shifted_feature_against_the_production_training_set(tmp_path, ray_session):
    import lightgbm as lgb

    platform = _platform(tmp_path)
    platform.features.apply([_apps_view()])
    platform.datasets.publish("raw/app_events", _app_events(1, shift=0.0))
    platform.features.backfill("apps", T0, END)
    first = _save(platform, _joined(platform))
    # no production model yet: drift is skipped, not failed
    assert first.quality["apps"]["failed"] == [] and first.quality["apps"]["skipped"] == 2

    x = np.random.default_rng(0).normal(size=(60, 2))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 3}, lgb.Dataset(x, (x[:, 0] > 0).astype(int)), 2)
    version = platform.models.register("apps_pd", flavor="lightgbm", model=booster, lineage={"training_set": first},
                                      metrics={}, params={})
    platform.models.set_alias("apps_pd", "production", version.version)

    platform.datasets.publish("raw/app_events", _app_events(2, shift=1.5))  # tenure moves, utilisation does not
    platform.features.backfill("apps", T0, END)
    shifted = _joined(platform)
    second = _save(platform, shifted)
    (finding,) = second.quality["apps"]["failed"]
    assert finding.startswith("feature 'tenure' max_psi: observed") and "against apps_set v1" in finding
    report = platform.quality.latest("apps", "training_set")
    psi = {c.feature: c.observed for c in report.checks if c.expectation == "max_psi"}
    assert psi["tenure"] > 0.2 > psi["utilisation"]
    assert report.reference["model"] == "apps_pd" and report.reference["training_set"] == "apps_set v1"

    platform.features.apply([_apps_view("strict")])
    with pytest.raises(QualityError, match="feature 'tenure' max_psi"):
        _save(platform, shifted)
    assert platform.datasets.get("training_sets/apps_set").version == second.version
