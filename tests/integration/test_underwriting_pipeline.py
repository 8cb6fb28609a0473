"""The underwriting pipeline end to end on the synthetic data: generate → apply → backfill →
point-in-time training set, and the leakage test that proves the join keeps the future out."""

from __future__ import annotations

import logging

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mlplatform import Platform
from mlplatform.features.training_sets import get_training_set, load_training_set
from workloads.underwriting.pipeline import Config, run
from workloads.underwriting.training_set import LABEL, TIMESTAMP, entity_rows

PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50, "verbose": -1, "seed": 1}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("uw")
    platform = Platform.from_config({"storage": {"root": str(root)}})
    config = Config(
        data={"applications": 30_000, "merchants": 150, "seed": 11},
        model={"train": {"num_workers": 1, "num_boost_round": 80, "report_every": 40, "early_stopping_rounds": 20}},
        serve={"deploy": False},
    )
    result = run(platform, config)
    return platform, config, result


def _matrix(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    return np.column_stack([frame[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in features])


def _fit_auc(train: pd.DataFrame, test: pd.DataFrame, features: list[str]) -> float:
    labels = train[LABEL].to_numpy(dtype=np.float64)
    model = lgb.train(PARAMS, lgb.Dataset(_matrix(train, features), labels), num_boost_round=200)
    return roc_auc_score(test[LABEL].to_numpy(dtype=np.int64), model.predict(_matrix(test, features)))


def test_training_set_snapshot_is_complete_and_split_out_of_time(pipeline):
    platform, config, result = pipeline
    snapshot = result["training_set"]
    assert snapshot == get_training_set(platform.features, "underwriting_v1")
    frame = load_training_set(platform.features, "underwriting_v1").to_pandas()
    labelled = entity_rows(platform, config.data.end)
    # every labelled application appears exactly once: nothing dropped, nothing duplicated
    assert len(frame) == labelled.num_rows == snapshot.rows
    assert frame["application_id"].is_unique
    assert sum(s["rows"] for s in snapshot.splits.values()) == snapshot.rows
    by_split = frame.groupby("split")[TIMESTAMP].agg(["min", "max"])
    assert by_split.loc["train", "max"] < by_split.loc["validation", "min"]
    assert by_split.loc["validation", "max"] < by_split.loc["test", "min"]
    assert set(snapshot.feature_versions) == {"applicant_history", "merchant_risk", "merchant_activity", "checkout_features"}
    assert len(snapshot.content_hash) == 16


def test_point_in_time_model_is_in_band_and_leaky_join_scores_clearly_higher(pipeline):
    platform, config, result = pipeline
    snapshot = result["training_set"]
    frame = load_training_set(platform.features, "underwriting_v1").to_pandas()
    features = [ref.split(":")[1] for ref in snapshot.features]
    train = frame[frame["split"] != "test"]
    test = frame[frame["split"] == "test"]
    auc_pit = _fit_auc(train, test, features)
    assert 0.70 <= auc_pit <= 0.85, auc_pit

    # the leaky join: every application sees the latest feature values, ignoring time
    rows = entity_rows(platform, config.data.end).to_pandas()
    rows["as_of"] = pd.Timestamp(config.data.end)
    leaky = (
        platform.features.get_historical_features(rows, snapshot.features, entity_timestamp="as_of")
        .to_pandas()
        .merge(frame[["application_id", "split"]], on="application_id")
    )
    auc_leaky = _fit_auc(leaky[leaky["split"] != "test"], leaky[leaky["split"] == "test"], features)
    assert auc_leaky >= auc_pit + 0.05, (auc_pit, auc_leaky)


def test_rerun_is_a_noop_for_completed_steps(pipeline, caplog):
    platform, config, result = pipeline
    with caplog.at_level(logging.INFO, logger="mlplatform.jobs"):
        again = run(platform, config)
    lines = [record.getMessage() for record in caplog.records if record.name == "mlplatform.jobs"]
    assert any("[generate] up to date" in line for line in lines)
    assert sum("[backfill]" in line and "up to date" in line for line in lines) == 3
    assert any("[train] up to date" in line for line in lines)
    assert again["model"].version == result["model"].version
    assert again["apply"].changed == []
    assert again["training_set"].content_hash == result["training_set"].content_hash
    assert np.isfinite(again["training_set"].rows)
