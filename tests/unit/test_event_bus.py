"""The event bus contract, run against every backend (SQLite and a real redis-server), its
durability (a killed writer, a SIGKILLed redis-server with appendonly), and ingest's
validation in front of it. No Ray here: buses and the feature store's ingest are plain Python.
"""

from __future__ import annotations

import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_process import PersistentRedis

from mlplatform import Aggregation, ConfigError, DataError, Entity, FeatureView, Field, NotFoundError, Platform
from mlplatform.features.definitions import StreamSource
from mlplatform.streams import EventBusUnavailable
from mlplatform.streams.redis import RedisEventBus, entry_id, position_of
from mlplatform.streams.sqlite import SqliteEventBus

S = "checkouts"


def payloads(n, start=0):
    return [{"event_id": f"e{i}", "amount": float(i), "note": "ünïcode"} for i in range(start, start + n)]


@pytest.fixture(params=["sqlite", "redis"])
def bus(request, tmp_path):
    if request.param == "sqlite":
        bus = SqliteEventBus(tmp_path / "events.db")
    else:
        server = request.getfixturevalue("redis_server")  # no persistence: the contract, not durability
        bus = RedisEventBus(server.url, project=f"t{uuid.uuid4().hex[:10]}", require_fsync=False, timeout=timedelta(seconds=5))
    yield bus
    bus.close()


def now_us():
    return time.time_ns() // 1000


# ------------------------------------------------------------------------------ contract
def test_append_read_ack(bus):
    before = now_us()
    accepted = bus.append(S, payloads(5))
    positions = [a.position for a in accepted]
    assert positions == sorted(set(positions)) and len(positions) == 5
    assert all(before - 5_000 <= a.known_us <= now_us() + 5_000 for a in accepted)  # the bus's clock, ms apart at most
    assert [a.known_us for a in accepted] == sorted(a.known_us for a in accepted)
    later = bus.append(S, payloads(2, start=5))
    assert later[0].position > positions[-1] and later[0].known_us >= accepted[-1].known_us
    assert bus.length(S) == 7

    bus.create_group(S, "g")
    bus.create_group(S, "g")  # idempotent
    first = bus.read(S, "g", "c1", count=3)
    assert [m.payload for m in first] == payloads(3)
    assert [(m.position, m.known_us) for m in first] == [tuple(a) for a in accepted[:3]]
    rest = bus.read(S, "g", "c1", count=10)
    assert [m.payload["event_id"] for m in rest] == ["e3", "e4", "e5", "e6"]
    started = time.monotonic()
    assert bus.read(S, "g", "c1", count=10, block_ms=200) == []
    assert time.monotonic() - started >= 0.15

    info = bus.info(S, "g")
    assert (info.pending, info.lag, dict(info.consumers)) == (7, 0, {"c1": 7})
    assert info.last_delivered == later[-1].position
    assert bus.ack(S, "g", [m.position for m in first]) == 3
    assert bus.ack(S, "g", [m.position for m in first]) == 0  # twice is harmless
    info = bus.info(S, "g")
    assert info.pending == 4 and info.oldest_pending_ms is not None


def test_a_group_reads_what_was_accepted_before_it_existed_and_groups_are_independent(bus):
    bus.append(S, payloads(3))
    bus.create_group(S, "a")
    bus.create_group(S, "b")
    assert [m.payload["event_id"] for m in bus.read(S, "a", "x", count=10)] == ["e0", "e1", "e2"]
    assert bus.info(S, "b").lag == 3
    assert [m.payload["event_id"] for m in bus.read(S, "b", "y", count=10)] == ["e0", "e1", "e2"]


def test_consumers_of_one_group_split_the_stream(bus):
    bus.append(S, payloads(6))
    bus.create_group(S, "g")
    one = bus.read(S, "g", "c1", count=2)
    two = bus.read(S, "g", "c2", count=10)
    assert {m.position for m in one}.isdisjoint(m.position for m in two)
    assert len(one) + len(two) == 6
    assert dict(bus.info(S, "g").consumers) == {"c1": 2, "c2": 4}


def test_what_a_dead_consumer_left_pending_is_redelivered(bus):
    bus.append(S, payloads(5))
    bus.create_group(S, "g")
    held = bus.read(S, "g", "dead", count=3)  # ... and then the consumer dies without acking
    # the same consumer, restarted, gets its own pending messages back first
    again = bus.read_pending(S, "g", "dead", count=10)
    assert [m.position for m in again] == [m.position for m in held]
    assert [m.payload for m in again] == [m.payload for m in held]
    assert [m.position for m in bus.read_pending(S, "g", "dead", count=10, after=held[0].position)] == [m.position for m in held[1:]]
    # if it does not come back, a live consumer takes its messages over once they are idle
    assert bus.claim_stale(S, "g", "alive", min_idle_ms=60_000, count=10) == []
    time.sleep(0.3)
    fresh = bus.read(S, "g", "alive", count=10)
    assert len(fresh) == 2
    claimed = bus.claim_stale(S, "g", "alive", min_idle_ms=200, count=10)
    assert [(m.position, m.known_us, m.payload) for m in claimed] == [(m.position, m.known_us, m.payload) for m in held]
    info = bus.info(S, "g")
    assert info.consumers.get("dead", 0) == 0 and info.consumers["alive"] == 5
    assert bus.ack(S, "g", [m.position for m in claimed + fresh]) == 5
    assert bus.claim_stale(S, "g", "alive", min_idle_ms=0, count=10) == []
    assert bus.info(S, "g").pending == 0


def test_claim_stale_takes_only_idle_messages(bus):
    bus.append(S, payloads(4))
    bus.create_group(S, "g")
    old = bus.read(S, "g", "dead", count=2)
    time.sleep(0.3)
    bus.read(S, "g", "busy", count=2)  # just delivered: not idle
    claimed = bus.claim_stale(S, "g", "alive", min_idle_ms=200, count=10)
    assert [m.position for m in claimed] == [m.position for m in old]


def test_a_blocking_read_wakes_up_when_events_arrive(bus):
    bus.create_group(S, "g")
    timer = threading.Timer(0.3, lambda: bus.append(S, payloads(1)))
    timer.start()
    started = time.monotonic()
    got = bus.read(S, "g", "c", count=10, block_ms=3000)
    timer.join()
    assert [m.payload["event_id"] for m in got] == ["e0"]
    assert time.monotonic() - started < 2.0


def test_trim_deletes_only_what_every_group_acknowledged(bus):
    assert bus.trim(S) == 0  # no stream
    accepted = bus.append(S, payloads(6))
    assert bus.trim(S) == 0  # no group has read anything
    bus.create_group(S, "fast")
    bus.create_group(S, "slow")
    fast = bus.read(S, "fast", "c", count=10)
    bus.ack(S, "fast", [m.position for m in fast])
    slow = bus.read(S, "slow", "c", count=3)  # positions 0..2 delivered, 3..5 never
    bus.ack(S, "slow", [slow[0].position, slow[2].position])  # slow[1] stays pending
    assert bus.trim(S) == 1  # only the first: every group acknowledged it
    assert bus.length(S) == 5
    # the pending one and the undelivered ones are all still readable
    assert [m.position for m in bus.read_pending(S, "slow", "c", count=10)] == [slow[1].position]
    assert [m.position for m in bus.read(S, "slow", "c", count=10)] == [a.position for a in accepted[3:]]
    bus.ack(S, "slow", [a.position for a in accepted])
    assert bus.trim(S) == 5 and bus.length(S) == 0
    later = bus.append(S, payloads(1, start=6))
    assert later[0].position > accepted[-1].position  # positions never go back, even after a trim
    assert [m.position for m in bus.read(S, "fast", "c", count=10)] == [later[0].position]


def test_unknown_group_is_not_found(bus):
    bus.append(S, payloads(1))
    with pytest.raises(NotFoundError, match="create_group"):
        bus.read(S, "nope", "c", count=1)
    with pytest.raises(NotFoundError):
        bus.info(S, "nope")


def test_buses_pickle_and_reconnect(bus):
    bus.append(S, payloads(2))
    copy = pickle.loads(pickle.dumps(bus))
    assert copy.length(S) == 2
    copy.close()


def test_positions_round_trip_redis_entry_ids():
    for ms, seq in [(0, 0), (1, 1), (1_700_000_000_000, 0), (1_700_000_000_000, (1 << 20) - 1), ((1 << 43) - 1, 7)]:
        position = position_of(f"{ms}-{seq}")
        assert 0 <= position < 2**63 and entry_id(position) == f"{ms}-{seq}"
    assert position_of("5-0") > position_of("4-1048575")  # ordered like the ids
    with pytest.raises(Exception, match="does not fit"):
        position_of(f"1-{1 << 20}")


# ---------------------------------------------------------------------------- durability
def test_sqlite_keeps_what_it_accepted_when_the_writer_is_killed(tmp_path):
    path = tmp_path / "events.db"
    code = (
        "import os, signal, sys\n"
        "from mlplatform.streams.sqlite import SqliteEventBus\n"
        f"bus = SqliteEventBus({str(path)!r})\n"
        "for i in range(20):\n"
        "    accepted = bus.append('s', [{'i': i}])\n"
        "    print(accepted[0].position, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL
    printed = [int(line) for line in out.stdout.split()]
    bus = SqliteEventBus(path)
    bus.create_group("s", "g")
    got = bus.read("s", "g", "c", count=100)
    assert [m.position for m in got] == printed and [m.payload["i"] for m in got] == list(range(20))


def test_redis_with_appendfsync_always_keeps_accepted_events_and_groups_across_a_kill(tmp_path):
    server = PersistentRedis(tmp_path, fsync="always").start()
    try:
        bus = RedisEventBus(server.url, project="p", timeout=timedelta(seconds=2))  # require_fsync: the default
        accepted = [a for i in range(10) for a in bus.append(S, payloads(10, start=10 * i))]
        bus.create_group(S, "g")
        held = bus.read(S, "g", "c", count=30)
        bus.ack(S, "g", [m.position for m in held[:10]])
        server.kill()  # SIGKILL: nothing is flushed on the way out
        with pytest.raises(EventBusUnavailable):
            bus.append(S, payloads(1))
        server.start()
        assert bus.length(S) == 100
        assert [m.position for m in bus.read_pending(S, "g", "c", count=100)] == [m.position for m in held[10:]]
        rest = bus.read(S, "g", "c", count=100)
        assert [m.position for m in held + rest] == [a.position for a in accepted]
        assert [m.payload for m in held + rest] == payloads(100)
        bus.close()
    finally:
        server.stop()


def test_redis_without_fsync_always_is_refused_when_fsync_is_required(redis_server, tmp_path):
    bus = RedisEventBus(redis_server.url, project=f"t{uuid.uuid4().hex[:8]}")
    with pytest.raises(EventBusUnavailable, match="appendfsync"):
        bus.append(S, payloads(1))  # the session's redis-server runs appendonly no
    everysec = PersistentRedis(tmp_path, fsync="everysec").start()
    try:
        with pytest.raises(EventBusUnavailable, match="'everysec'"):
            RedisEventBus(everysec.url, project="p").append(S, payloads(1))
        assert len(RedisEventBus(everysec.url, project="p", require_fsync=False).append(S, payloads(1))) == 1
    finally:
        everysec.stop()
    lax = PersistentRedis(tmp_path / "lax", extra=("--no-appendfsync-on-rewrite", "yes"))  # skips fsync during a rewrite
    lax.directory.mkdir()
    lax.start()
    try:
        with pytest.raises(EventBusUnavailable, match="no-appendfsync-on-rewrite='yes'"):
            RedisEventBus(lax.url, project="p").append(S, payloads(1))
    finally:
        lax.stop()


def test_redis_that_refuses_config_is_a_config_error(tmp_path):
    server = PersistentRedis(tmp_path, extra=("--rename-command", "CONFIG", "")).start()
    try:
        bus = RedisEventBus(server.url, project="p")
        with pytest.raises(ConfigError, match="as_configured"):
            bus.append(S, payloads(1))
        assert bus.length(S) == 0  # the transaction was discarded: nothing accepted
    finally:
        server.stop()


def test_redis_down_is_unavailable_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bus = RedisEventBus(f"redis://127.0.0.1:{port}/0", project="p", timeout=timedelta(milliseconds=200))
    started = time.monotonic()
    with pytest.raises(EventBusUnavailable, match="did not answer"):
        bus.append(S, payloads(1))
    with pytest.raises(EventBusUnavailable):
        bus.read(S, "g", "c", count=1)
    assert time.monotonic() - started < 2.0


# -------------------------------------------------------------------------------- ingest
applicant = Entity(name="applicant", join_keys=["applicant_id"])
checkouts = StreamSource(
    name="checkouts",
    dataset="events/checkouts",
    timestamp_field="checkout_ts",
    schema=[
        Field(name="applicant_id", dtype="int64"),
        Field(name="amount"),
        Field(name="merchant", dtype="string"),
        Field(name="first_order", dtype="bool"),
        Field(name="due", dtype="timestamp"),
    ],
)
activity = FeatureView(
    name="applicant_activity",
    entities=[applicant],
    source=checkouts,
    aggregations=[Aggregation(function="count", window="1d"), Aggregation(column="amount", function="sum", window="1d")],
)
NOW = datetime.now(UTC)


@pytest.fixture
def platform(tmp_path):
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    platform.features.apply([activity])
    yield platform
    platform.bus.close()


def event(i=0, **changes):
    base = {
        "event_id": f"c-{i}", "applicant_id": i, "amount": 10.0 * i, "merchant": "m", "first_order": False,
        "due": NOW + timedelta(days=30), "checkout_ts": NOW - timedelta(minutes=i),
    }
    return base | changes


def test_ingest_appends_checked_events(platform):
    result = platform.features.ingest("checkouts", [event(0), event(1, merchant=None, checkout_ts=(NOW - timedelta(seconds=1)).replace(tzinfo=None))])
    assert result.count == 2 and result.first_position < result.last_position
    assert result.last_known_at.tzinfo is not None and abs(result.last_known_at - datetime.now(UTC)) < timedelta(seconds=30)
    assert "ingested 2 events into 'checkouts'" in str(result)
    bus = platform.bus
    bus.create_group("checkouts", "g")
    got = [m.payload for m in bus.read("checkouts", "g", "c", count=10)]
    assert got[0]["event_id"] == "c-0" and got[1]["merchant"] is None
    assert got[1]["checkout_ts"].endswith("+00:00")  # naive was taken as UTC
    frame = pd.DataFrame([event(2), event(3, amount=float("nan"))])
    assert platform.features.ingest("checkouts", frame).count == 2
    assert platform.features.ingest("checkouts", pa.Table.from_pylist([event(4)])).count == 1
    assert platform.features.ingest("checkouts", []).count == 0
    assert bus.length("checkouts") == 5


@pytest.mark.parametrize(
    "bad, message",
    [
        (event(1, amount="abc"), r"'amount' must hold numbers, got 'abc' \(str\) at row 1"),
        (event(1, applicant_id=2**63), r"'applicant_id' must hold integers.*at row 1"),
        (event(1, first_order="yes"), r"'first_order' must hold booleans.*at row 1"),
        (event(1, due="tomorrow"), r"'due' must hold timestamps.*at row 1"),
        ({k: v for k, v in event(1).items() if k != "event_id"}, r"row 1 field 'event_id' \(the event id\) must be a non-empty string, got missing"),
        (event(1, event_id=""), r"row 1 field 'event_id'"),
        (event(1, event_id=17), r"row 1 field 'event_id'.*17 \(int\)"),
        (event(1, event_id="x" * 300), r"row 1 field 'event_id'.*300 characters"),
        (event(1, checkout_ts=NOW + timedelta(hours=1)), r"row 1 field 'checkout_ts' \(the event time\) .* is in the future"),
        (event(1, checkout_ts=None), r"row 1 field 'checkout_ts' \(the event time\) is missing"),
        (event(1, checkout_ts="10000-01-01T00:00:00"), r"row 1 field 'checkout_ts' \(the event time\) must be a timestamp"),
        (event(1, checkout_ts=datetime(1999, 1, 1, tzinfo=UTC)), r"row 1 field 'checkout_ts'.*before features.min_event_time"),
        (event(1, colour="red"), r"row 1 has unknown field\(s\) \['colour'\]"),
        (event(1, created_timestamp=NOW), r"row 1 has unknown field\(s\) \['created_timestamp'\] \(the bus stamps"),
        (event(1, applicant_id=None), r"row 1 field 'applicant_id' must not be null: it is a join key of real-time view 'applicant_activity'"),
    ],
)
def test_a_bad_event_is_refused_with_its_row_and_field_and_nothing_is_appended(platform, bad, message):
    with pytest.raises(DataError, match=message):
        platform.features.ingest("checkouts", [event(0), bad, event(2)])
    assert platform.bus.length("checkouts") == 0


def test_ingest_into_an_unknown_source_or_of_non_rows_is_refused(platform):
    with pytest.raises(NotFoundError, match="stream_source"):
        platform.features.ingest("nope", [event(0)])
    with pytest.raises(DataError, match="row 1 is a str"):
        platform.features.ingest("checkouts", [event(0), "oops"])
    with pytest.raises(DataError, match="list of dicts"):
        platform.features.ingest("checkouts", "oops")


_junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=5), st.datetimes(timezones=st.just(UTC)), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["event_id", "applicant_id", "amount", "merchant", "first_order", "due", "checkout_ts"]), value=_junk)
def test_generated_values_are_either_accepted_whole_or_refused_whole(platform, field, value):
    before = platform.bus.length("checkouts")
    try:
        result = platform.features.ingest("checkouts", [event(0), event(1, **{field: value})])
    except DataError as exc:
        assert field in str(exc) and "row 1" in str(exc)
        assert platform.bus.length("checkouts") == before
        return
    assert result.count == 2 and platform.bus.length("checkouts") == before + 2
    # what was accepted reads back as the offline log's columns
    from mlplatform.features.ingest import events_table
    from mlplatform.streams import Message

    table, rejected = events_table(checkouts, [Message(1, 0, p) for p in _payloads_of(platform, result)])
    assert not rejected and table.num_rows == 2


def _payloads_of(platform, result):
    platform.bus.create_group("checkouts", "check")
    out = []
    while True:
        got = platform.bus.read("checkouts", "check", "c", count=100)
        if not got:
            return [m.payload for m in out if result.first_position <= m.position <= result.last_position]
        out += got


def test_mlp_ingest_reads_parquet_and_json_lines(tmp_path, capsys):
    from mlplatform.cli import main

    config = tmp_path / "platform.yaml"
    config.write_text(f"storage: {{root: {tmp_path / 'root'}}}\n")
    Platform.from_config(str(config)).features.apply([activity])
    rows = [event(0), event(1)]
    pq_path, jl_path = tmp_path / "e.parquet", tmp_path / "e.jsonl"
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    jl_path.write_text("\n".join(pd.DataFrame([event(2)]).to_json(orient="records", lines=True, date_format="iso").splitlines()) + "\n")
    assert main(["ingest", "checkouts", str(pq_path), "--config", str(config)]) == 0
    assert main(["ingest", "checkouts", str(jl_path), "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("ingested 2 events into 'checkouts'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event_id": "x", "applicant_id": "one", "checkout_ts": "2024-01-01T00:00:00Z"}\n')
    assert main(["ingest", "checkouts", str(bad), "--config", str(config)]) == 1
    assert "row 0" in capsys.readouterr().err
    assert Platform.from_config(str(config)).bus.length("checkouts") == 3


# -------------------------------------------------------------------------------- config
def test_streams_config_defaults_to_sqlite_and_names_bad_fields():
    from mlplatform.config import load_config

    assert load_config().streams.type == "sqlite"
    assert load_config({"streams": {"processors": 3}}).streams.processors == 3  # type may be left out
    redis = load_config({"streams": {"type": "redis", "url": "redis://bus:6379/0"}}).streams
    assert (redis.durability, redis.password_env) == ("fsync_always", "REDIS_PASSWORD")
    for bad, message in [
        ({"type": "kafka"}, "streams: type must be 'sqlite' or 'redis'"),
        ({"type": "redis"}, "streams.redis.url: Field required"),
        ({"type": "redis", "url": "redis://:hunter2@bus:6379"}, "password does not belong in a config"),
        ({"type": "redis", "url": "redis://bus", "durability": "maybe"}, "streams.redis.durability"),
        ({"type": "redis", "url": "redis://bus", "block": "5s", "timeout": "5s"}, "block (0:00:05) must be at least 500ms shorter"),
        ({"processors": 0}, "streams.sqlite.processors"),
        ({"claim_idle": "1s"}, "claim_idle (0:00:01) must be at least twice flush_interval + block"),
        ({"batch": 10}, "streams.sqlite.batch: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config({"streams": bad})


def test_the_platform_opens_the_configured_bus(tmp_path, redis_server):
    local = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    assert isinstance(local.bus, SqliteEventBus) and local.bus.path == str(tmp_path / "root" / "streams" / "events.db")
    assert local.features.bus is local.bus
    remote = Platform.from_config({"project": "p1", "streams": {"type": "redis", "url": redis_server.url, "durability": "as_configured"}})
    assert isinstance(remote.bus, RedisEventBus) and not remote.bus.require_fsync
    assert remote.bus.key("checkouts") == "mlp:p1:stream:checkouts"
