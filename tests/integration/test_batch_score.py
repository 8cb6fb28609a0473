"""platform.batch.score on a real local Ray: a LightGBM model trained on point-in-time
features scores every application once, on the features it would have seen at that time."""

from __future__ import annotations

from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray

from mlplatform import DataError, NotFoundError, Platform
from mlplatform.batch.score import MODEL_NAME, MODEL_VERSION, REASONS, SCORE
from mlplatform.models.reasons import ReasonCoder, reason_texts_from_definitions
from workloads.underwriting.features import DEFINITIONS
from workloads.underwriting.pipeline import RAW_PREFIX as RAW
from workloads.underwriting.pipeline import Config, backfill_views, generate_data
from workloads.underwriting.training_set import ENTITY_COLUMNS, LABEL, TIMESTAMP, entity_rows

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

MODEL = "underwriting_pd"
START, END = datetime(2024, 5, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
PARAMS = {"objective": "binary", "learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 20, "verbose": -1, "seed": 1}


@pytest.fixture(scope="module")
def scored(tmp_path_factory, ray_session):
    """Generate → apply → backfill; a model trained on the point-in-time features of the
    applications whose outcome is known; then one batch-scoring run over every application."""
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("batch"))}})
    # Eight months keep the offline stores (one partition per day) small; the first four
    # months of applications have known outcomes to train on.
    config = Config(data={"applications": 3000, "merchants": 40, "seed": 5, "start": START, "end": END})
    generate_data(platform, config)
    platform.features.apply(DEFINITIONS)
    backfill_views(platform, config)

    applications = platform.datasets.read_table(f"{RAW}/applications", columns=ENTITY_COLUMNS).to_pandas()
    refs = platform.features.resolve_features("underwriting_v1")
    direct = platform.features.get_historical_features(applications, refs, entity_timestamp=TIMESTAMP).to_pandas()
    train = direct.merge(entity_rows(platform, END).to_pandas()[["application_id", LABEL]], on="application_id")
    names = [ref.split(":", 1)[1] for ref in refs]
    x = train[names].to_numpy(np.float64, na_value=np.nan)
    booster = lgb.train(PARAMS, lgb.Dataset(x, train[LABEL].to_numpy(), feature_name=names), num_boost_round=20)
    mv = platform.models.register(
        MODEL, flavor="lightgbm", model=booster, lineage={"feature_service": "underwriting_v1"}, metrics={}, params=PARAMS
    )
    platform.models.set_alias(MODEL, "production", mv.version)

    result = platform.batch.score(MODEL, applications, name="all", reasons=True, batch_size=400, num_actors=2)
    out = platform.datasets.read_table(result.dataset.name).to_pandas()
    return platform, booster, refs, applications, direct, result, out


def test_every_application_is_scored_once_on_its_point_in_time_features(scored):
    platform, booster, refs, applications, direct, result, out = scored

    assert result.rows == len(out) == len(applications)
    assert out["application_id"].is_unique
    assert set(out["application_id"]) == set(applications["application_id"])
    assert result.dataset.name == f"scores/{MODEL}/all" and result.dataset.metadata["version"] == 1
    assert result.dataset.metadata["features"] == [r for r in refs if r.split(":")[1] in booster.feature_name()]
    assert (out[MODEL_NAME] == MODEL).all() and (out[MODEL_VERSION] == 1).all()
    assert result.rows_per_s > 0 and result.seconds >= result.timings["features"]

    # the point-in-time features computed directly (as the model was trained), scored in this
    # process: the same values and bit-identical scores
    names = booster.feature_name()
    direct = direct.set_index("application_id").loc[out["application_id"]]
    pd.testing.assert_frame_equal(
        out[names].astype("float64"), direct[names].reset_index(drop=True).astype("float64"), check_exact=True
    )
    expected = booster.predict(direct[names].to_numpy(dtype=np.float64, na_value=np.nan))
    assert np.array_equal(out[SCORE].to_numpy(), expected)


def test_reason_codes_are_the_reason_coders(scored):
    platform, booster, refs, _, _, _, out = scored
    texts = reason_texts_from_definitions(refs, platform.features.registry)
    expected = ReasonCoder(booster, texts).explain(out[booster.feature_name()])
    assert [list(r) for r in out[REASONS]] == [[reason.text for reason in row] for row in expected]
    assert any(len(r) > 0 for r in out[REASONS]) and all(len(r) <= 4 for r in out[REASONS])

    # scoring rows that already carry their features (no join) gives the same scores and reasons
    names = booster.feature_name()
    rows = ray.data.from_pandas(out[["application_id", *names]].head(200))
    again = platform.batch.score_features(MODEL, rows, reasons=True, num_actors=1).to_pandas()
    again = again.merge(out[["application_id", SCORE, REASONS]], on="application_id", suffixes=("", "_run"))
    assert len(again) == 200 and np.array_equal(again[SCORE].to_numpy(), again[f"{SCORE}_run"].to_numpy())
    assert [list(r) for r in again[REASONS]] == [list(r) for r in again[f"{REASONS}_run"]]


def test_the_model_is_loaded_once_per_actor_not_per_batch(scored):
    result = scored[5]
    loads = result.model_loads
    assert 1 <= len(loads) <= 2, loads  # at most num_actors actors …
    assert set(loads.values()) == {1}, loads  # … each loading the model exactly once
    assert result.rows / 400 > len(loads)  # although they scored many more batches than that


def test_a_loaded_model_scores_into_an_output_path(scored, tmp_path):
    platform, booster, _, applications, direct, _, _ = scored
    loaded = platform.models.load(MODEL, alias="production")
    sample = applications.iloc[:300]
    result = platform.batch.score(loaded, sample, output=tmp_path / "scores", num_actors=1)

    assert result.dataset is None and result.rows == 300 and result.version == 1
    out = pq.read_table(result.path).to_pandas()
    assert sorted(out["application_id"]) == sorted(sample["application_id"])
    assert REASONS not in out.columns
    assert set(result.model_loads.values()) == {1} and len(result.model_loads) == 1
    direct = direct.set_index("application_id").loc[out["application_id"]]
    assert np.array_equal(out[SCORE].to_numpy(), booster.predict(direct[booster.feature_name()].to_numpy(np.float64, na_value=np.nan)))
    with pytest.raises(DataError, match="not an empty directory"):
        platform.batch.score(loaded, sample, output=tmp_path / "scores")


def test_unknown_model_and_missing_columns_are_clear_errors(scored):
    platform, _, _, applications, *_ = scored
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        platform.batch.score("nope", applications)
    with pytest.raises(NotFoundError, match="no alias 'champion'"):
        platform.batch.score(MODEL, applications, alias="champion")
    with pytest.raises(DataError, match="applicant_id"):
        platform.batch.score(MODEL, applications.drop(columns=["applicant_id"]))
    with pytest.raises(DataError, match="already have output column"):
        platform.batch.score(MODEL, applications.assign(probability_of_default=0.5))
