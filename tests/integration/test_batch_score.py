"""platform.batch on a real local Ray: a LightGBM model trained on point-in-time features
scores every application once, on the features it would have seen at that time; a torch
transformer scores the fraud sequences through the same actors, as its predictor and the
fraud workload's evaluation score them."""

from __future__ import annotations

from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import torch

from mlplatform import DataError, ModelError, NotFoundError, Platform
from mlplatform.batch.score import MODEL_NAME, MODEL_VERSION, REASONS, SCORE
from mlplatform.models.artifacts import serialize
from mlplatform.models.reasons import ReasonCoder, reason_texts_from_definitions
from workloads.fraud.model import FraudTransformer, TransformerConfig, flavor_config
from workloads.fraud.pipeline import _score, _score_columns
from workloads.fraud.sequences import SEQUENCE_COLUMNS, sequences_from_tables, to_tensors
from workloads.underwriting.features import DEFINITIONS
from workloads.underwriting.generate import DataConfig, generate_shard
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


# ------------------------------------------------------------------------------- torch
FRAUD = "fraud"
TINY = TransformerConfig(d_model=16, heads=2, layers=1, ff=32, dropout=0.0, max_events=8)


@pytest.fixture(scope="module")
def fraud(tmp_path_factory, ray_session):
    """Real sequences cut from generated raw tables (no Ray), a tiny fraud transformer
    registered as the workload registers it, then one lazy ``score_features`` run over them."""
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("batch-torch"))}})
    data = DataConfig(applications=800, merchants=10, seed=11, shards=1)
    tables = generate_shard(data, 0)
    sequences = sequences_from_tables(
        tables["applications"], tables["outcomes"], tables["repayment_events"], max_events=TINY.max_events, cutoff=data.end
    )
    torch.manual_seed(0)
    model = FraudTransformer(TINY).eval()
    platform.models.register(
        FRAUD, flavor="torch", model=model, flavor_config=flavor_config(TINY), lineage={}, metrics={}, params={}
    )
    rows = ray.data.from_arrow(sequences)
    scored = platform.batch.score_features(FRAUD, rows, alias=None, batch_size=64, num_actors=1).to_pandas()
    return platform, model, sequences, scored


def test_a_torch_model_scores_as_its_predictor_and_the_fraud_evaluation(fraud):
    platform, model, sequences, scored = fraud
    assert len(scored) == sequences.num_rows > 100 and scored["application_id"].is_unique
    assert set(scored["application_id"]) == set(sequences.column("application_id").to_pylist())
    assert (scored[MODEL_NAME] == FRAUD).all() and (scored[MODEL_VERSION] == 1).all()
    assert {*SEQUENCE_COLUMNS, "app_category", "app_log_amount", "split", "default"} <= set(scored.columns)
    got = scored.set_index("application_id").loc[sequences.column("application_id").to_pylist(), SCORE].to_numpy()
    assert got.dtype == np.float64 and got.std() > 0

    # the predictor on the whole table in one call, from the fraud workload's own tensors
    _, predictor = platform.models.load_predictor(FRAUD)
    inputs = {name: t.numpy() for name, t in to_tensors(sequences).items() if name != "label"}
    np.testing.assert_allclose(got, predictor.predict(inputs)["probability"], rtol=0, atol=1e-6)
    # the workload's evaluation path (its Ray Data task, called here on the whole table)
    table = sequences.select(["split", "default", *_score_columns()])
    evaluated = _score(table, config=TINY, weights=serialize("torch", model), batch_size=50)
    np.testing.assert_allclose(got, evaluated.column("score").to_numpy(), rtol=0, atol=1e-6)


def test_a_torch_model_refuses_reasons_the_feature_join_and_missing_inputs(fraud):
    platform, _, sequences, _ = fraud
    rows = ray.data.from_arrow(sequences)
    with pytest.raises(ModelError, match="reason codes explain LightGBM models only"):
        platform.batch.score_features(FRAUD, rows, alias=None, reasons=True)
    with pytest.raises(ModelError, match=r"not feature values: \['event_type \[-1, 8\]'.*score_features"):
        platform.batch.score(FRAUD, sequences.select(["application_id", "applicant_id", "application_ts"]), alias=None)
    with pytest.raises(DataError, match=r"lack model fraud v1's input columns \['mask'\]"):
        platform.batch.score_features(FRAUD, rows.drop_columns(["mask"]), alias=None)
