"""Stream processing on the session's real Ray: events ingested onto the bus (SQLite, or a real
redis-server with appendonly) are applied online and logged offline by the processor actors —
every accepted event exactly once online and once in the deduplicated log, late ones offline
only — also when a processor's worker process is SIGKILLed mid-stream and when the
redis-server behind the bus is SIGKILLed and restarted during ingest.

The checks read the state itself, not the processors' counters: the online store's kept events
per key (one copy per event id, the first accepted), the offline log deduplicated by
``realtime.usable``, and the view's values aggregated from each, which must agree.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow.compute as pc
import pytest
from redis_process import PersistentRedis

from mlplatform import Aggregation, Entity, FeatureView, Field, Platform
from mlplatform.features import realtime
from mlplatform.features.definitions import StreamSource
from mlplatform.features.event_log import read_events
from mlplatform.features.stream_processor import GROUP
from mlplatform.online.base import encode_key
from mlplatform.online.events import EventState
from mlplatform.online.redis import RedisOnlineStore
from mlplatform.streams import EventBusUnavailable

KEYS = 6
applicant = Entity(name="applicant", join_keys=["applicant_id"])
checkouts = StreamSource(
    name="checkouts",
    dataset="events/checkouts",
    timestamp_field="checkout_ts",
    schema=[Field(name="applicant_id", dtype="int64"), Field(name="amount"), Field(name="merchant", dtype="string")],
    allowed_lateness="1h",
)
activity = FeatureView(
    name="applicant_activity",
    entities=[applicant],
    source=checkouts,
    aggregations=[
        Aggregation(function="count", window="1d"),
        Aggregation(column="amount", function="sum", window="1d"),
        Aggregation(column="amount", function="max", window="2h"),
        Aggregation(column="merchant", function="last_k", k=3, window="1d"),
    ],
)
STREAMS = {
    "processors": 2,
    "batch_size": 50,
    "block": "200ms",
    "flush_interval": "300ms",
    "flush_events": 200,
    "claim_idle": "2s",
    "processor_cpus": 0,
}


def make_platform(tmp_path, ray_session, *, bus=None, online=None):
    config = {"storage": {"root": str(tmp_path / "root")}, "streams": {**STREAMS, **(bus or {})}}
    if online is not None:
        config["online_store"] = online
    platform = Platform.from_config(config)
    platform.features.apply([activity])
    return platform


class Sender:
    """Ingests batches the way a client does: a batch that raised is sent again (same ids)
    until the bus accepts it. ``accepted`` holds every event id the bus confirmed."""

    def __init__(self, platform):
        self.platform = platform
        self.accepted: dict[str, dict] = {}
        self.failures = 0
        self._n = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def batch(self, size=10):
        now = datetime.now(UTC)
        rows = []
        for _ in range(size):
            i = self._n = self._n + 1
            rows.append({
                "event_id": f"ev-{i}", "applicant_id": i % KEYS, "amount": float(i % 97),
                "merchant": f"m{i % 5}", "checkout_ts": now - timedelta(seconds=i % 50),
            })
        return rows

    def send(self, rows):
        while True:
            try:
                self.platform.features.ingest("checkouts", rows)
            except EventBusUnavailable:
                self.failures += 1
                time.sleep(0.05)
                continue
            self.accepted.update({r["event_id"]: r for r in rows})
            return

    def start(self, every_s=0.05):
        def run():
            while not self._stop.is_set():
                self.send(self.batch())
                self._stop.wait(every_s)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(60)


def wait_drained(platform, expected_online: set[str], timeout_s=60.0):
    """Until the group has nothing pending or undelivered and every expected event is online."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = platform.bus.info("checkouts", GROUP)
        online = online_ids(platform)
        if info.pending == 0 and info.lag == 0 and expected_online <= online:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained after {timeout_s}s: {info}, {len(expected_online - online)} events not online")
        time.sleep(0.2)


def online_state(platform):
    keys = [encode_key([k]) for k in range(KEYS)]
    return dict(zip(keys, platform.features.online_store.fetch_events("applicant_activity", keys, after_us=-(2**62)), strict=True))


def online_ids(platform) -> set[str]:
    return {e.event_id for events in online_state(platform).values() for e in events}


def check_exactly_once(platform, accepted: set[str], late: set[str] = frozenset()):
    state = online_state(platform)
    ids = [e.event_id for events in state.values() for e in events]
    assert len(ids) == len(set(ids)), "an event is kept twice online"
    assert set(ids) == accepted - late  # every accepted on-time event, nothing else

    log = read_events(platform.storage, checkouts)
    assert set(log.column("event_id").to_pylist()) == accepted  # late ones are logged too
    usable = realtime.usable(activity, realtime.from_table(activity, log))
    assert sorted(usable.event_id.tolist()) == sorted(accepted - late)  # deduplicated: each once

    # the same values from the online state and from the offline log, at one instant
    at = [time.time_ns() // 1000]
    for key, events in state.items():
        offline = log.filter(pc.equal(log.column("applicant_id"), int(key.strip("[]"))))
        assert realtime.aggregate(activity, realtime.EventArrays.from_encoded(activity, events), at) == realtime.aggregate(
            activity, realtime.from_table(activity, offline), at
        )
    return log


def stop(processors, ray):
    handles = list(processors.handles.values())
    try:
        return processors.stop(timeout_s=30)
    except Exception:
        for handle in handles:
            ray.kill(handle, no_restart=True)
        raise


@pytest.mark.parametrize(
    "online",
    [
        "sqlite",
        pytest.param(
            "redis",
            marks=pytest.mark.skipif(
                not issubclass(RedisOnlineStore, EventState), reason="the Redis online store's event state has not landed"
            ),
        ),
    ],
)
def test_events_are_applied_once_late_and_duplicate_ones_as_the_semantics_say(tmp_path, ray_session, request, online):
    store = None
    if online == "redis":
        store = {"type": "redis", "url": request.getfixturevalue("redis_server").url, "timeout": "2s"}
    platform = make_platform(tmp_path, ray_session, online=store)
    now = datetime.now(UTC)
    rows = [
        {"event_id": f"e{i}", "applicant_id": i % 3, "amount": float(i), "merchant": f"m{i}",
         "checkout_ts": now - timedelta(minutes=(i * 7) % 50)}  # out of order
        for i in range(120)
    ]
    rows += [
        {"event_id": "e5", "applicant_id": 2, "amount": 999.0, "merchant": "copy", "checkout_ts": now},  # a later copy
        {"event_id": "late-1", "applicant_id": 1, "amount": 50.0, "merchant": "late", "checkout_ts": now - timedelta(hours=2)},
        {"event_id": "late-2", "applicant_id": 0, "amount": 60.0, "merchant": None, "checkout_ts": now - timedelta(days=3)},
    ]
    platform.features.ingest("checkouts", rows[:60])
    processors = platform.features.start_processors()
    try:
        platform.features.ingest("checkouts", rows[60:])
        accepted = {r["event_id"] for r in rows}
        late = {"late-1", "late-2"}
        wait_drained(platform, accepted - late)
        platform.features.ingest("checkouts", [rows[0] | {"amount": -1.0}])  # a copy long after the first
        wait_drained(platform, accepted - late)
        check_exactly_once(platform, accepted, late)
        kept = {e.event_id: e for events in online_state(platform).values() for e in events}
        assert kept["e5"].values == '{"amount":5.0,"merchant":"m5"}'  # the first copy counts
        assert kept["e0"].values == '{"amount":0.0,"merchant":"m0"}'
    finally:
        final = stop(processors, ray_session)
    assert sum(s["late"] for s in final.values()) == 2
    assert sum(s["applied"] for s in final.values()) == 120  # new events online: copies and late ones are not
    assert all(s["errors"] == 0 for s in final.values())
    assert platform.bus.info("checkouts", GROUP).pending == 0


def test_a_processor_killed_mid_stream_loses_nothing_and_counts_nothing_twice(tmp_path, ray_session):
    platform = make_platform(tmp_path, ray_session)
    sender = Sender(platform)
    processors = platform.features.start_processors().ready()
    try:
        victim = processors.handles[("checkouts", 0)]
        sender.start()
        deadline = time.monotonic() + 30
        while platform.bus.info("checkouts", GROUP).consumers.get("checkouts-0", 0) == 0:  # holding events ...
            assert time.monotonic() < deadline, "processor 0 never held an event"
            time.sleep(0.05)
        pid = ray_session.get(victim.pid.remote())
        os.kill(pid, signal.SIGKILL)  # ... when its worker process dies
        assert ray_session.get(victim.pid.remote(), timeout=60) != pid  # Ray restarted it (the call waited)
        time.sleep(1.0)  # keep ingesting into the restarted processor
        sender.stop()
        wait_drained(platform, set(sender.accepted))
        check_exactly_once(platform, set(sender.accepted))
    finally:
        final = stop(processors, ray_session)
    # what the dead process held was delivered again: to itself restarted, or claimed by the other
    assert sum(s["redelivered"] + s["claimed"] for s in final.values()) > 0


def test_a_redis_restart_during_ingest_loses_no_accepted_event(tmp_path, ray_session):
    server = PersistentRedis(tmp_path, fsync="always").start()
    try:
        bus = {"type": "redis", "url": server.url, "timeout": "2s", "key_prefix": f"t{uuid.uuid4().hex[:8]}"}
        platform = make_platform(tmp_path, ray_session, bus=bus)
        sender = Sender(platform)
        processors = platform.features.start_processors().ready()
        try:
            sender.start()
            time.sleep(1.0)  # the processors are reading and applying ...
            server.kill()  # SIGKILL, with appendfsync always: an acknowledged event is on disk
            time.sleep(0.5)
            server.start()
            time.sleep(1.0)
            sender.stop()
            assert sender.failures > 0  # the outage hit ingest (those batches were sent again)
            wait_drained(platform, set(sender.accepted))
            check_exactly_once(platform, set(sender.accepted))
        finally:
            final = stop(processors, ray_session)
    finally:
        server.stop()
    assert all(s["errors"] > 0 for s in final.values())  # the outage hit every processor too (they retried)
