"""The online event-state contract (``mlplatform.online.events``), run against every backend:
SQLite, a real redis-server and a real one-node Redis Cluster.

The oracle is the contract read literally: per (key, event id) the copy with the smallest
(known_us, arrival) among those newer than ``now - retention``, filtered by ``after_us``.
No Ray here: the stores are plain Python objects.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplatform import Entity, FeatureView, Field, ParquetSource
from mlplatform.online import OnlineStoreUnavailable
from mlplatform.online.events import EncodedEvent
from mlplatform.online.redis import RedisOnlineStore
from mlplatform.online.sqlite import SqliteOnlineStore

NOW = 1_709_294_400_000_000  # 2024-03-01 12:00 UTC, µs
RET = 3_600_000_000  # one hour
SECOND = 1_000_000
CUTOFF = NOW - RET
LONG_AGO = -(2**62)


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


def event(key, event_id, event_us=NOW - SECOND, known_us=NOW, arrival=0, payload=None):
    values = payload if payload is not None else f'{{"id":"{event_id}","known":{known_us},"arrival":{arrival}}}'
    return EncodedEvent(key, event_id, event_us, known_us, arrival, values)


def oracle(events, keys, *, after_us, now_us=NOW, retention_us=RET):
    best: dict[tuple[str, str], EncodedEvent] = {}
    for e in events:
        if e.event_us <= now_us - retention_us:
            continue
        kept = best.get((e.key, e.event_id))
        if kept is None or (e.known_us, e.arrival) < (kept.known_us, kept.arrival):
            best[(e.key, e.event_id)] = e
    return [sorted(e for e in best.values() if e.key == key and e.event_us > after_us) for key in keys]


def fetched(store, view, keys, after_us=LONG_AGO):
    return [sorted(events) for events in store.fetch_events(view, keys, after_us=after_us)]


def apply(store, view, events, now_us=NOW, retention_us=RET):
    return store.apply_events(view, events, now_us=now_us, retention_us=retention_us)


# --------------------------------------------------------------------------- first copy wins


def test_the_first_copy_wins_in_any_order(store):
    first = event("[1]", "e", known_us=NOW - 5, arrival=7, payload='{"copy":"first"}')
    same_us = event("[1]", "e", known_us=NOW - 5, arrival=8, payload='{"copy":"same µs, later position"}')
    later = event("[1]", "e", event_us=NOW - 2 * SECOND, known_us=NOW - 4, arrival=0, payload='{"copy":"later"}')
    for name, batches in {
        "first applied first": [[first], [same_us], [later]],
        "first applied last": [[later], [same_us], [first]],
        "all in one call": [[later, first, same_us]],
    }.items():
        view = f"v_{uuid.uuid4().hex[:8]}"
        news = [apply(store, view, batch) for batch in batches]
        assert sum(news) == 1, name
        assert fetched(store, view, ["[1]"]) == [[first]], name
        # the copy kept is the one that wins, whole: its event time and payload too
        assert apply(store, view, [later, same_us, first]) == 0
        assert fetched(store, view, ["[1]"]) == [[first]], name


def test_reapplying_changes_nothing(store):
    events = [event("[1]", "a"), event("[1]", "b"), event('[2,"m"]', "a"), event("[1]", "a", arrival=3)]
    assert apply(store, "v", events) == 3
    before = fetched(store, "v", ["[1]", '[2,"m"]'])
    for _ in range(2):
        assert apply(store, "v", events) == 0
        assert apply(store, "v", events[::-1]) == 0
    assert fetched(store, "v", ["[1]", '[2,"m"]']) == before == oracle(events, ["[1]", '[2,"m"]'], after_us=LONG_AGO)


def test_stream_positions_beyond_double_precision_compare_exactly(store):
    # 2**60 + 1 and 2**60 + 2 are the same double: a store comparing as doubles keeps either
    first = event("[1]", "e", arrival=2**60 + 1, payload='{"copy":1}')
    second = event("[1]", "e", arrival=2**60 + 2, payload='{"copy":2}')
    negative = event("[1]", "f", known_us=-(2**60) - 2, payload='{"copy":"neg"}')
    apply(store, "v", [second, event("[1]", "f", known_us=-(2**60) - 1)])
    apply(store, "v", [first, negative])
    assert fetched(store, "v", ["[1]"]) == [sorted([first, negative])]


# --------------------------------------------------------------------------- property


@st.composite
def histories(draw):
    """Copies of a few events of a few keys: ids repeat, so duplicates are common. A copy is
    (key, id, known, arrival); what it carries is drawn once per copy, as a bus redelivering
    one copy redelivers the same bytes."""
    copies = draw(
        st.dictionaries(
            st.tuples(
                st.sampled_from(["[1]", "[2]", '["{x}:*[]"]']),
                st.sampled_from(["a", "b", "c"]),
                st.integers(NOW - 1, NOW),  # known µs: ties are common
                st.integers(-1, 1),  # arrival
            ),
            # a third too old (skipped); the rest at least 10 s inside retention, so no key
            # expires on Redis mid-test
            st.one_of(st.integers(CUTOFF - RET, CUTOFF), *[st.integers(CUTOFF + 10 * SECOND, NOW)] * 2),
            max_size=25,
        )
    )
    return [
        EncodedEvent(key, event_id, event_us, known, arrival, f'{{"e":{event_us},"k":{known},"a":{arrival}}}')
        for (key, event_id, known, arrival), event_us in copies.items()
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories(), rng=st.randoms(use_true_random=False), after=st.integers(CUTOFF - SECOND, NOW))
def test_any_batches_in_any_order_give_the_oracle(store, history, rng, after):
    view = f"v_{uuid.uuid4().hex[:8]}"
    deliveries = history + rng.sample(history, k=len(history) // 2)  # at-least-once: redeliveries
    rng.shuffle(deliveries)
    cuts = sorted(rng.sample(range(len(deliveries) + 1), k=min(3, len(deliveries) + 1)))
    batches = [deliveries[a:b] for a, b in zip([0, *cuts], [*cuts, len(deliveries)], strict=True)]
    news = [apply(store, view, batch) for batch in batches]
    if batches:
        assert apply(store, view, rng.choice(batches)) == 0  # one batch again
    keys = ["[1]", "[2]", '["{x}:*[]"]', "[3]"]
    expected = oracle(history, keys, after_us=LONG_AGO)
    assert sum(news) == sum(map(len, expected))
    assert fetched(store, view, keys) == expected
    assert fetched(store, view, keys, after_us=after) == oracle(history, keys, after_us=after)


# --------------------------------------------------------------------------- retention


def test_events_older_than_retention_are_not_kept(store):
    events = [
        event("[1]", "older", event_us=CUTOFF - 1),
        event("[1]", "at cutoff", event_us=CUTOFF),  # the bound is exclusive
        event("[1]", "just in", event_us=CUTOFF + 1),
        event("[1]", "recent", event_us=NOW),  # keeps the key's Redis expiry an hour away
    ]
    assert apply(store, "v", events) == 2
    assert [e.event_id for e in fetched(store, "v", ["[1]"])[0]] == ["just in", "recent"]


def test_a_later_apply_trims_the_keys_it_touches(store):
    apply(store, "v", [event("[1]", "old", event_us=NOW - RET + 60 * SECOND), event("[1]", "new", event_us=NOW)])
    apply(store, "v", [event("[1]", "other", event_us=NOW)], now_us=NOW + 2 * 60 * SECOND)
    assert [e.event_id for e in fetched(store, "v", ["[1]"])[0]] == ["new", "other"]
    # a key whose events were all too old is touched too
    apply(store, "v", [event("[1]", "stale", event_us=NOW - 2 * RET)], now_us=NOW + RET)
    assert fetched(store, "v", ["[1]"]) == [[]]


def test_an_untouched_key_does_not_outlive_its_retention(store):
    # Key [1]'s newest event leaves the window 250 ms after `now` (wall clock, for Redis's
    # expiry): once that has passed and the view was written since, it is gone everywhere.
    now = NOW
    apply(store, "v", [event("[1]", "a", event_us=now - RET + 250_000), event("[2]", "b", event_us=now)], now_us=now)
    assert [len(events) for events in fetched(store, "v", ["[1]", "[2]"])] == [1, 1]
    time.sleep(0.3)
    apply(store, "v", [event("[2]", "c", event_us=now)], now_us=now + 300_000)
    assert [len(events) for events in fetched(store, "v", ["[1]", "[2]"])] == [0, 2]


def test_fetch_returns_only_events_after_after_us(store):
    events = [event("[1]", str(i), event_us=NOW - i * SECOND) for i in range(5)]
    apply(store, "v", events)
    assert fetched(store, "v", ["[1]"], after_us=NOW - 2 * SECOND) == [sorted(events[:2])]  # exclusive
    assert fetched(store, "v", ["[1]"], after_us=NOW) == [[]]


# --------------------------------------------------------------------------- batches


def test_one_fetch_for_many_keys(store):
    keys = [f"[{k}]" for k in range(100)]
    events = [event(key, f"e{j}", event_us=NOW - j) for i, key in enumerate(keys) if i % 3 for j in range(i % 4)]
    assert apply(store, "v", events) == len(events)
    asked = [*keys[::-1], '["never"]', keys[1]]  # any order, unknown keys, a key twice
    got = store.fetch_events("v", asked, after_us=LONG_AGO)
    assert [sorted(events) for events in got] == oracle(events, asked, after_us=LONG_AGO)
    assert got[-3] == [] and all(e.key == key for key, events in zip(asked, got, strict=True) for e in events)
    assert store.fetch_events("v", [], after_us=LONG_AGO) == []
    assert store.fetch_events("never_written", ["[1]"], after_us=LONG_AGO) == [[]]
    assert apply(store, "v", []) == 0


# --------------------------------------------------------------------------- concurrency


def _copies(seed: int) -> list[EncodedEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(300):
        key, event_id = f"[{rng.randrange(5)}]", f"e{rng.randrange(40)}"
        known, arrival = NOW - rng.randrange(4), rng.randrange(3)
        out.append(event(key, event_id, event_us=NOW - (known * 7 + arrival) % 1000, known_us=known, arrival=arrival))
    return list({(e.key, e.event_id, e.known_us, e.arrival): e for e in out}.values())  # one payload per copy


def _write_in_batches(store, view, events, seed: int) -> int:
    events = list(events)
    random.Random(seed).shuffle(events)
    return sum(apply(store, view, events[at : at + 7]) for at in range(0, len(events), 7))


def test_concurrent_writers_agree_with_the_oracle(store):
    history = _copies(1)
    news: list[int] = []
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        copy = pickle.loads(pickle.dumps(store))  # its own connection, as another processor
        try:
            news.append(_write_in_batches(copy, "v", history, seed))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            copy.close()

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    keys = [f"[{k}]" for k in range(5)]
    expected = oracle(history, keys, after_us=LONG_AGO)
    assert fetched(store, "v", keys) == expected
    assert sum(news) == sum(map(len, expected)), "an event was counted new by two writers"


def _process_writer(store, history, seed, out) -> None:
    out.put(_write_in_batches(store, "v", history, seed))  # `store` reconnects in this process


def test_sqlite_writers_in_separate_processes(tmp_path):
    store = SqliteOnlineStore(tmp_path / "online.db")
    history = _copies(5)
    apply(store, "v", history[:10])  # the parent holds an open connection across the fork
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_process_writer, args=(store, history, seed, out)) for seed in (6, 7)]
    for worker in workers:
        worker.start()
    news = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    keys = [f"[{k}]" for k in range(5)]
    expected = oracle(history, keys, after_us=LONG_AGO)
    assert fetched(store, "v", keys) == expected
    assert 10 + sum(news) == sum(map(len, expected))
    store.close()


# --------------------------------------------------------------------------- drop


def test_drop_events_forgets_one_view_only(store):
    apply(store, "v", [event("[1]", "a"), event('["{x}:*[]"]', "b")])
    apply(store, "w", [event("[1]", "a")])
    store.drop_events("v")
    assert fetched(store, "v", ["[1]", '["{x}:*[]"]']) == [[], []]
    assert fetched(store, "w", ["[1]"]) == [[event("[1]", "a")]]
    store.drop_events("v")  # nothing left: harmless
    store.drop_events("never_written")
    assert apply(store, "v", [event("[1]", "a")]) == 1  # new again


def test_events_and_materialized_rows_of_one_view_keep_apart(store):
    view = FeatureView(
        name="activity",
        entities=[Entity(name="applicant", join_keys=["applicant_id"])],
        source=ParquetSource(name="ev", dataset="raw/ev", timestamp_field="ts"),
        schema=[Field(name="score")],
    )
    apply(store, "activity", [event("[1]", "1"), event("[1]", "2")])
    for score in (1.0, 2.0):  # each publish cleans up the view's rows
        generation = store.begin(view)
        store.write(view, generation, [{"applicant_id": 1, "event_timestamp": _utc(NOW - SECOND), "score": score}])
        store.publish(view, generation)
    assert [e.event_id for e in fetched(store, "activity", ["[1]"])[0]] == ["1", "2"]
    store.drop_events("activity")
    assert store.read_one(view, (1,), ["score"], _utc(NOW))["score"].value == 2.0


def _utc(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


# --------------------------------------------------------------------------- outages


def test_redis_down_raises_online_store_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = RedisOnlineStore(
        f"redis://127.0.0.1:{port}/0", project="p", timeout=timedelta(milliseconds=50), write_timeout=timedelta(milliseconds=50)
    )
    for call in (
        lambda: down.fetch_events("v", ["[1]"], after_us=0),
        lambda: apply(down, "v", [event("[1]", "a")]),
        lambda: down.drop_events("v"),
    ):
        with pytest.raises(OnlineStoreUnavailable, match="unavailable"):
            call()


def test_hung_redis_raises_within_the_timeout_and_reapplying_heals(redis_server):
    store = RedisOnlineStore(
        redis_server.url, project=f"t{uuid.uuid4().hex[:8]}",
        timeout=timedelta(milliseconds=100), write_timeout=timedelta(milliseconds=100),
    )
    events = [event("[1]", "a"), event("[1]", "b")]
    apply(store, "v", events[:1])
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        started = time.monotonic()
        with pytest.raises(OnlineStoreUnavailable):
            store.fetch_events("v", ["[1]"], after_us=0)
        assert time.monotonic() - started < 1.0
        with pytest.raises(OnlineStoreUnavailable):
            apply(store, "v", events)  # may still land when Redis wakes up: harmless
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    apply(store, "v", events)  # the processor retries
    assert fetched(store, "v", ["[1]"]) == oracle(events, ["[1]"], after_us=LONG_AGO)
    store.close()
