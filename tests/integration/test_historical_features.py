"""get_historical_features through the platform (registry + offline store, local and S3)
against a brute-force oracle, and the shapes of entity input it accepts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlplatform import (
    Aggregation,
    DataError,
    DefinitionError,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    ParquetSource,
    Platform,
    RequestSource,
    on_demand_feature_view,
)
from mlplatform.features.store import offline_dataset

T0 = datetime(2024, 1, 1, tzinfo=UTC)
applicant = Entity(name="applicant", join_keys=["applicant_id"])
merchant = Entity(name="merchant", join_keys=["merchant_id"])
history = FeatureView(
    name="history",
    entities=[applicant],
    source=ParquetSource(name="ev", dataset="raw/ev", timestamp_field="ts", created_timestamp_field="known"),
    aggregations=[Aggregation(column="x", function="sum", window="30d", name="score")],
    ttl="5d",
)
merchant_stats = FeatureView(
    name="merchant_stats",
    entities=[merchant],
    source=ParquetSource(name="mev", dataset="raw/mev", timestamp_field="ts"),
    aggregations=[Aggregation(column="y", function="mean", window="30d", name="rate")],
)
request = RequestSource(name="req", schema=[Field(name="amount")])


@on_demand_feature_view(sources=[request, history], schema=[Field(name="amount_x_score")])
def amount_x_score(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"amount_x_score": df["amount"] * df["score"].fillna(0.0)}, index=df.index)


service = FeatureService(name="svc", features=["history:score", "merchant_stats:rate", "amount_x_score:amount_x_score"])


def _feature_rows(rng: np.random.Generator, n: int, keys: int, key: str, value: str, with_created: bool) -> pd.DataFrame:
    event = T0 + pd.to_timedelta(rng.integers(0, 20, n), unit="D")
    frame = pd.DataFrame(
        {
            key: rng.integers(0, keys, n),
            "event_timestamp": event,
            "created_timestamp": event + pd.to_timedelta(rng.integers(0, 3, n), unit="D") if with_created else event,
            value: rng.integers(0, 5, n).astype("float64"),
        }
    )
    # ties on event time with different created times
    tie = frame.sample(n=min(10, n), random_state=1).copy()
    tie["created_timestamp"] = tie["created_timestamp"] + pd.Timedelta(hours=1)
    tie[value] = tie[value] + 100
    return pd.concat([frame, tie], ignore_index=True)


def _oracle(entities: pd.DataFrame, rows: pd.DataFrame, key: str, value: str, ttl, as_known_at: bool) -> list:
    out = []
    for _, e in entities.iterrows():
        t = e["event_timestamp"]
        cand = rows[(rows[key] == e[key]) & (rows["event_timestamp"] <= t)]
        if ttl is not None:
            cand = cand[cand["event_timestamp"] >= t - ttl]
        if as_known_at:
            cand = cand[cand["created_timestamp"] <= t]
        if cand.empty:
            out.append(None)
            continue
        best = cand.sort_values(["event_timestamp", "created_timestamp", value]).iloc[-1]
        out.append(best[value])
    return out


@pytest.fixture(params=["local", "s3"])
def platform(request, tmp_path, ray_session):
    if request.param == "local":
        return Platform.from_config({"storage": {"root": str(tmp_path)}})
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Platform.from_config({"storage": {"root": f"s3://{bucket}/hf", "s3": {"endpoint_url": s3}}})


def _publish(platform: Platform, view: FeatureView, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    utc_us = pa.timestamp("us", tz="UTC")
    table = table.cast(pa.schema([pa.field(f.name, utc_us if pa.types.is_timestamp(f.type) else f.type) for f in table.schema]))
    platform.datasets.publish(
        offline_dataset(view.name),
        table,
        metadata={"data_version": view.data_version},
    )


@pytest.mark.parametrize("as_known_at", [False, True])
def test_matches_brute_force_oracle(platform, as_known_at):
    rng = np.random.default_rng(3)
    platform.features.apply([history, merchant_stats, amount_x_score, service])
    hist_rows = _feature_rows(rng, 150, 12, "applicant_id", "score", with_created=True)
    merch_rows = _feature_rows(rng, 80, 5, "merchant_id", "rate", with_created=False)
    _publish(platform, history, hist_rows)
    _publish(platform, merchant_stats, merch_rows)

    n = 120
    ts = T0 + pd.to_timedelta(rng.integers(-2 * 24, 24 * 24, n), unit="h")
    entities = pd.DataFrame(
        {
            "row": np.arange(n),
            "applicant_id": rng.integers(0, 14, n),  # ids 12, 13 have no features at all
            "merchant_id": rng.integers(0, 6, n),
            "event_timestamp": ts,
            "amount": rng.uniform(1, 10, n),
        }
    )
    entities = pd.concat([entities, entities.iloc[:5].assign(row=np.arange(n, n + 5))], ignore_index=True)  # duplicates
    # mixed naive / aware timestamps in one column: naive = UTC, other zones converted
    mixed = entities["event_timestamp"].astype(object).copy()
    mixed.iloc[::3] = [t.tz_convert(None) for t in entities["event_timestamp"].iloc[::3]]
    mixed.iloc[1::3] = [t.tz_convert("America/New_York") for t in entities["event_timestamp"].iloc[1::3]]
    given = entities.assign(event_timestamp=mixed)

    out = platform.features.get_historical_features(given, service, as_known_at=as_known_at).to_pandas()
    out = out.sort_values("row").reset_index(drop=True)
    assert len(out) == len(entities)
    assert list(out["row"]) == list(range(len(entities)))
    assert np.allclose(out["amount"], entities["amount"])

    want_score = _oracle(entities, hist_rows, "applicant_id", "score", timedelta(days=5), as_known_at)
    want_rate = _oracle(entities, merch_rows, "merchant_id", "rate", None, as_known_at)
    got_score = [None if pd.isna(v) else v for v in out["score"]]
    got_rate = [None if pd.isna(v) else v for v in out["rate"]]
    assert got_score == want_score
    assert got_rate == want_rate
    expected_odfv = entities["amount"] * pd.Series([0.0 if v is None else v for v in want_score])
    assert np.allclose(out["amount_x_score"], expected_odfv)
    assert any(v is None for v in want_score) and any(v is not None for v in want_score)


def test_entity_input_kinds_and_full_names(platform, tmp_path):
    platform.features.apply([merchant_stats])
    _publish(platform, merchant_stats, _feature_rows(np.random.default_rng(1), 30, 3, "merchant_id", "rate", False))
    entities = pd.DataFrame({"merchant_id": [0, 1, 2], "event_timestamp": [T0 + timedelta(days=30)] * 3, "tag": list("abc")})
    path = tmp_path / "entities.parquet"
    entities.to_parquet(path)
    ray = platform.ray()
    results = []
    for given in [entities, pa.Table.from_pandas(entities), ray.data.from_pandas(entities), str(path)]:
        out = platform.features.get_historical_features(given, ["merchant_stats:rate"], full_feature_names=True)
        results.append(out.to_pandas().sort_values("tag").reset_index(drop=True))
    for frame in results:
        assert list(frame.columns) == ["merchant_id", "event_timestamp", "tag", "merchant_stats__rate"]
        pd.testing.assert_frame_equal(frame, results[0])


def test_clear_errors(platform):
    platform.features.apply([merchant_stats, history])
    entities = pd.DataFrame({"merchant": [1], "applicant_id": [1], "event_timestamp": [T0]})
    with pytest.raises(DataError, match="has no offline data; run backfill"):
        platform.features.get_historical_features(entities, ["history:score"])
    _publish(platform, merchant_stats, _feature_rows(np.random.default_rng(1), 5, 3, "merchant_id", "rate", False))
    with pytest.raises(DataError, match="missing 'merchant_id' \\(join key of view 'merchant_stats'\\)"):
        platform.features.get_historical_features(entities, ["merchant_stats:rate"])
    with pytest.raises(DefinitionError, match="has no feature 'nope'"):
        platform.features.get_historical_features(entities, ["merchant_stats:nope"])
    with pytest.raises(DataError, match="entity_df must be"):
        platform.features.get_historical_features(42, ["merchant_stats:rate"])
