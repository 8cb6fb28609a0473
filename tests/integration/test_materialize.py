"""Materialization, push and online lookup through the platform, on a real local Ray, SQLite and
a real redis-server, checked against a brute-force oracle; and a materialization killed with
SIGKILL mid-write."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlplatform import (
    DataError,
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
from mlplatform.online import FeatureStatus
from mlplatform.features.materialize import TARGET_BUCKET_ROWS, materialize, materialize_incremental, read_state

T0 = datetime(2024, 1, 1, tzinfo=UTC)
applicant = Entity(name="applicant", join_keys=["applicant_id"])
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type="string")
history = FeatureView(
    name="history",
    entities=[applicant],
    source=ParquetSource(name="ev", dataset="raw/ev", timestamp_field="ts", created_timestamp_field="known"),
    schema=[Field(name="score"), Field(name="n", dtype="int64")],
    ttl="5d",
)
pair = FeatureView(
    name="pair",
    entities=[applicant, merchant],
    source=ParquetSource(name="pev", dataset="raw/pev", timestamp_field="ts"),
    schema=[Field(name="spend"), Field(name="tier", dtype="string")],
)
checkout = RequestSource(name="checkout", schema=[Field(name="amount")])


@on_demand_feature_view(sources=[checkout, history], schema=[Field(name="amount_x_score")])
def amount_x_score(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"amount_x_score": df["amount"] * df["score"].fillna(0.0)}, index=df.index)


service = FeatureService(name="svc", features=["history:score", "history:n", "amount_x_score:amount_x_score"])
UTC_US = pa.timestamp("us", tz="UTC")


def _platform(tmp_path, online: dict | None = None, **extra) -> Platform:
    config = {"project": f"t{uuid.uuid4().hex[:10]}", "storage": {"root": str(tmp_path / "root")}, **extra}
    if online is not None:
        config["online_store"] = online
    platform = Platform.from_config(config)
    platform.features.apply([history, pair, amount_x_score, service])
    return platform


def _history_rows(seed: int, keys: int, rows: int, days: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    event = T0 + pd.to_timedelta(rng.integers(0, days * 24, rows), unit="h")
    frame = pd.DataFrame(
        {
            "applicant_id": rng.integers(0, keys, rows),
            "event_timestamp": event,
            "created_timestamp": event + pd.to_timedelta(rng.integers(0, 3, rows), unit="h"),
            "score": rng.normal(size=rows).round(6),
            "n": rng.integers(0, 100, rows),
        }
    )
    # same event, known later, different value: the later-known row must win
    tie = frame.sample(n=rows // 10, random_state=seed).assign(
        created_timestamp=lambda f: f["created_timestamp"] + pd.Timedelta(minutes=30), score=lambda f: f["score"] + 1000
    )
    frame = pd.concat([frame, tie], ignore_index=True)
    return frame.drop_duplicates(["applicant_id", "event_timestamp", "created_timestamp"], keep="last")


def _publish_offline(platform: Platform, view: FeatureView, frame: pd.DataFrame) -> None:
    """Offline data as backfills write it: typed UTC µs timestamps, partitioned by event date."""
    frame = frame.assign(date=frame["event_timestamp"].dt.strftime("%Y-%m-%d"))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.cast(
        pa.schema([pa.field(f.name, UTC_US if pa.types.is_timestamp(f.type) else f.type) for f in table.schema])
    )
    platform.datasets.publish(
        offline_dataset(view.name), table, partition_by="date", metadata={"data_version": view.data_version}
    )


def _oracle(frame: pd.DataFrame, keys: list, start, end, now, ttl, features) -> dict:
    """Brute force: per key the latest row in (start, end], then the read-time rule at ``now``."""
    window = frame[(frame["event_timestamp"] <= end) & ((frame["event_timestamp"] > start) if start else True)]
    out = {}
    for key in keys:
        rows = window[window["applicant_id"] == key]
        if rows.empty:
            out[key] = ({f: None for f in features}, "NOT_FOUND")
            continue
        best = rows.sort_values(["event_timestamp", "created_timestamp"]).iloc[-1]
        if ttl is not None and best["event_timestamp"] < now - ttl:
            out[key] = ({f: None for f in features}, "OUTSIDE_MAX_AGE")
        else:
            out[key] = ({f: best[f].item() for f in features}, "PRESENT")
    return out


def _check_against_oracle(platform, frame, start, end, now):
    keys = list(range(int(frame["applicant_id"].max()) + 5))  # a few keys with no data at all
    expected = _oracle(frame, keys, start, end, now, history.ttl, ["score", "n"])
    got = platform.features.get_online_features(["history:score", "history:n"], {"applicant_id": keys}, now=now)
    table = got.to_dict()
    statuses = got.results[1].statuses
    for i, key in enumerate(keys):
        values, status = expected[key]
        assert statuses[i] == status, (key, statuses[i], status)
        assert table["score"][i] == values["score"] and table["n"][i] == values["n"], (key, table["score"][i], values)


# ---------------------------------------------------------------------------- materialize


@pytest.mark.parametrize(
    ("backend", "bucket_rows"),
    [
        ("sqlite", 100),  # many hash buckets: the shuffle path
        ("redis", TARGET_BUCKET_ROWS),  # one bucket: the single-task path
    ],
)
def test_materialize_and_incremental_match_the_oracle(backend, bucket_rows, tmp_path, ray_session, request, caplog):
    online = None
    if backend == "redis":
        online = {"type": "redis", "url": request.getfixturevalue("redis_server").url, "timeout": "2s"}
    platform = _platform(tmp_path, online)
    frame = _history_rows(seed=1, keys=40, rows=600)
    _publish_offline(platform, history, frame)
    caplog.set_level(logging.INFO, logger="mlplatform.features.materialize")  # what it says goes to logging
    tuning = {"bucket_rows": bucket_rows}

    start, end1, end2 = T0 + timedelta(days=4), T0 + timedelta(days=12), T0 + timedelta(days=20)
    (first,) = materialize(platform.features, start, end1, ["history"], **tuning)
    in_window = frame[(frame.event_timestamp > start) & (frame.event_timestamp <= end1)]
    assert first.mode == "full" and first.rows == in_window.applicant_id.nunique()
    _check_against_oracle(platform, frame, start, end1, now=end1)
    state = read_state(platform.features, "history")
    assert (state["start"], state["end"], state["generation"], state["offline_version"]) == (
        start.isoformat(), end1.isoformat(), first.generation, 1,
    )

    (second,) = materialize_incremental(platform.features, end2, **tuning)
    assert second.mode == "incremental" and second.generation == first.generation
    # incremental = the window grows to (start, end2]: later rows replace older ones per key
    _check_against_oracle(platform, frame, start, end2, now=end2)
    state = read_state(platform.features, "history")
    assert (state["start"], state["end"]) == (start.isoformat(), end2.isoformat())

    assert platform.features.materialize_incremental(end2) == []
    echoed = [record.getMessage() for record in caplog.records if record.name == "mlplatform.features.materialize"]
    assert any("nothing to do" in line for line in echoed)
    assert any("materialized history (full)" in line for line in echoed)


def test_multi_column_string_keys_and_first_incremental_run(tmp_path, ray_session):
    platform = _platform(tmp_path)
    rows = pd.DataFrame(
        {
            "applicant_id": [1, 1, 1, 2, 2],
            "merchant_id": ["m1", "m1", "m2", "m1", "{x}"],
            "event_timestamp": [T0, T0 + timedelta(days=1), T0, T0, T0 + timedelta(days=2)],
            "created_timestamp": [T0, T0 + timedelta(days=1), T0, T0, T0 + timedelta(days=2)],
            "spend": [1.0, 2.0, 3.0, None, 5.0],
            "tier": ["a", "b", None, "d", "e"],
        }
    )
    _publish_offline(platform, pair, rows)
    # no state yet: the first incremental run materializes everything up to end, in full
    (result,) = platform.features.materialize_incremental(T0 + timedelta(days=10), ["pair"])
    assert result.mode == "full" and result.rows == 4
    got = platform.features.get_online_features(
        ["pair:spend", "pair:tier"],
        {"applicant_id": [1, 1, 2, 2, 3], "merchant_id": ["m1", "m2", "m1", "{x}", "m1"]},
        now=T0 + timedelta(days=3),
    )
    assert got.metadata.feature_names == ["applicant_id", "merchant_id", "spend", "tier"]
    assert got.to_dict()["spend"] == [2.0, 3.0, None, 5.0, None]
    assert got.to_dict()["tier"] == ["b", None, "d", "e", None]
    assert got.results[2].statuses == ["PRESENT"] * 4 + ["NOT_FOUND"]


def test_named_view_without_offline_data_and_bad_window(tmp_path, ray_session):
    platform = _platform(tmp_path)
    with pytest.raises(DataError, match="no offline data"):
        platform.features.materialize(None, T0, ["history"])
    with pytest.raises(DataError, match="start < end"):
        platform.features.materialize(T0, T0, ["history"])
    assert platform.features.materialize(None, T0) == []  # nothing to do for any view


_CHILD = textwrap.dedent(
    """
    import json, sys
    from mlplatform import Platform
    from mlplatform.features.materialize import materialize

    platform = Platform.from_config(json.loads(sys.argv[1]))
    # small write batches: many short transactions, so the parent can catch it mid-write
    materialize(platform.features, None, sys.argv[2], ["history"], batch_rows=20)
    print("FINISHED", flush=True)
    """
)


def test_a_killed_materialization_leaves_the_previous_state_and_a_rerun_completes(tmp_path, ray_session):
    platform = _platform(tmp_path)
    end = T0 + timedelta(days=30)
    keys = list(range(1500))
    old = pd.DataFrame(
        {
            "applicant_id": keys,
            "event_timestamp": [T0 + timedelta(days=28)] * len(keys),
            "created_timestamp": [T0 + timedelta(days=28)] * len(keys),
            "score": [1.0] * len(keys),
            "n": [1] * len(keys),
        }
    )
    _publish_offline(platform, history, old)
    platform.features.materialize(None, end, ["history"])
    new = old.assign(event_timestamp=T0 + timedelta(days=29), created_timestamp=T0 + timedelta(days=29), score=2.0, n=2)
    _publish_offline(platform, history, new)  # replaces the offline data

    def scores() -> set:
        return set(platform.features.get_online_features(["history:score"], {"applicant_id": keys}, now=end).to_dict()["score"])

    config = {
        "project": platform.config.project,
        "storage": {"root": platform.config.storage.root},
        "ray": {"address": ray_session.get_runtime_context().gcs_address},
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(config), end.isoformat()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=os.getcwd(),
    )
    db = sqlite3.connect(platform.features.online_store.path, timeout=60, isolation_level=None)
    try:
        # Wait until the run has committed some rows into its new generation, then hold the
        # write lock so it can neither write more nor publish, and kill it right there.
        deadline = time.monotonic() + 120
        while True:
            db.execute("BEGIN IMMEDIATE")
            writing = db.execute("SELECT id FROM mlp_generations WHERE view = 'history' AND state = 'writing'").fetchone()
            if writing and db.execute(f"SELECT count(*) FROM mlp_rows_{writing[0]}").fetchone()[0] > 0:
                break
            db.execute("COMMIT")
            if child.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{child.stdout.read()}")
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.005)
        written = db.execute(f"SELECT count(*) FROM mlp_rows_{writing[0]}").fetchone()[0]
        assert 0 < written < len(keys)
        assert scores() == {1.0}  # readers see the previous generation while the run writes
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        db.execute("COMMIT")
    finally:
        if child.poll() is None:
            child.kill()
        db.close()
    assert child.returncode == -signal.SIGKILL
    assert scores() == {1.0}  # the killed run left the previous state intact

    (rerun,) = platform.features.materialize(None, end, ["history"])
    assert rerun.rows == len(keys) and scores() == {2.0}
    check = sqlite3.connect(platform.features.online_store.path)
    state = dict(check.execute("SELECT id, state FROM mlp_generations").fetchall())
    check.close()
    assert state[int(writing[0])] == "dropped"  # the orphan was superseded and its table removed


# -------------------------------------------------------------------------- push & lookup


def test_push_goes_online_and_offline_and_training_sees_it(tmp_path, ray_session):
    platform = _platform(tmp_path)
    _publish_offline(platform, history, _history_rows(seed=2, keys=5, rows=30, days=5))  # what a backfill wrote
    at = T0 + timedelta(days=6, hours=3)
    before = datetime.now(UTC)
    pushed = platform.features.push(
        "history",
        pd.DataFrame({"applicant_id": [1, 77], "event_timestamp": [at, at.replace(tzinfo=None)], "score": [42.0, 7], "n": [3, None]}),
    )
    assert pushed == 2
    got = platform.features.get_online_features(["history:score", "history:n"], {"applicant_id": [1, 77]}, now=at)
    assert got.to_dict() == {"applicant_id": [1, 77], "score": [42.0, 7.0], "n": [3, None]}
    assert got.results[1].event_timestamps == [at, at]

    offline = platform.datasets.get(offline_dataset("history"))
    assert f"{at:%Y-%m-%d}" in offline.partitions and offline.metadata["data_version"] == history.data_version
    table = platform.datasets.read_table(offline_dataset("history")).to_pandas()
    mine = table[table["event_timestamp"] == pd.Timestamp(at)]
    assert sorted(mine["applicant_id"]) == [1, 77] and "date" not in table.columns
    assert (mine["created_timestamp"] >= pd.Timestamp(before)).all()

    # a training set at the same instant sees exactly what serving saw
    entities = pd.DataFrame({"applicant_id": [1, 77], "event_timestamp": [at, at]})
    training = platform.features.get_historical_features(entities, ["history:score", "history:n"]).to_pandas()
    training = training.sort_values("applicant_id")
    assert training["score"].tolist() == [42.0, 7.0]

    # an older row pushed later does not replace the newer one online
    platform.features.push("history", [{"applicant_id": 1, "event_timestamp": at - timedelta(hours=1), "score": -1.0, "n": 0}], to="online")
    assert platform.features.get_online_features(["history:score"], {"applicant_id": [1]}, now=at).to_dict()["score"] == [42.0]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"applicant_id": 1, "event_timestamp": T0, "score": 1.0}], r"missing column\(s\) \['n'\]"),
        ([{"applicant_id": 1, "event_timestamp": T0, "score": 1.0, "n": 1, "extra": 0}], r"unknown column\(s\) \['extra'\]"),
        ([{"applicant_id": 1, "event_timestamp": T0, "created_timestamp": T0, "score": 1.0, "n": 1}], "set by push"),
        ([{"applicant_id": 1, "event_timestamp": T0, "score": "high", "n": 1}], r"column 'score' must hold numbers, got 'high'"),
        ([{"applicant_id": 1, "event_timestamp": T0, "score": 1.0, "n": 1.5}], r"column 'n' must hold integers, got 1.5"),
        ([{"applicant_id": "a", "event_timestamp": T0, "score": 1.0, "n": 1}], r"column 'applicant_id' must hold integers"),
        ([{"applicant_id": None, "event_timestamp": T0, "score": 1.0, "n": 1}], r"column 'applicant_id' must not be null"),
        ([{"applicant_id": 1, "event_timestamp": "yesterday", "score": 1.0, "n": 1}], r"column 'event_timestamp' must hold timestamps"),
    ],
)
def test_push_validates_rows_against_the_view(tmp_path, rows, message):
    platform = _platform(tmp_path)
    with pytest.raises(DataError, match=message):
        platform.features.push("history", rows)
    assert not platform.datasets.exists(offline_dataset("history"))  # nothing was written


def test_get_online_features_feast_shape_statuses_and_on_demand(tmp_path, ray_session):
    platform = _platform(tmp_path)
    now = T0 + timedelta(days=10)
    platform.features.push(
        "history",
        [
            {"applicant_id": 1, "event_timestamp": now - timedelta(days=1), "score": 2.0, "n": 5},
            {"applicant_id": 2, "event_timestamp": now - timedelta(days=6), "score": 3.0, "n": 6},  # older than ttl
        ],
    )
    entities = {"applicant_id": [1, 2, 3], "amount": [10.0, 20.0, 30.0]}
    response = platform.features.get_online_features("svc", entities, now=now)
    doc = response.to_json_dict()
    assert doc["metadata"]["feature_names"] == ["applicant_id", "score", "n", "amount_x_score"]
    keys, score, n, odfv = doc["results"]
    assert keys == {"values": [1, 2, 3], "statuses": ["PRESENT"] * 3, "event_timestamps": ["1970-01-01T00:00:00Z"] * 3}
    assert score == {
        "values": [2.0, None, None],
        "statuses": ["PRESENT", "OUTSIDE_MAX_AGE", "NOT_FOUND"],
        "event_timestamps": ["2024-01-10T00:00:00Z", "2024-01-05T00:00:00Z", "1970-01-01T00:00:00Z"],
    }
    assert n["values"] == [5, None, None]
    assert odfv["values"] == [20.0, 0.0, 0.0] and odfv["statuses"] == ["PRESENT"] * 3
    json.dumps(doc)  # serialisable as it is
    assert response.to_df().shape == (3, 4)
    full = platform.features.get_online_features(["history:score"], {"applicant_id": [1]}, full_feature_names=True, now=now)
    assert full.metadata.feature_names == ["applicant_id", "history__score"]

    # the on-demand feature online equals the training-set value at the same instant
    training = platform.features.get_historical_features(
        pd.DataFrame({"applicant_id": [1, 2, 3], "amount": [10.0, 20.0, 30.0], "event_timestamp": [now] * 3}), "svc"
    ).to_pandas().sort_values("applicant_id")
    assert training["amount_x_score"].tolist() == odfv["values"]

    with pytest.raises(DataError, match=r"'amount' \(request field"):
        platform.features.get_online_features("svc", {"applicant_id": [1]}, now=now)
    with pytest.raises(DataError, match="one length"):
        platform.features.get_online_features("svc", {"applicant_id": [1, 2], "amount": [1.0]}, now=now)
    assert FeatureStatus.OUTSIDE_MAX_AGE == "OUTSIDE_MAX_AGE"
