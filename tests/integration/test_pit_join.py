"""The distributed point-in-time join against a brute-force oracle, on a real local Ray."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mlplatform.errors import DataError
from mlplatform.timestamps import UTC_MICROS
from mlplatform.features import _hash_shuffle
from mlplatform.features.pit_join import ViewJoin, point_in_time_join

pytestmark = pytest.mark.integration

BASE = datetime(2024, 6, 1, tzinfo=timezone.utc)


def _minutes(values) -> list[datetime | None]:
    return [None if v is None else BASE + timedelta(minutes=int(v)) for v in values]


# ---------------------------------------------------------------------------------------------
# Oracle: for each entity row and view, scan that key's feature rows.


def _rank_value(v):
    if v is None:
        return (0,)
    if isinstance(v, float) and math.isnan(v):
        return (1,)
    return (2, v)


def oracle(entity_rows, view_rows, *, keys, columns, ttl, as_known_at, has_created):
    by_key: dict[tuple, list[dict]] = {}
    for f in view_rows:
        k = tuple(f[c] for c in keys)
        if None not in k and f["event_ts"] is not None:
            by_key.setdefault(k, []).append(f)
    answers = []
    for e in entity_rows:
        t = e["ts"]
        k = tuple(e[c] for c in keys)
        best, best_rank = None, None
        for f in by_key.get(k, []) if t is not None and None not in k else []:
            created = f.get("created_ts") if has_created else None
            created = f["event_ts"] if created is None else created
            if f["event_ts"] > t or (ttl is not None and f["event_ts"] < t - ttl) or (as_known_at and created > t):
                continue
            rank = (f["event_ts"], created, tuple(_rank_value(f[c]) for c in columns))
            if best_rank is None or rank > best_rank:
                best, best_rank = f, rank
        answers.append(best)
    return answers


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# ---------------------------------------------------------------------------------------------
# Random data: applicants and merchants, a few blocks each.


def make_data(seed: int, n_entities: int = 400, n_features: int = 1500):
    rng = np.random.default_rng(seed)

    def maybe_null(values, p):
        return [None if rng.random() < p else v for v in values]

    applicants = maybe_null(rng.integers(0, 40, n_entities).tolist(), 0.03)
    merchants = maybe_null([f"m{i}" for i in rng.integers(0, 15, n_entities)], 0.03)
    ts = maybe_null(rng.integers(0, 600, n_entities).tolist(), 0.02)
    entities = pd.DataFrame({
        "applicant_id": pd.array(applicants, dtype="Int64"),
        "merchant_id": merchants,
        "ts": pd.Series(_minutes(ts), dtype="datetime64[us, UTC]").dt.tz_localize(None),  # naive = UTC
        "amount": rng.integers(1, 1000, n_entities).astype(float),
    })
    # Duplicate entity rows: same keys and time, each must come back.
    entities = pd.concat([entities, entities.iloc[: n_entities // 10]], ignore_index=True)
    entities.insert(0, "row_id", np.arange(len(entities)))

    def feature_frame(key_columns: dict, with_created: bool, value_kind: str):
        event = rng.integers(-100, 650, n_features)
        frame = pd.DataFrame(key_columns)
        frame["event_ts"] = pd.Series(_minutes(maybe_null(event.tolist(), 0.01)), dtype="datetime64[us, UTC]")
        if with_created:
            delay = rng.integers(-5, 60, n_features)
            frame["created_ts"] = pd.Series(
                _minutes(maybe_null((event + delay).tolist(), 0.05)), dtype="datetime64[us, UTC]"
            )
        if value_kind == "float":
            values = rng.choice([0.1, 0.2, 0.3, np.nan], n_features).tolist()
            frame["x"] = pd.array(maybe_null(values, 0.05), dtype=object).astype(float)
            frame["y"] = rng.integers(0, 5, n_features)
        else:
            frame["z"] = maybe_null([f"r{i}" for i in rng.integers(0, 4, n_features)], 0.05)
        return frame

    applicant_stats = feature_frame(
        {"applicant_id": pd.array(maybe_null(rng.integers(0, 45, n_features).tolist(), 0.02), dtype="Int64")},
        True, "float",
    )
    merchant_risk = feature_frame(
        {"merchant_id": maybe_null([f"m{i}" for i in rng.integers(0, 18, n_features)], 0.02)}, False, "str"
    )
    pair = feature_frame(
        {
            "applicant_id": pd.array(rng.integers(0, 40, n_features), dtype="Int32"),
            "merchant_id": [f"m{i}" for i in rng.integers(0, 15, n_features)],
        },
        True, "str",
    )
    return entities, {"applicant_stats": applicant_stats, "merchant_risk": merchant_risk, "pair": pair}


def _dataset(ray, frame: pd.DataFrame, blocks: int):
    cuts = np.linspace(0, len(frame), blocks + 1).astype(int)
    return ray.data.from_arrow([pa.Table.from_pandas(frame.iloc[a:b], preserve_index=False)
                                for a, b in zip(cuts, cuts[1:])])


def collect(ray, ds) -> pa.Table:
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def _rows(frame: pd.DataFrame) -> list[dict]:
    out = []
    for record in pa.Table.from_pandas(frame, preserve_index=False).to_pylist():
        if "ts" in record and record["ts"] is not None and record["ts"].tzinfo is None:
            record["ts"] = record["ts"].replace(tzinfo=timezone.utc)
        out.append(record)
    return out


VIEW_SPECS = {
    # name: (join keys, feature columns, ttl, has created)
    "applicant_stats": (("applicant_id",), ("x", "y"), timedelta(hours=3), True),
    "merchant_risk": (("merchant_id",), ("z",), None, False),
    "pair": (("applicant_id", "merchant_id"), ("z",), timedelta(minutes=90), True),
}


@pytest.mark.parametrize(
    ("seed", "num_partitions", "as_known_at", "one_block_per_task"),
    [(1, 3, False, True), (2, None, True, False), (3, 1, True, True), (4, 2, False, False)],
)
def test_distributed_join_matches_oracle(ray_session, monkeypatch, seed, num_partitions, as_known_at,
                                         one_block_per_task):
    ray = ray_session
    if one_block_per_task:
        monkeypatch.setattr(_hash_shuffle, "PARTITION_BATCH_BYTES", 1)
    entities, features = make_data(seed)
    views = [
        ViewJoin(name, keys, _dataset(ray, features[name], blocks=3), "event_ts",
                 "created_ts" if created else None, columns, ttl)
        for name, (keys, columns, ttl, created) in VIEW_SPECS.items()
    ]
    out = point_in_time_join(_dataset(ray, entities, blocks=4), views, entity_ts="ts", as_known_at=as_known_at,
                             full_feature_names=True, include_event_timestamps=True, num_partitions=num_partitions)
    table = collect(ray, out)
    assert table.num_rows == len(entities)
    assert table.schema.field("ts").type == UTC_MICROS
    got = {row["row_id"]: row for row in table.to_pylist()}
    assert sorted(got) == entities["row_id"].tolist(), "every entity row exactly once"

    entity_rows = _rows(entities)
    for row in entity_rows:
        assert got[row["row_id"]]["amount"] == row["amount"]
        assert got[row["row_id"]]["ts"] == row["ts"]
        assert got[row["row_id"]]["merchant_id"] == row["merchant_id"]
    matched = 0
    for name, (keys, columns, ttl, created) in VIEW_SPECS.items():
        expected = oracle(entity_rows, _rows(features[name]), keys=keys, columns=columns, ttl=ttl,
                          as_known_at=as_known_at, has_created=created)
        for row, want in zip(entity_rows, expected):
            have = got[row["row_id"]]
            for column in columns:
                assert _same(have[f"{name}__{column}"], None if want is None else want[column]), (name, row, want)
            assert have[f"{name}__event_timestamp"] == (None if want is None else want["event_ts"])
            matched += want is not None
    assert matched > 0.3 * len(entity_rows), "the data should exercise matches, not only nulls"


def test_mixed_naive_and_aware_entity_times_in_pandas_blocks(ray_session):
    ray = ray_session
    naive = datetime(2024, 6, 1, 12, 0)  # 12:00 UTC
    aware = datetime(2024, 6, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))  # 12:00 UTC
    west = datetime(2024, 6, 1, 4, 59, tzinfo=timezone(timedelta(hours=-7)))  # 11:59 UTC
    mixed = pd.Series([naive, aware, west], dtype=object)
    entities = ray.data.from_pandas(pd.DataFrame({"row": [0, 1, 2], "applicant_id": [1, 1, 1], "ts": mixed}))
    features = ray.data.from_arrow(pa.table({
        "applicant_id": [1, 1],
        "event_ts": pa.array([datetime(2024, 6, 1, 12, 0), datetime(2024, 6, 1, 12, 1)], pa.timestamp("us", tz="UTC")),
        "v": [10, 11],
    }))
    view = ViewJoin("a", ("applicant_id",), features, "event_ts", None, ("v",), None)
    out = point_in_time_join(entities, [view], entity_ts="ts")
    out = collect(ray, out).sort_by("row")
    assert out.column("v").to_pylist() == [10, 10, None]
    assert out.column("ts").type == UTC_MICROS


def test_missing_entity_column_is_named_with_the_available_ones(ray_session):
    ray = ray_session
    entities = ray.data.from_arrow(pa.table({"applicant_id": [1], "when": pa.array([BASE], UTC_MICROS)}))
    features = ray.data.from_arrow(pa.table({"merchant_id": ["m"], "event_ts": pa.array([BASE], UTC_MICROS), "v": [1]}))
    view = ViewJoin("m", ("merchant_id",), features, "event_ts", None, ("v",), None)
    with pytest.raises(DataError, match=r"'ts' is not in the entity dataset; available columns: \['applicant_id', 'when'\]"):
        point_in_time_join(entities, [view], entity_ts="ts")
    with pytest.raises(DataError, match=r"'merchant_id' \(join key of view 'm'\) is not in the entity dataset"):
        point_in_time_join(entities, [view], entity_ts="when")


def test_output_name_collisions_are_refused(ray_session):
    ray = ray_session
    entities = ray.data.from_arrow(pa.table({"k": [1], "ts": pa.array([BASE], UTC_MICROS), "v": [0]}))
    features = ray.data.from_arrow(pa.table({"k": [1], "event_ts": pa.array([BASE], UTC_MICROS), "v": [1], "w": [2]}))
    one = ViewJoin("one", ("k",), features, "event_ts", None, ("w",), None)
    two = ViewJoin("two", ("k",), features, "event_ts", None, ("w",), None)
    with pytest.raises(DataError, match="'one' and 'two' would both output column 'w'"):
        point_in_time_join(entities, [one, two], entity_ts="ts")
    out = collect(ray, point_in_time_join(entities, [one, two], entity_ts="ts", full_feature_names=True))
    assert out.select(["one__w", "two__w"]).to_pylist() == [{"one__w": 2, "two__w": 2}]
    clash = ViewJoin("three", ("k",), features, "event_ts", None, ("v",), None)
    with pytest.raises(DataError, match="already has"):
        point_in_time_join(entities, [clash], entity_ts="ts")


def test_empty_entity_dataset_gives_empty_typed_result(ray_session):
    ray = ray_session
    entities = ray.data.from_arrow(pa.table({"k": pa.array([], pa.int64()), "ts": pa.array([], UTC_MICROS)}))
    features = ray.data.from_arrow(pa.table({"k": [1], "event_ts": pa.array([BASE], UTC_MICROS), "v": [1.5]}))
    out = point_in_time_join(entities, [ViewJoin("f", ("k",), features, "event_ts", None, ("v",), None)],
                             entity_ts="ts", num_partitions=2)
    out = collect(ray, out)
    assert out.num_rows == 0
    assert out.schema.field("v").type == pa.float64()


def test_view_without_feature_rows_gives_nulls_not_missing_rows(ray_session):
    ray = ray_session
    entities = ray.data.from_arrow(pa.table({"k": [1, 2, 2], "ts": pa.array([BASE] * 3, UTC_MICROS)}))
    no_rows = pa.table({"k": pa.array([], pa.int64()), "event_ts": pa.array([], UTC_MICROS), "v": pa.array([], pa.float64())})
    features = ray.data.from_arrow(no_rows).filter(expr="k > 0")  # zero rows, possibly zero blocks
    out = point_in_time_join(entities, [ViewJoin("f", ("k",), features, "event_ts", None, ("v",), None)],
                             entity_ts="ts", include_event_timestamps=True)
    out = collect(ray, out)
    assert sorted(out.column("k").to_pylist()) == [1, 2, 2]
    assert out.column("v").to_pylist() == [None] * 3
    assert out.schema.field("f__event_timestamp").type == UTC_MICROS
