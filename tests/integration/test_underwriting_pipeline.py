"""The underwriting pipeline end to end on the synthetic data: generate → apply → event logs →
backfill → point-in-time training set (real-time features included) → online event state, and
the leakage test that proves the join keeps the future out."""

from __future__ import annotations

import logging

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mlplatform import Platform
from mlplatform.features.event_log import ARRIVAL, read_events
from mlplatform.features.training_sets import get_training_set, load_training_set
from mlplatform.timestamps import CREATED_TIMESTAMP
from workloads.underwriting.event_history import STREAM_TABLES, load_online
from workloads.underwriting.features import REALTIME_FEATURES
from workloads.underwriting.pipeline import RAW_PREFIX, Config, run
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
    assert set(snapshot.feature_versions) == {
        "applicant_history", "merchant_risk", "merchant_activity", "checkout_features",
        "applicant_checkouts", "recent_repayments", "live_activity_features",
    }  # fmt: skip
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


def test_event_logs_hold_the_generated_streams(pipeline):
    platform = pipeline[0]
    for source in platform.features.list_stream_sources():
        raw = platform.datasets.read_table(f"{RAW_PREFIX}/{STREAM_TABLES[source.name]}").to_pandas()
        logged = read_events(platform.storage, source).to_pandas()
        assert len(logged) == len(raw) > 0, source.name
        assert logged[source.event_id_field].is_unique, source.name
        assert set(logged[source.event_id_field]) == set(raw[source.event_id_field]), source.name
        assert (logged[CREATED_TIMESTAMP] >= logged[source.timestamp_field]).all(), source.name
        assert sorted(logged[ARRIVAL]) == list(range(1, len(raw) + 1)), source.name
        joined = raw.merge(logged, on=source.event_id_field, suffixes=("", "_log"))
        assert (joined["known_ts"] == joined[CREATED_TIMESTAMP]).all(), source.name
        assert (joined[source.timestamp_field] == joined[f"{source.timestamp_field}_log"]).all(), source.name


def _window(events: pd.DataFrame, applicant: int, t: pd.Timestamp, time: str, window: pd.Timedelta) -> pd.DataFrame:
    mine = events[(events["applicant_id"] == applicant) & (events["known_ts"] <= t)]
    return mine[(mine[time] > t - window) & (mine[time] <= t)]


def test_training_set_realtime_columns_equal_a_brute_force_count(pipeline):
    """For rows with stacked checkouts, a fresh missed installment, and at random: the
    training set's real-time values are the events real and known at the row's time."""
    platform = pipeline[0]
    frame = load_training_set(platform.features, "underwriting_v1").to_pandas()
    checkouts = platform.datasets.read_table(f"{RAW_PREFIX}/checkout_events").to_pandas()
    repayments = platform.datasets.read_table(f"{RAW_PREFIX}/repayment_events").to_pandas()
    rows = pd.concat([
        frame[frame["checkouts_24h"] > 0].head(40), frame[frame["missed_installments_7d"] > 0].head(40),
        frame.sample(40, random_state=3),
    ]).drop_duplicates("application_id")  # fmt: skip
    assert (rows["checkouts_24h"] > 0).sum() >= 20 and (rows["missed_installments_7d"] > 0).sum() >= 20
    for row in rows.itertuples():
        t, who = row.application_ts, row.applicant_id
        day = _window(checkouts, who, t, "checkout_ts", pd.Timedelta(hours=24))
        week = _window(repayments, who, t, "event_ts", pd.Timedelta(days=7))
        month = _window(repayments, who, t, "event_ts", pd.Timedelta(days=30)).sort_values(["event_ts", "known_ts"])
        assert row.checkouts_1h == len(_window(checkouts, who, t, "checkout_ts", pd.Timedelta(hours=1))), row
        assert row.checkouts_24h == len(day), row
        assert row.checkout_amount_24h == pytest.approx(day["amount"].sum()), row
        assert row.missed_installments_7d == week["is_missed"].sum(), row
        assert row.late_payments_7d == week["is_late"].sum(), row
        worst = month["days_past_due"].tail(3).max() if len(month) else None
        assert (pd.isna(row.worst_recent_days_past_due) and worst is None) or row.worst_recent_days_past_due == worst, row
        assert row.application_id not in set(day["application_id"])  # its own checkout is known a second later


def test_online_event_state_is_the_log_for_the_retention_window(pipeline):
    """Loaded into the online store as of the data's end, the real-time features read online
    at that time equal the training-set values at that time, for every applicant active then."""
    platform, config, _ = pipeline
    end = config.data.end
    for view in platform.features.list_feature_views():
        if view.is_realtime:
            assert load_online(platform.features, view, now=end) > 0, view.name
    apps = platform.datasets.read_table(f"{RAW_PREFIX}/applications").to_pandas()
    active = apps[apps["application_ts"] > pd.Timestamp(end) - pd.Timedelta(days=30)].drop_duplicates("applicant_id")
    names = [ref.split(":")[1] for ref in REALTIME_FEATURES]
    keys = {"applicant_id": active["applicant_id"].tolist()}
    online = pd.DataFrame(platform.features.get_online_features(REALTIME_FEATURES, keys, now=end).to_dict())
    online = online.set_index("applicant_id")[names]
    rows = active.assign(at=end)[["applicant_id", "at"]]
    offline = platform.features.get_historical_features(rows, REALTIME_FEATURES, entity_timestamp="at").to_pandas()
    offline = offline.set_index("applicant_id")[names]
    assert len(online) == len(offline) == len(active) > 100
    assert np.array_equal(online.loc[offline.index.to_numpy()].to_numpy(float), offline.to_numpy(float))
    assert (online["checkouts_24h"] > 0).any() and (online["late_payments_7d"] > 0).any()


def test_rerun_is_a_noop_for_completed_steps(pipeline, caplog):
    platform, config, result = pipeline
    with caplog.at_level(logging.INFO, logger="mlplatform.jobs"):
        again = run(platform, config)
    lines = [record.getMessage() for record in caplog.records if record.name == "mlplatform.jobs"]
    assert any("[generate] up to date" in line for line in lines)
    assert sum("[event log]" in line and "up to date" in line for line in lines) == 2
    assert sum("[backfill]" in line and "up to date" in line for line in lines) == 3
    assert any("[train] up to date" in line for line in lines)
    assert again["model"].version == result["model"].version
    assert again["apply"].changed == []
    assert again["training_set"].content_hash == result["training_set"].content_hash
    assert np.isfinite(again["training_set"].rows)
