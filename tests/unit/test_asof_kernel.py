"""The as-of join kernel against a brute-force oracle, plus its exact boundaries."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplatform.errors import DataError
from mlplatform.features._asof import asof_join
from mlplatform.timestamps import UTC_MICROS, to_utc

BASE = datetime(2024, 3, 1, tzinfo=timezone.utc)
ZONES = [timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-7))]


# ---------------------------------------------------------------------------------------------
# The oracle: for each entity row, scan every feature row. Slow and obviously right.


def _tiebreak_value(v):
    if v is None:
        return (0,)
    if isinstance(v, float) and math.isnan(v):
        return (1,)
    return (2, v)


def oracle(entities: list[dict], features: list[dict], *, keys, ttl, as_known_at, feature_columns, has_created):
    """Per entity row: the winning feature row (dict) or None."""
    answers = []
    for e in entities:
        t = e["ts"]
        if t is None or any(e[k] is None for k in keys):
            answers.append(None)
            continue
        best, best_rank = None, None
        for f in features:
            if any(f[k] is None or f[k] != e[k] for k in keys) or f["event_ts"] is None:
                continue
            event = f["event_ts"]
            created = f.get("created_ts") if has_created else None
            created = event if created is None else created
            if event > t or (ttl is not None and event < t - ttl):
                continue
            if as_known_at and created > t:
                continue
            rank = (event, created, tuple(_tiebreak_value(f[c]) for c in feature_columns))
            if best_rank is None or rank > best_rank:
                best, best_rank = f, rank
        answers.append(best)
    return answers


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_matches_oracle(out: pa.Table, entities, features, *, keys, ttl, as_known_at, feature_columns,
                          output_names, has_created, event_ts_output=None):
    expected = oracle(entities, features, keys=keys, ttl=ttl, as_known_at=as_known_at,
                      feature_columns=feature_columns, has_created=has_created)
    rows = out.to_pylist()
    assert len(rows) == len(entities)
    for i, (row, e, want) in enumerate(zip(rows, entities, expected)):
        assert row["row_id"] == e["row_id"], "entity order must be kept"
        assert row["extra"] == e["extra"], "entity columns pass through unchanged"
        for column, name in zip(feature_columns, output_names):
            value = None if want is None else want[column]
            assert _same(row[name], value), (i, name, row[name], value, e, want)
        if event_ts_output:
            assert row[event_ts_output] == (None if want is None else want["event_ts"])


# ---------------------------------------------------------------------------------------------
# Random data: few keys and few distinct minutes, so ties, duplicates, stale-only, future-only
# and no-match rows all come up constantly.

KEY_MODES = {
    "int": (["applicant_id"], [st.sampled_from([1, 2, 3, -7, None])]),
    "str": (["merchant_id"], [st.sampled_from(["m-a", "m-b", "ü", "", None])]),
    "multi": (["applicant_id", "merchant_id"], [st.sampled_from([1, 2, None]), st.sampled_from(["x", "y", None])]),
}


def _minute(m: int) -> datetime:
    return BASE + timedelta(minutes=m)


def _as_mixed_input(t: datetime | None, style: int):
    """The same instant as naive-UTC datetime, aware datetime in another zone, or pd.Timestamp."""
    if t is None:
        return None
    if style == 0:
        return t.replace(tzinfo=None)
    if style == 1:
        return t.astimezone(ZONES[0])
    if style == 2:
        return pd.Timestamp(t).tz_convert("America/New_York")
    return t.astimezone(ZONES[1])


@st.composite
def scenario(draw):
    mode = draw(st.sampled_from(sorted(KEY_MODES)))
    keys, key_strategies = KEY_MODES[mode]
    minute = st.integers(0, 12)
    has_created = draw(st.booleans())
    n_features = draw(st.integers(0, 25))
    features = []
    for _ in range(n_features):
        row = {k: draw(s) for k, s in zip(keys, key_strategies)}
        event = draw(st.one_of(minute.map(_minute), st.just(None)) if draw(st.integers(0, 9)) == 0 else minute.map(_minute))
        row["event_ts"] = event
        if has_created:
            delay = draw(st.one_of(st.none(), st.integers(-2, 4)))
            row["created_ts"] = None if delay is None or event is None else event + timedelta(minutes=delay)
        row["score"] = draw(st.one_of(st.none(), st.just(float("nan")), st.sampled_from([0.5, 1.5, -2.0])))
        row["label"] = draw(st.one_of(st.none(), st.sampled_from(["a", "b", "é"])))
        features.append(row)
    n_entities = draw(st.integers(0, 20))
    entities = []
    for i in range(n_entities):
        if entities and draw(st.integers(0, 4)) == 0:
            dup = dict(entities[draw(st.integers(0, len(entities) - 1))])
            dup["row_id"] = i
            entities.append(dup)  # duplicate entity row: same keys and timestamp
            continue
        row = {k: draw(s) for k, s in zip(keys, key_strategies)}
        row["ts"] = draw(st.one_of(st.integers(-2, 15).map(_minute), st.just(None)) if i % 7 == 6 else st.integers(-2, 15).map(_minute))
        row["style"] = draw(st.integers(0, 3))
        row["row_id"] = i
        row["extra"] = draw(st.sampled_from(["p", "q", None]))
        entities.append(row)
    ttl = draw(st.one_of(st.none(), st.integers(0, 6).map(lambda m: timedelta(minutes=m))))
    as_known_at = draw(st.booleans())
    return keys, entities, features, has_created, ttl, as_known_at


def _entity_table(keys, entities) -> pa.Table:
    # Timestamps arrive as a pandas object column mixing naive and aware values; to_utc fixes them.
    mixed = pd.Series([_as_mixed_input(e["ts"], e["style"]) for e in entities], dtype=object)
    columns = {k: pa.array([e[k] for e in entities], type=_key_type(k)) for k in keys}
    columns["ts"] = to_utc(mixed) if entities else pa.array([], UTC_MICROS)
    columns["row_id"] = pa.array([e["row_id"] for e in entities], pa.int64())
    columns["extra"] = pa.array([e["extra"] for e in entities], pa.string())
    return pa.table(columns)


def _feature_table(keys, features, has_created) -> pa.Table:
    columns = {k: pa.array([f[k] for f in features], type=_key_type(k)) for k in keys}
    columns["event_ts"] = pa.array([f["event_ts"] for f in features], UTC_MICROS)
    if has_created:
        columns["created_ts"] = pa.array([f["created_ts"] for f in features], UTC_MICROS)
    columns["score"] = pa.array([f["score"] for f in features], pa.float64(), from_pandas=False)
    columns["label"] = pa.array([f["label"] for f in features], pa.string())
    return pa.table(columns)


def _key_type(name: str) -> pa.DataType:
    return pa.int64() if name == "applicant_id" else pa.string()


def _split_chunks(table: pa.Table, pieces: int) -> pa.Table:
    """The same rows in several chunks, as blocks concatenated by Ray would arrive."""
    if table.num_rows < 2 or pieces < 2:
        return table
    cut = sorted({max(1, table.num_rows * i // pieces) for i in range(1, pieces)})
    bounds = [0, *cut, table.num_rows]
    return pa.concat_tables([table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(), st.integers(1, 3), st.randoms(use_true_random=False))
def test_kernel_matches_brute_force_oracle(case, pieces, rnd):
    keys, entities, features, has_created, ttl, as_known_at = case
    feature_table = _feature_table(keys, features, has_created)
    # Shuffling the feature rows must not change any answer (tie-breaks are order-free).
    perm = list(range(feature_table.num_rows))
    rnd.shuffle(perm)
    feature_table = _split_chunks(feature_table.take(pa.array(perm, pa.int64())), pieces)
    out = asof_join(
        _split_chunks(_entity_table(keys, entities), pieces),
        feature_table,
        join_keys=keys,
        entity_ts="ts",
        event_ts="event_ts",
        created_ts="created_ts" if has_created else None,
        feature_columns=["score", "label"],
        ttl=ttl,
        as_known_at=as_known_at,
        output_names=["v__score", "v__label"],
        event_ts_output="v__event_timestamp",
    )
    assert out.column("ts").type == UTC_MICROS
    assert_matches_oracle(out, entities, features, keys=keys, ttl=ttl, as_known_at=as_known_at,
                          feature_columns=["score", "label"], output_names=["v__score", "v__label"],
                          has_created=has_created, event_ts_output="v__event_timestamp")


def test_kernel_matches_oracle_when_times_need_rank_compression():
    # Times spanning centuries with many keys overflow the (key, offset) int64 encoding, which
    # forces the rank-compressed path.
    rng = np.random.default_rng(7)
    n_keys = 5_000
    far = [datetime(1900, 1, 1, tzinfo=timezone.utc), datetime(2200, 1, 1, tzinfo=timezone.utc)]
    ev = [far[i % 2] + timedelta(seconds=int(s)) for i, s in enumerate(rng.integers(0, 50, 4000))]
    features = [{"applicant_id": int(k) * 1_000_003, "event_ts": e, "score": float(i), "label": None}
                for i, (k, e) in enumerate(zip(rng.integers(0, n_keys, 4000), ev))]
    entities = [{"applicant_id": int(k) * 1_000_003, "ts": far[i % 2] + timedelta(seconds=int(s)), "row_id": i,
                 "extra": None, "style": 0}
                for i, (k, s) in enumerate(zip(rng.integers(0, n_keys, 500), rng.integers(-5, 60, 500)))]
    out = asof_join(_entity_table(["applicant_id"], entities), _feature_table(["applicant_id"], features, False),
                    join_keys=["applicant_id"], entity_ts="ts", event_ts="event_ts", created_ts=None,
                    feature_columns=["score"], ttl=timedelta(seconds=20), as_known_at=False, output_names=["score"])
    assert_matches_oracle(out, entities, features, keys=["applicant_id"], ttl=timedelta(seconds=20),
                          as_known_at=False, feature_columns=["score"], output_names=["score"], has_created=False)


# ---------------------------------------------------------------------------------------------
# Exact boundaries, readable.


def _join(entity_rows, feature_rows, *, ttl=None, as_known_at=False, created=True):
    entities = pa.table({
        "applicant_id": pa.array([r[0] for r in entity_rows], pa.int64()),
        "ts": pa.array([r[1] for r in entity_rows], UTC_MICROS),
    })
    columns = {
        "applicant_id": pa.array([r[0] for r in feature_rows], pa.int64()),
        "event_ts": pa.array([r[1] for r in feature_rows], UTC_MICROS),
        "value": pa.array([r[-1] for r in feature_rows], pa.int64()),
    }
    if created:
        columns["created_ts"] = pa.array([r[2] for r in feature_rows], UTC_MICROS)
    out = asof_join(entities, pa.table(columns), join_keys=["applicant_id"], entity_ts="ts", event_ts="event_ts",
                    created_ts="created_ts" if created else None, feature_columns=["value"], ttl=ttl,
                    as_known_at=as_known_at, output_names=["value"])
    return out.column("value").to_pylist()


T = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
US = timedelta(microseconds=1)


def test_event_at_exactly_the_entity_time_is_used_and_one_microsecond_later_is_not():
    assert _join([(1, T)], [(1, T, T, 10)]) == [10]
    assert _join([(1, T)], [(1, T + US, T + US, 10)]) == [None]


def test_ttl_lower_bound_is_inclusive():
    ttl = timedelta(days=1)
    assert _join([(1, T)], [(1, T - ttl, T - ttl, 10)], ttl=ttl) == [10]
    assert _join([(1, T)], [(1, T - ttl - US, T - ttl, 10)], ttl=ttl) == [None]
    assert _join([(1, T)], [(1, T - ttl - US, T - ttl, 10)], ttl=None) == [10]


def test_stale_newest_row_means_null_even_if_nothing_fresher_exists():
    rows = [(1, T - timedelta(hours=5), T - timedelta(hours=5), 1), (1, T + timedelta(hours=1), T, 2)]
    assert _join([(1, T)], rows, ttl=timedelta(hours=4)) == [None]


def test_as_known_at_excludes_rows_created_after_the_entity_time():
    rows = [(1, T - timedelta(hours=2), T - timedelta(hours=2), 1), (1, T - timedelta(hours=1), T + US, 2)]
    assert _join([(1, T)], rows, as_known_at=False) == [2]
    assert _join([(1, T)], rows, as_known_at=True) == [1]
    assert _join([(1, T)], [(1, T - timedelta(hours=1), T, 3)], as_known_at=True) == [3]


def test_as_known_at_ttl_applies_to_the_best_known_row():
    # The fresh row is not known yet; the known one is too old: null, not the unknown value.
    rows = [(1, T - timedelta(days=3), T - timedelta(days=3), 1), (1, T - timedelta(hours=1), T + US, 2)]
    assert _join([(1, T)], rows, ttl=timedelta(days=1), as_known_at=True) == [None]


def test_event_tie_goes_to_latest_created_then_greatest_value():
    created_tie = [(1, T, T - timedelta(minutes=1), 7), (1, T, T - timedelta(minutes=2), 9)]
    assert _join([(1, T)], created_tie) == [7]
    assert _join([(1, T)], [(1, T, T, 3), (1, T, T, 5), (1, T, T, 4)]) == [5]
    assert _join([(1, T)], [(1, T, None, 3), (1, T, None, 5)], created=True) == [5]


def test_no_created_column_means_created_equals_event():
    assert _join([(1, T)], [(1, T - US, 4)], created=False, as_known_at=True) == [4]


def test_entities_without_usable_rows_and_duplicates_all_survive():
    out = _join([(1, T), (1, T), (2, T), (None, T), (1, None)], [(1, T - US, T - US, 1), (None, T, T, 2)])
    assert out == [1, 1, None, None, None]


def test_to_utc_normalises_naive_aware_and_mixed_columns():
    naive = datetime(2024, 1, 1, 12)
    aware = datetime(2024, 1, 1, 13, 30, tzinfo=timezone(timedelta(hours=1, minutes=30)))
    expected = [datetime(2024, 1, 1, 12, tzinfo=timezone.utc)] * 2 + [None]
    assert to_utc(pd.Series([naive, aware, None], dtype=object)).to_pylist() == expected
    assert to_utc(pa.array([naive, None], pa.timestamp("ns"))).to_pylist() == [expected[0], None]
    berlin = pd.Series(pd.to_datetime(["2024-01-01 13:00"]).tz_localize("Europe/Berlin"))
    assert to_utc(berlin).to_pylist() == expected[:1]
    assert to_utc(pa.array(["2024-01-01T12:00:00Z"])).type == UTC_MICROS
    chunked = to_utc(pa.chunked_array([pa.array([1_000_000], pa.timestamp("ms", tz="Asia/Tokyo"))]))
    assert isinstance(chunked, pa.ChunkedArray) and chunked.type == UTC_MICROS
    assert to_utc([1_000_000, None]).to_pylist() == [datetime(1970, 1, 1, 0, 0, 1, tzinfo=timezone.utc), None]
    assert to_utc(np.array(["2024-01-01T12:00:00.0000019"], "datetime64[ns]")).to_pylist() == [
        datetime(2024, 1, 1, 12, 0, 0, 1, tzinfo=timezone.utc)
    ]
    with pytest.raises(DataError, match="cannot read timestamps"):
        to_utc(pd.Series(["not a time"]))


def test_missing_column_names_it_and_lists_what_exists():
    entities = pa.table({"applicant_id": [1], "when": pa.array([T], UTC_MICROS)})
    features = pa.table({"applicant_id": [1], "event_ts": pa.array([T], UTC_MICROS), "v": [1]})
    with pytest.raises(DataError, match=r"'ts' is not in the entity table.*\['applicant_id', 'when'\]"):
        asof_join(entities, features, join_keys=["applicant_id"], entity_ts="ts", event_ts="event_ts",
                  created_ts=None, feature_columns=["v"], ttl=None, as_known_at=False, output_names=["v"])


def test_output_name_colliding_with_entity_column_is_refused():
    entities = pa.table({"applicant_id": [1], "ts": pa.array([T], UTC_MICROS), "v": [0]})
    features = pa.table({"applicant_id": [1], "event_ts": pa.array([T], UTC_MICROS), "v": [1]})
    with pytest.raises(DataError, match="'v' would overwrite"):
        asof_join(entities, features, join_keys=["applicant_id"], entity_ts="ts", event_ts="event_ts",
                  created_ts=None, feature_columns=["v"], ttl=None, as_known_at=False, output_names=["v"])


def test_incompatible_key_types_are_refused():
    entities = pa.table({"k": [1], "ts": pa.array([T], UTC_MICROS)})
    features = pa.table({"k": ["1"], "event_ts": pa.array([T], UTC_MICROS), "v": [1]})
    with pytest.raises(DataError, match="join key 'k' has type int64"):
        asof_join(entities, features, join_keys=["k"], entity_ts="ts", event_ts="event_ts",
                  created_ts=None, feature_columns=["v"], ttl=None, as_known_at=False, output_names=["v"])
