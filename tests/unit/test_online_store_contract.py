"""The online store contract, run against every backend: SQLite, a real redis-server, and a
real one-node Redis Cluster (which refuses cross-slot commands as a big cluster does).

No Ray here: the stores are plain Python objects.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest

from mlplatform import ConfigError, ConflictError, DataError, NotFoundError, Entity, FeatureView, Field, ParquetSource, Platform, ServingError
from mlplatform.online import FeatureStatus, OnlineStoreUnavailable, open_online_store
from mlplatform.online.base import encode_key
from mlplatform.online.redis import RedisOnlineStore
from mlplatform.online.sqlite import SqliteOnlineStore

PRESENT, NOT_FOUND, OUTSIDE = FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.OUTSIDE_MAX_AGE
T0 = datetime(2024, 3, 1, 12, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)

applicant = Entity(name="applicant", join_keys=["applicant_id"])
merchant = Entity(name="merchant", join_keys=["merchant_id"], value_type="string")
source = ParquetSource(name="ev", dataset="raw/ev", timestamp_field="ts")
scores = FeatureView(
    name="scores",
    entities=[applicant],
    source=source,
    ttl="2d",
    schema=[
        Field(name="score"),
        Field(name="n", dtype="int64"),
        Field(name="label", dtype="string"),
        Field(name="flag", dtype="bool"),
        Field(name="seen", dtype="timestamp"),
    ],
)
pairs = FeatureView(name="pairs", entities=[applicant, merchant], source=source, schema=[Field(name="amount")])
FEATURES = ["score", "n", "label", "flag", "seen"]


def row(key, score, *, at=T0, created=None, **extra):
    out = {"applicant_id": key, "event_timestamp": at, "score": score, "n": 1, "label": "a", "flag": True, "seen": T0}
    if created is not None:
        out["created_timestamp"] = created
    return out | extra


def values(store, view, keys, feature="score", now=NOW):
    return [r[feature].value for r in store.read(view, keys, [feature], now)]


@pytest.fixture(params=["sqlite", "redis", "redis_cluster"])
def store(request, tmp_path):
    if request.param == "sqlite":
        online = SqliteOnlineStore(tmp_path / "online.db")
    else:
        server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster_server")
        online = RedisOnlineStore(
            server.url,
            project=f"t{uuid.uuid4().hex[:10]}",  # a fresh namespace per test
            timeout=timedelta(seconds=2),  # generous: this machine is loaded; outage tests use a short one
            cleanup_grace=timedelta(milliseconds=100),
        )
    yield online
    online.close()


def materialize(store, view, rows):
    generation = store.begin(view)
    store.write(view, generation, rows)
    store.publish(view, generation)
    return generation


# ------------------------------------------------------------------------------ basics


def test_write_publish_read_every_value_type(store):
    assert store.current_generation(scores) is None
    materialize(
        store,
        scores,
        [
            row(1, 0.5, n=7, label="x", flag=False, seen=T0 - timedelta(days=1)),
            row(2, 2, n=-3, label="ü ☃", flag=True),  # an int into a float feature reads as a float
        ],
    )
    got = store.read(scores, [(1,), (2,)], FEATURES, NOW)
    assert {f: v.value for f, v in got[0].items()} == {
        "score": 0.5, "n": 7, "label": "x", "flag": False, "seen": T0 - timedelta(days=1),
    }
    assert got[1]["score"].value == 2.0 and isinstance(got[1]["score"].value, float)
    assert got[1]["label"].value == "ü ☃" and got[1]["n"].value == -3
    assert all(v.status == PRESENT and v.event_timestamp == T0 for r in got for v in r.values())
    assert store.read_one(scores, (1,), FEATURES, NOW) == got[0]
    assert store.read_one(scores, [1], ["n"], NOW) == {"n": got[0]["n"]}
    assert store.current_generation(scores) is not None


def test_rows_as_arrow_and_pandas(store):
    frame = pd.DataFrame(
        {
            "applicant_id": [1, 2],
            "event_timestamp": [T0.replace(tzinfo=None), T0],  # naive is UTC
            "score": [1.0, float("nan")],  # NaN is null
            "n": [1, 2],
            "label": ["a", None],
            "flag": [True, False],
            "seen": [T0, T0],
            "unrelated": [0, 0],
        }
    )
    materialize(store, scores, frame)
    assert values(store, scores, [(1,), (2,)]) == [1.0, None]
    generation = store.begin(scores)
    store.write(scores, generation, pa.Table.from_pandas(frame.assign(score=[5.0, 6.0], event_timestamp=T0), preserve_index=False))
    store.publish(scores, generation)
    assert values(store, scores, [(1,), (2,)]) == [5.0, 6.0]


def test_not_found(store):
    materialize(store, scores, [row(1, 1.0)])
    missing = store.read_one(scores, (99,), ["score", "label"], NOW)
    assert missing["score"] == (None, NOT_FOUND, None) and missing["label"].status == NOT_FOUND
    assert store.read_one(pairs, (1, "m"), ["amount"], NOW)["amount"].status == NOT_FOUND  # never materialized


def test_nulls_are_present_values(store):
    materialize(store, scores, [{"applicant_id": 1, "event_timestamp": T0, "score": None, "label": None}])
    got = store.read_one(scores, (1,), ["score", "label", "n"], NOW)
    assert all(v.value is None and v.status == PRESENT and v.event_timestamp == T0 for v in got.values())


def test_multi_column_and_string_keys(store):
    materialize(
        store,
        pairs,
        [
            {"applicant_id": 1, "merchant_id": "m1", "event_timestamp": T0, "amount": 10.0},
            {"applicant_id": 1, "merchant_id": "m2", "event_timestamp": T0, "amount": 20.0},
            {"applicant_id": 2, "merchant_id": "m1", "event_timestamp": T0, "amount": 30.0},
            {"applicant_id": 3, "merchant_id": "{x}:*[]", "event_timestamp": T0, "amount": 40.0},  # awkward characters
        ],
    )
    keys = [(1, "m1"), (1, "m2"), (2, "m1"), (2, "m2"), (3, "{x}:*[]")]
    assert values(store, pairs, keys, "amount") == [10.0, 20.0, 30.0, None, 40.0]
    # 1 and "1" are different keys
    materialize(store, scores, [row(1, 1.0), row("1", 2.0)])
    assert values(store, scores, [(1,), ("1",)]) == [1.0, 2.0]


def test_key_encoding():
    import numpy as np

    assert encode_key((np.int64(5), "a")) == encode_key([5.0, "a"]) == '[5,"a"]'
    for bad in [(None,), (True,), (1.5,), (b"x",)]:
        with pytest.raises(DataError, match="join key"):
            encode_key(bad)


def test_missing_key_or_timestamp_column_is_a_data_error(store):
    generation = store.begin(scores)
    with pytest.raises(DataError, match="applicant_id"):
        store.write(scores, generation, [{"event_timestamp": T0, "score": 1.0}])
    with pytest.raises(DataError, match="event_timestamp"):
        store.write(scores, generation, pa.table({"applicant_id": [1], "score": [1.0]}))


# -------------------------------------------------------------------------------- time


def test_ttl_is_enforced_on_read(store):
    materialize(store, scores, [row(1, 1.0), row(2, 2.0, at=T0 - timedelta(days=3))])
    fresh, stale = store.read(scores, [(1,), (2,)], ["score", "label"], NOW)
    assert fresh["score"].value == 1.0
    assert stale["score"] == (None, OUTSIDE, T0 - timedelta(days=3)) and stale["label"].value is None
    # the window is inclusive: exactly ttl old is still usable; a microsecond more is not
    assert store.read_one(scores, (1,), ["score"], T0 + timedelta(days=2))["score"].status == PRESENT
    late = store.read_one(scores, (1,), ["score"], T0 + timedelta(days=2, microseconds=1))["score"]
    assert late == (None, OUTSIDE, T0)
    # a view without ttl never expires
    materialize(store, pairs, [{"applicant_id": 1, "merchant_id": "m", "event_timestamp": T0, "amount": 1.0}])
    assert values(store, pairs, [(1, "m")], "amount", now=T0 + timedelta(days=3650)) == [1.0]


def test_a_row_from_after_now_is_not_yet_usable(store):
    materialize(store, scores, [row(1, 1.0)])
    assert store.read_one(scores, (1,), ["score"], T0 - timedelta(microseconds=1))["score"] == (None, NOT_FOUND, None)
    assert store.read_one(scores, (1,), ["score"], T0)["score"].value == 1.0
    # naive now is UTC
    assert store.read_one(scores, (1,), ["score"], T0.replace(tzinfo=None))["score"].value == 1.0


# --------------------------------------------------------------------------- generations


def test_unpublished_generation_is_invisible_and_publish_replaces_the_state(store):
    materialize(store, scores, [row(1, 1.0), row(2, 2.0)])
    generation = store.begin(scores)
    store.write(scores, generation, [row(1, 10.0), row(3, 30.0)])
    assert values(store, scores, [(1,), (2,), (3,)]) == [1.0, 2.0, None]
    store.publish(scores, generation)
    # the new generation is the whole state: key 2, absent from it, is gone
    assert values(store, scores, [(1,), (2,), (3,)]) == [10.0, None, 30.0]
    assert store.current_generation(scores) == generation
    store.publish(scores, generation)  # publishing twice is harmless
    assert values(store, scores, [(1,)]) == [10.0]


def test_aborted_generation_is_invisible_and_dead(store):
    materialize(store, scores, [row(1, 1.0)])
    before = store.current_generation(scores)
    generation = store.begin(scores)
    store.write(scores, generation, [row(1, 99.0), row(2, 99.0)])
    store.abort(scores, generation)
    store.abort(scores, generation)  # twice is harmless
    assert values(store, scores, [(1,), (2,)]) == [1.0, None]
    assert store.current_generation(scores) == before
    with pytest.raises(ConflictError, match="aborted"):
        store.write(scores, generation, [row(1, 5.0)])
    with pytest.raises(ConflictError, match="aborted"):
        store.publish(scores, generation)
    assert values(store, scores, [(1,)]) == [1.0]


def test_a_killed_writers_generation_is_superseded_by_the_next_begin(store):
    materialize(store, scores, [row(1, 1.0)])
    killed = store.begin(scores)
    store.write(scores, killed, [row(1, 66.0)])
    # the writer dies here, never publishing; a re-run begins again
    rerun = store.begin(scores)
    assert rerun != killed
    with pytest.raises(ConflictError, match="superseded"):
        store.write(scores, killed, [row(1, 67.0)])  # a zombie writer cannot touch anything
    with pytest.raises(ConflictError):
        store.publish(scores, killed)
    assert values(store, scores, [(1,)]) == [1.0]
    store.write(scores, rerun, [row(1, 2.0)])
    store.publish(scores, rerun)
    assert values(store, scores, [(1,)]) == [2.0]


def test_rerun_is_idempotent(store):
    rows = [row(k, float(k), at=T0 - timedelta(minutes=k)) for k in range(20)]
    materialize(store, scores, rows)
    first = store.read(scores, [(k,) for k in range(21)], FEATURES, NOW)
    generation = store.begin(scores)
    store.write(scores, generation, rows)
    store.write(scores, generation, rows[::-1])  # replayed batches change nothing
    store.publish(scores, generation)
    assert store.read(scores, [(k,) for k in range(21)], FEATURES, NOW) == first


def test_within_a_generation_the_newer_row_wins_in_any_order(store):
    generation = store.begin(scores)
    newest = row(1, 3.0, at=T0, created=T0 + timedelta(hours=2))
    store.write(scores, generation, [newest])
    store.write(scores, generation, [row(1, 1.0, at=T0 - timedelta(hours=1))])  # older event
    store.write(scores, generation, [row(1, 2.0, at=T0, created=T0 + timedelta(hours=1))])  # same event, created earlier
    store.write(scores, generation, [row(2, 1.0, at=T0, created=T0), row(2, 2.0, at=T0, created=T0)])  # exact tie: last wins
    store.publish(scores, generation)
    assert values(store, scores, [(1,), (2,)], now=T0 + timedelta(hours=3)) == [3.0, 2.0]


def test_reader_during_a_write_sees_only_complete_states(store):
    keys = [(k,) for k in range(60)]
    materialize(store, scores, [row(k, 0.0) for k in range(60)])
    reader = pickle.loads(pickle.dumps(store))  # its own connection, as in another process
    seen: set[tuple] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_forever() -> None:
        try:
            while not stop.is_set():
                seen.add(tuple(values(reader, scores, keys)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=read_forever)
    thread.start()
    try:
        for version in (1.0, 2.0, 3.0):
            generation = store.begin(scores)
            for at in range(0, 60, 10):  # several batches, readers interleaved
                store.write(scores, generation, [row(k, version) for k in range(at, at + 10)])
                time.sleep(0.01)
            store.publish(scores, generation)
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        reader.close()
    assert not errors, errors
    assert seen <= {tuple([v] * 60) for v in (0.0, 1.0, 2.0, 3.0)}, "a reader saw a partial generation"
    assert tuple([3.0] * 60) in seen


def test_store_is_picklable_and_reopens(store):
    materialize(store, scores, [row(1, 1.0)])
    copy = pickle.loads(pickle.dumps(store))
    assert values(copy, scores, [(1,)]) == [1.0]
    copy.close()
    assert values(copy, scores, [(1,)]) == [1.0]  # reconnects


# ------------------------------------------------------------------------------- upserts


def test_upsert_is_visible_at_once_and_keeps_the_newer_row(store):
    store.upsert(scores, [row(1, 1.0)])  # no generation yet: one is created
    assert values(store, scores, [(1,)]) == [1.0]
    materialize(store, scores, [row(1, 2.0), row(2, 2.0)])
    store.upsert(scores, [row(1, 5.0, at=T0 + timedelta(minutes=1)), row(3, 3.0)])
    assert values(store, scores, [(1,), (2,), (3,)], now=T0 + timedelta(minutes=5)) == [5.0, 2.0, 3.0]
    store.upsert(scores, [row(1, 0.0, at=T0)])  # older than what is stored: ignored
    assert values(store, scores, [(1,)], now=T0 + timedelta(minutes=5)) == [5.0]
    store.upsert(scores, [row(1, 6.0, at=T0 + timedelta(minutes=1), created=T0 + timedelta(minutes=9))])  # same event, known later
    assert values(store, scores, [(1,)], now=T0 + timedelta(minutes=5)) == [6.0]


def test_upsert_during_a_rebuild_survives_the_publish(store):
    materialize(store, scores, [row(1, 1.0)])
    generation = store.begin(scores)
    store.write(scores, generation, [row(1, 2.0), row(2, 2.0)])
    pushed = row(2, 9.0, at=T0 + timedelta(minutes=1))
    store.upsert(scores, [pushed])
    later = T0 + timedelta(minutes=2)
    assert values(store, scores, [(1,), (2,)], now=later) == [1.0, 9.0]  # visible now
    store.write(scores, generation, [row(2, 2.5)])  # the rebuild's older row does not overwrite it
    store.publish(scores, generation)
    assert values(store, scores, [(1,), (2,)], now=later) == [2.0, 9.0]  # and still there after


# ------------------------------------------------------------------------------ rollback


def keeping(store, keep):
    """The same store (same file / namespace) with another keep_generations."""
    state = store.__getstate__() | {"keep_generations": keep}
    other = type(store).__new__(type(store))
    other.__setstate__(state)
    return other


def everything(store, keys=range(1, 5)):
    return store.read(scores, [(k,) for k in keys], FEATURES, NOW)


def test_rollback_restores_the_previous_generation_exactly_and_can_be_undone(store):
    first = materialize(store, scores, [row(1, 1.0, n=5, label="old"), row(2, 2.0, flag=False)])
    before = everything(store)
    assert [g.state for g in store.generations(scores)] == ["current"]
    second = materialize(store, scores, [row(1, 10.0, n=50, label="bad"), row(3, 30.0)])  # key 2 gone, 3 new
    after = everything(store)
    assert after != before
    listed = store.generations(scores)
    assert [(g.generation, g.state, g.rows) for g in listed] == [(second, "current", 2), (first, "kept", 2)]
    assert all(g.published_at is not None and g.published_at.tzinfo is not None for g in listed)
    assert listed[0].published_at >= listed[1].published_at

    assert store.rollback(scores) == first
    assert store.current_generation(scores) == first
    assert everything(store) == before  # every value, status and timestamp, key 3 absent again
    assert [(g.generation, g.state) for g in store.generations("scores")] == [(first, "current"), (second, "withdrawn")]
    # a plain rollback never returns to a generation rolled back from; naming it does
    with pytest.raises(NotFoundError, match="no kept generation older"):
        store.rollback(scores)
    assert store.rollback(scores, first) == first  # naming the current one changes nothing
    assert store.rollback("scores", second) == second
    assert everything(store) == after
    assert [(g.generation, g.state) for g in store.generations(scores)] == [(second, "current"), (first, "kept")]


def test_retention_keeps_the_configured_number_and_prefers_kept_to_withdrawn(store):
    three = keeping(store, 3)
    g1 = materialize(three, scores, [row(1, 1.0)])
    g2 = materialize(three, scores, [row(1, 2.0)])
    g3 = materialize(three, scores, [row(1, 3.0)])
    g4 = materialize(three, scores, [row(1, 4.0)])
    assert [g.generation for g in three.generations(scores)] == [g4, g3, g2]  # g1 dropped
    assert three.rollback(scores) == g3 and values(three, scores, [(1,)]) == [3.0]
    assert three.rollback(scores) == g2 and values(three, scores, [(1,)]) == [2.0]
    with pytest.raises(NotFoundError, match="older"):
        three.rollback(scores)
    g5 = materialize(three, scores, [row(1, 5.0)])
    # kept: the new one, g2 (current before it), then the newest withdrawn one (listed newest first)
    assert [(g.generation, g.state) for g in three.generations(scores)] == [(g5, "current"), (g4, "withdrawn"), (g2, "kept")]
    assert three.rollback(scores) == g2 and values(three, scores, [(1,)]) == [2.0]
    for dropped in (g1, g3):  # their data is gone
        with pytest.raises(NotFoundError, match=f"no kept generation '{dropped}'"):
            three.rollback(scores, dropped)
    one = keeping(store, 1)
    materialize(one, scores, [row(1, 6.0)])
    assert len(one.generations(scores)) == 1
    with pytest.raises(NotFoundError, match="keep_generations"):
        one.rollback(scores)
    assert values(one, scores, [(1,)]) == [6.0]


def test_rollback_refuses_a_bad_generation_and_changes_nothing(store):
    with pytest.raises(NotFoundError, match="kept generations: none"):
        store.rollback(scores)  # never materialized
    first = materialize(store, scores, [row(1, 1.0)])
    second = materialize(store, scores, [row(1, 2.0)])
    writing = store.begin(scores)
    store.write(scores, writing, [row(1, 3.0)])
    for bad in ["abc", "", "-1", "999999", writing, f"{first}; DROP TABLE mlp_pointers", "1.5"]:
        with pytest.raises(NotFoundError, match=f"no kept generation {bad!r}"):
            store.rollback(scores, bad)
        assert store.current_generation(scores) == second
        assert values(store, scores, [(1,)]) == [2.0]
    with pytest.raises(NotFoundError, match="kept generations: "):
        store.rollback(pairs, first)  # another view's generation
    store.publish(scores, writing)  # the materialization in progress was not disturbed
    assert values(store, scores, [(1,)]) == [3.0]


def test_upserts_after_a_rollback_go_into_the_restored_generation_only(store):
    first = materialize(store, scores, [row(1, 1.0)])
    second = materialize(store, scores, [row(1, 2.0)])
    later = T0 + timedelta(minutes=5)
    store.upsert(scores, [row(2, 20.0, at=T0 + timedelta(minutes=1))])  # into the current one only
    store.rollback(scores)
    assert values(store, scores, [(1,), (2,)], now=later) == [1.0, None]  # first as it was
    store.upsert(scores, [row(3, 30.0, at=T0 + timedelta(minutes=1))])
    assert values(store, scores, [(1,), (3,)], now=later) == [1.0, 30.0]
    store.rollback(scores, second)
    assert values(store, scores, [(1,), (2,), (3,)], now=later) == [2.0, 20.0, None]
    assert {g.generation: g.rows for g in store.generations(scores)} == {first: 2, second: 2}


def test_keep_generations_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="keep_generations"):
        SqliteOnlineStore(tmp_path / "x.db", keep_generations=0)
    with pytest.raises(ConfigError, match="keep_generations"):
        RedisOnlineStore("redis://127.0.0.1:1/0", project="p", keep_generations=True)
    with pytest.raises(ConfigError, match="keep_generations"):
        Platform.from_config({"storage": {"root": str(tmp_path)}, "online_store": {"type": "sqlite", "keep_generations": 0}})
    configured = Platform.from_config({"storage": {"root": str(tmp_path)}, "online_store": {"type": "sqlite", "keep_generations": 4}})
    assert open_online_store(configured.config, configured.storage).keep_generations == 4


_WORKLOAD = """
from pydantic import BaseModel, ConfigDict

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

def steps(platform, config):
    return []
"""


def test_rollback_through_the_platform_and_the_cli(tmp_path, monkeypatch, capsys):
    from mlplatform.cli import main

    (tmp_path / "code" / "rbteam").mkdir(parents=True)
    (tmp_path / "code" / "rbteam" / "__init__.py").write_text("")
    (tmp_path / "code" / "rbteam" / "job.py").write_text(_WORKLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    workload = tmp_path / "job.yaml"
    workload.write_text(f"workload: rbteam.job\nplatform: {{storage: {{root: '{tmp_path / 'root'}'}}}}\n")
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    platform.features.apply([applicant, scores])
    online = platform.features.online_store
    first = materialize(online, scores, [row(1, 1.0)])
    second = materialize(online, scores, [row(1, 2.0), row(2, 2.0)])
    platform.storage.write_json("online/state/scores.json", {"generation": second})  # as a materialization leaves it

    assert main(["materialize", str(workload), "--generations", "scores"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0].strip() for line in listed] == [f"scores generation {second}", f"scores generation {first}"]
    assert "(current): published 20" in listed[0] and ", 2 keys" in listed[0] and "(kept)" in listed[1]

    assert main(["materialize", str(workload), "--rollback", "scores"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"rolled back scores from generation {second} to generation {first}")
    assert "the next incremental run rebuilds it" in out[0]  # no materialization record for it here
    assert values(online, scores, [(1,), (2,)]) == [1.0, None]
    # the state no longer names the generation rolled back from: the next incremental run rebuilds
    assert not platform.storage.exists("online/state/scores.json")

    for argv, message in [
        (["--rollback", "scores", "--generation", "999"], "no kept generation '999'"),
        (["--rollback", "nope"], "no feature_view named 'nope'"),
        (["--generation", str(second)], "--generation names the generation to restore"),
    ]:
        assert main(["materialize", str(workload), *argv]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: ") and message in line
    assert values(online, scores, [(1,)]) == [1.0]
    assert main(["materialize", str(workload), "--rollback", "scores", "--generation", second]) == 0
    assert values(online, scores, [(1,), (2,)]) == [2.0, 2.0]
    with pytest.raises(DataError, match="generation must be"):
        platform.features.rollback("scores", 1.5)


# -------------------------------------------------------------------------------- outages


def test_redis_down_raises_quickly():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = RedisOnlineStore(f"redis://127.0.0.1:{port}/0", project="p", timeout=timedelta(milliseconds=50))
    for _ in range(3):  # every call, not only the first
        started = time.monotonic()
        with pytest.raises(OnlineStoreUnavailable, match="unavailable") as info:
            down.read_one(scores, (1,), ["score"], NOW)
        assert time.monotonic() - started < 0.5
    assert isinstance(info.value, ServingError)


def test_hung_redis_raises_within_the_timeout(redis_server):
    store = RedisOnlineStore(redis_server.url, project=f"t{uuid.uuid4().hex[:8]}", timeout=timedelta(milliseconds=100))
    store.upsert(scores, [row(1, 1.0)])
    assert values(store, scores, [(1,)]) == [1.0]
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(OnlineStoreUnavailable):
                store.read_one(scores, (1,), ["score"], NOW)
            assert time.monotonic() - started < 1.0
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert values(store, scores, [(1,)]) == [1.0]  # and it recovers by itself
    store.close()


# ------------------------------------------------------------------------------- config


def test_store_from_config(tmp_path, redis_server, monkeypatch):
    local = Platform.from_config({"storage": {"root": str(tmp_path)}})
    store = open_online_store(local.config, local.storage)
    assert isinstance(store, SqliteOnlineStore) and store.path == str(tmp_path / "online" / "online.db")
    explicit = Platform.from_config({"storage": {"root": str(tmp_path)}, "online_store": {"type": "sqlite", "path": str(tmp_path / "x.db")}})
    assert open_online_store(explicit.config, explicit.storage).path == str(tmp_path / "x.db")
    monkeypatch.chdir(tmp_path)
    on_s3 = Platform.from_config({"project": "risk", "storage": {"root": "s3://bucket/prefix"}})
    assert open_online_store(on_s3.config, on_s3.storage).path == str(tmp_path / ".mlplatform-online" / "risk.db")
    remote = Platform.from_config(
        {"project": "risk", "online_store": {"type": "redis", "url": redis_server.url, "timeout": "20ms", "key_prefix": "k"}}
    )
    redis_store = open_online_store(remote.config, remote.storage)
    assert isinstance(redis_store, RedisOnlineStore)
    assert (redis_store.timeout, redis_store.key_prefix, redis_store.project) == (timedelta(milliseconds=20), "k", "risk")


def test_redis_password_comes_from_the_environment(redis_server, monkeypatch):
    import redis

    admin = redis.Redis(port=redis_server.port)
    admin.config_set("requirepass", "s3cret")  # the shared server, for this test only
    try:
        monkeypatch.delenv("REDIS_PASSWORD", raising=False)
        without = RedisOnlineStore(redis_server.url, project="p", timeout=timedelta(seconds=1))
        with pytest.raises(OnlineStoreUnavailable, match="REDIS_PASSWORD"):
            without.read_one(scores, (1,), ["score"], NOW)
        monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
        store = RedisOnlineStore(redis_server.url, project="p", timeout=timedelta(seconds=1))
        assert store.read_one(scores, (1,), ["score"], NOW)["score"].status == NOT_FOUND
        assert b"s3cret" not in pickle.dumps(store)  # the password never travels to Ray tasks
        store.close()
    finally:
        redis.Redis(port=redis_server.port, password="s3cret").config_set("requirepass", "")


def test_table_and_record_rows_encode_identically():
    from mlplatform.online.base import encode_rows

    records = [
        {"applicant_id": 1, "merchant_id": "ü{1}", "event_timestamp": T0, "created_timestamp": None, "amount": 2},
        {"applicant_id": 2, "merchant_id": "m", "event_timestamp": T0, "created_timestamp": T0, "amount": float("nan")},
        {"applicant_id": 3, "merchant_id": "m", "event_timestamp": T0, "created_timestamp": NOW, "amount": None},
    ]
    table = pa.Table.from_pylist(records)
    assert encode_rows(pairs, table) == encode_rows(pairs, records) == encode_rows(pairs, pd.DataFrame(records))
    typed = [row(1, 0.5, seen=T0), row(2, float("nan"), n=None, label=None, flag=None, seen=None)]
    assert encode_rows(scores, pa.Table.from_pylist(typed)) == encode_rows(scores, typed)
