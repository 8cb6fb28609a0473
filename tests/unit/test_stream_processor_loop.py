"""The stream processor's loop without Ray: a processor that dies at any point of a batch —
after applying it online, after logging it offline, before acknowledging it — loses nothing
and counts nothing twice once it (or another processor) carries on.

The loop is the real one (``stream_loop.ProcessorLoop``) on a real SQLite bus and online store; dying is
dropping the loop object without letting it flush, which is what SIGKILL leaves behind (the
Ray fault tests in tests/integration/test_stream_processing.py kill real worker processes).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mlplatform import Aggregation, Entity, FeatureView, Field, Platform
from mlplatform.features.definitions import StreamSource
from mlplatform.features.event_log import read_events
from mlplatform.features.stream_loop import GROUP, ProcessorLoop
from mlplatform.online.base import encode_key
from mlplatform.streams import EventBusUnavailable
from mlplatform.streams.sqlite import SqliteEventBus

applicant = Entity(name="applicant", join_keys=["applicant_id"])
checkouts = StreamSource(
    name="checkouts",
    dataset="events/checkouts",
    timestamp_field="checkout_ts",
    schema=[Field(name="applicant_id", dtype="int64"), Field(name="amount")],
    allowed_lateness="1h",
)
activity = FeatureView(
    name="applicant_activity",
    entities=[applicant],
    source=checkouts,
    aggregations=[Aggregation(function="count", window="1d"), Aggregation(column="amount", function="last_k", k=5, window="1d")],
)
NOW = datetime.now(UTC)


@pytest.fixture
def platform(tmp_path):
    platform = Platform.from_config(
        {
            "storage": {"root": str(tmp_path / "root")},
            "streams": {"batch_size": 7, "block": "10ms", "flush_interval": "10s", "claim_idle": "30s"},
        }
    )
    platform.features.apply([activity])
    yield platform
    platform.bus.close()


def loop(platform, consumer="checkouts-0", bus=None):
    return ProcessorLoop(
        "checkouts", consumer, bus=bus or platform.bus, storage=platform.storage,
        online_store=platform.features.online_store, settings=platform.config.streams,
    )


def ingest(platform, n=20, start=0):
    rows = [
        {"event_id": f"e{i}", "applicant_id": i % 4, "amount": float(i), "checkout_ts": NOW - timedelta(minutes=i - start)}
        for i in range(start, start + n)
    ]
    rows.append({"event_id": f"e{start}", "applicant_id": start % 4, "amount": -1.0, "checkout_ts": NOW})  # a copy
    rows.append({"event_id": f"late{start}", "applicant_id": 0, "amount": 5.0, "checkout_ts": NOW - timedelta(hours=2)})
    platform.features.ingest("checkouts", rows)
    return {f"e{i}" for i in range(start, start + n)}, {f"late{start}"}


def online_ids(platform):
    state = platform.features.online_store.fetch_events(
        "applicant_activity", [encode_key([k]) for k in range(4)], after_us=-(2**62)
    )
    ids = [e.event_id for events in state for e in events]
    assert len(ids) == len(set(ids))  # one copy per event id
    return state, set(ids)


def logged(platform):
    table = read_events(platform.storage, checkouts)
    return table.column("event_id").to_pylist()


def drain(processor, turns=50):
    for _ in range(turns):
        if not processor.step():
            break
    processor.flush()


def test_every_event_once_online_and_in_the_log_late_ones_offline_only(platform):
    on_time, late = ingest(platform)
    processor = loop(platform)
    drain(processor)
    state, ids = online_ids(platform)
    assert ids == on_time
    first_copy = next(e for events in state for e in events if e.event_id == "e0")
    assert first_copy.values == '{"amount":0.0}'  # the copy accepted first counts, not the later one
    assert sorted(logged(platform)) == sorted([*on_time, "e0", *late])  # the log keeps everything, copies too
    assert processor.stats.late == 1 and processor.stats.acked == 22
    info = platform.bus.info("checkouts", GROUP)
    assert (info.pending, info.lag) == (0, 0)


def test_killed_after_applying_online_before_logging(platform):
    on_time, late = ingest(platform)
    dying = loop(platform)
    dying.step()
    dying.step()  # two batches applied online, held for the offline log ...
    assert platform.bus.info("checkouts", GROUP).pending == 14
    del dying  # ... and killed: nothing logged, nothing acknowledged
    assert logged(platform) == []
    restarted = loop(platform)  # Ray restarts it under the same consumer name
    drain(restarted)
    assert restarted.stats.redelivered == 14
    assert online_ids(platform)[1] == on_time
    assert sorted(logged(platform)) == sorted([*on_time, "e0", *late])  # each logged once: the kill came before the log
    assert platform.bus.info("checkouts", GROUP).pending == 0


class AckFails(SqliteEventBus):
    """The bus as a processor killed between writing the log and acknowledging sees it."""

    def ack(self, stream, group, positions):
        raise EventBusUnavailable("killed before the acknowledgement")


def test_killed_after_logging_before_acknowledging(platform):
    on_time, late = ingest(platform)
    dying = loop(platform, bus=AckFails(platform.bus.path))
    dying.step()
    with pytest.raises(EventBusUnavailable):
        dying.flush()
    assert len(logged(platform)) == 7  # the first batch is in the log, but not acknowledged
    del dying
    restarted = loop(platform)
    drain(restarted)
    assert online_ids(platform)[1] == on_time
    rows = logged(platform)
    assert len(rows) == 22 + 7  # the first batch twice: readers dedupe by id ...
    assert set(rows) == on_time | late  # ... and find every event


def test_a_processor_that_never_comes_back_has_its_events_taken_over(platform):
    on_time, late = ingest(platform)
    dying = loop(platform, consumer="checkouts-0")
    dying.step()
    del dying
    other = loop(platform, consumer="checkouts-1")
    other.settings = other.settings.model_copy(update={"claim_idle": timedelta(0)})  # idle already
    drain(other)
    assert other.stats.claimed == 7
    assert online_ids(platform)[1] == on_time
    assert set(logged(platform)) == on_time | late
    assert platform.bus.info("checkouts", GROUP).pending == 0


def test_events_keep_flowing_into_a_view_registered_later(platform):
    ingest(platform, n=5)
    processor = loop(platform)
    drain(processor)
    later = activity.model_copy(update={"name": "applicant_activity_7d"})
    platform.features.apply([later])
    processor.settings = processor.settings.model_copy(update={"flush_interval": timedelta(0)})  # re-read the registry
    on_time, _ = ingest(platform, n=5, start=100)
    drain(processor)
    state = platform.features.online_store.fetch_events(
        "applicant_activity_7d", [encode_key([k]) for k in range(4)], after_us=-(2**62)
    )
    assert {e.event_id for events in state for e in events} == on_time
