"""One stream processor's work, without Ray: read the bus, apply online, log offline, acknowledge.

    loop = ProcessorLoop("checkouts", "checkouts-0", bus=bus, storage=storage,
                         online_store=online_store, settings=config.streams)
    while running:
        loop.step()          # claim stale or read a batch, apply it, flush when due
    loop.flush()

``mlplatform.features.stream_processor`` runs one loop per Ray actor; the guarantees are
stated there. A turn of the loop:

1. take over messages another consumer left pending for ``claim_idle`` (a dead processor's),
   otherwise read a batch of new ones (waiting up to ``block``); right after a (re)start, this
   consumer's own pending messages come first;
2. for every real-time view on the source (from the registry, re-read every flush interval):
   drop late events (``realtime.is_late``), ``realtime.encode_events``,
   ``online_store.apply_events`` — the values are live now;
3. keep the batch in memory; every ``flush_interval`` (or ``flush_events`` events) append the
   kept batches to the offline log (``event_log.append_events``), THEN acknowledge them.

A failed step keeps what it holds (a batch not applied is applied again, a flush is finished
before anything new is read), so calling ``step`` again after an error loses nothing.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from mlplatform.features import event_log, realtime
from mlplatform.features.definitions import FeatureView, StreamSource
from mlplatform.features.ingest import events_table
from mlplatform.features.registry import FeatureRegistry

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.config import RedisStreamsConfig, SqliteStreamsConfig
    from mlplatform.online.events import EventState
    from mlplatform.storage import Storage
    from mlplatform.streams import EventBus, Message

    StreamSettings = SqliteStreamsConfig | RedisStreamsConfig

__all__ = ["GROUP", "LoopStats", "ProcessorLoop", "consumer_name"]

log = logging.getLogger(__name__)

#: The consumer group of the stream processors, on every source's stream.
GROUP = "processors"
_US = timedelta(microseconds=1)
_TRIM_EVERY_S = 30.0
_MAX_BACKOFF_S = 5.0


def consumer_name(source: str, index: int) -> str:
    """The consumer name of processor ``index`` of ``source`` (stable across restarts)."""
    return f"{source}-{index}"


@dataclass
class LoopStats:
    """Counters of one processor since it (re)started."""

    read: int = 0
    claimed: int = 0
    redelivered: int = 0
    applied: int = 0
    late: int = 0
    rejected: int = 0
    logged: int = 0
    acked: int = 0
    flushes: int = 0
    errors: int = 0
    trimmed: int = 0
    last_error: str | None = None


class ProcessorLoop:
    """One consumer's work on one stream source; ``StreamProcessor`` runs it in a Ray actor.

    Args:
        source: the stream source's name.
        consumer: this consumer's name in ``GROUP`` (stable across restarts).
        bus, storage, online_store: where events come from and go to.
        settings: the ``streams`` config section (batch size, block, flush interval, ...).
        clock: seconds since the epoch (the ``now`` of online trimming).
    """

    def __init__(
        self,
        source: str,
        consumer: str,
        *,
        bus: EventBus,
        storage: Storage,
        online_store: EventState,
        settings: StreamSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source_name = source
        self.consumer = consumer
        self.bus = bus
        self.storage = storage
        self.online_store = online_store
        self.settings = settings
        self.clock = clock
        self.registry = FeatureRegistry(storage)
        self.stats = LoopStats()
        self._source: StreamSource | None = None
        self._views: list[FeatureView] = []
        self._views_at = float("-inf")
        self._retry: list[Message] = []  # read, not yet applied (the online store failed)
        self._tables: list[pa.Table] = []  # applied online, not yet logged
        self._rejected: list[tuple[Message, str]] = []
        self._unacked: list[int] = []  # applied and logged, not yet acknowledged
        self._held: list[int] = []  # positions of _tables and _rejected
        self._last_flush = time.monotonic()
        self._last_claim = float("-inf")
        self._last_trim = time.monotonic()
        self._recovered = False
        self._recover_after = 0

    # ------------------------------------------------------------------------- the loop
    def step(self) -> int:
        """One turn: recover or claim or read a batch, apply it, flush when due. Returns how
        many messages it handled. Raises what the bus, the store or the storage raised (the
        runner backs off and calls again: nothing is lost in between)."""
        if self._unacked or self._backlogged():
            self.flush()
        if self._retry:
            messages, self._retry = self._retry, []
            self._handle(messages)
            return len(messages)
        messages = self._next_batch()
        if messages:
            self._handle(messages)
        if self._flush_due():
            self.flush()
        return len(messages)

    def _next_batch(self) -> list[Message]:
        bus, count = self.bus, self.settings.batch_size
        if not self._recovered:
            # what this consumer held when it last stopped (e.g. killed): its own pending first
            bus.create_group(self.source_name, GROUP)
            pending = bus.read_pending(self.source_name, GROUP, self.consumer, count=count, after=self._recover_after)
            if pending:
                self._recover_after = pending[-1].position
                self.stats.redelivered += len(pending)
                return pending
            self._recovered = True
        claim_every = self.settings.claim_idle.total_seconds() / 2
        if time.monotonic() - self._last_claim >= claim_every:
            self._last_claim = time.monotonic()
            claimed = bus.claim_stale(
                self.source_name, GROUP, self.consumer, min_idle_ms=int(self.settings.claim_idle / timedelta(milliseconds=1)),
                count=count,
            )
            mine = set(self._held) | set(self._unacked)
            claimed = [m for m in claimed if m.position not in mine]  # our own, idle only because we hold them
            if claimed:
                self.stats.claimed += len(claimed)
                log.info("%s took over %d events left pending by a stopped processor", self.consumer, len(claimed))
                return claimed
        wait = self.settings.block
        if self._tables or self._rejected:
            wait = min(wait, max(timedelta(0), self.settings.flush_interval - timedelta(seconds=time.monotonic() - self._last_flush)))
        block_ms = int(wait / timedelta(milliseconds=1))
        return bus.read(self.source_name, GROUP, self.consumer, count=count, block_ms=block_ms)

    def _handle(self, messages: list[Message]) -> None:
        try:
            source, views = self._definitions()
            table, rejected = events_table(source, messages)
            self._apply(views, table)
        except BaseException:
            self._retry = messages  # not applied (or not everywhere): apply the batch again
            raise
        self.stats.read += len(messages)
        for message, why in rejected:
            log.error("%s: event at position %d does not fit stream source %r (%s); kept under streams/rejected",
                      self.consumer, message.position, source.name, why)
        self._rejected += rejected
        self.stats.rejected += len(rejected)
        if table.num_rows:
            self._tables.append(table)
        self._held += [m.position for m in messages]

    def _apply(self, views: Sequence[FeatureView], table: pa.Table) -> None:
        import pyarrow as pa

        from mlplatform.timestamps import CREATED_TIMESTAMP, micros_and_valid

        if not table.num_rows:
            return
        now_us = int(self.clock() * 1_000_000)
        known_us = micros_and_valid(table.column(CREATED_TIMESTAMP))[0]
        assert self._source is not None
        event_us = micros_and_valid(table.column(self._source.timestamp_field))[0]
        self.stats.late += int(realtime.is_late(self._source, event_us, known_us).sum())
        for view in views:
            source = view.source  # the view's own (registered with it), as realtime reads it
            assert isinstance(source, StreamSource)
            late = realtime.is_late(source, micros_and_valid(table.column(source.timestamp_field))[0], known_us)
            on_time = table.filter(pa.array(~late)) if late.any() else table
            events = realtime.encode_events(view, on_time)
            if events:
                retention_us = realtime.retention(view) // _US
                self.stats.applied += self.online_store.apply_events(
                    view.name, events, now_us=now_us, retention_us=retention_us
                )

    def _definitions(self) -> tuple[StreamSource, list[FeatureView]]:
        """The source and its real-time views, re-read from the registry every flush interval."""
        if self._source is None or time.monotonic() - self._views_at >= self.settings.flush_interval.total_seconds():
            source = self.registry.get("stream_source", self.source_name)
            assert isinstance(source, StreamSource)
            views = [
                v for v in self.registry.list("feature_view")
                if isinstance(v, FeatureView) and v.is_realtime and v.source.name == source.name and v.aggregations
            ]
            self._source, self._views, self._views_at = source, views, time.monotonic()
        return self._source, self._views

    # ---------------------------------------------------------------------------- flush
    def _flush_due(self) -> bool:
        if not (self._tables or self._rejected):
            return False
        held = sum(t.num_rows for t in self._tables) + len(self._rejected)
        return held >= self.settings.flush_events or time.monotonic() - self._last_flush >= self.settings.flush_interval.total_seconds()

    def _backlogged(self) -> bool:
        return sum(t.num_rows for t in self._tables) + len(self._rejected) >= self.settings.flush_events

    def flush(self) -> int:
        """Append what was applied to the offline log, then acknowledge it. Returns how many
        messages were acknowledged. Safe to call again after it raised."""
        import pyarrow as pa

        if self._tables or self._rejected:
            source = self._source
            assert source is not None
            if self._tables:
                table = pa.concat_tables(self._tables)
                event_log.append_events(self.storage, source, table)
                self.stats.logged += table.num_rows
                self._tables = []
            if self._rejected:
                self._keep_rejected(source)
                self._rejected = []
            self._unacked += self._held
            self._held = []
        self._last_flush = time.monotonic()
        if not self._unacked:
            return 0
        positions = self._unacked
        self.bus.ack(self.source_name, GROUP, positions)
        self._unacked = []
        self.stats.acked += len(positions)
        self.stats.flushes += 1
        if time.monotonic() - self._last_trim >= _TRIM_EVERY_S:
            self._last_trim = time.monotonic()
            self.stats.trimmed += self.bus.trim(self.source_name)
        return len(positions)

    def _keep_rejected(self, source: StreamSource) -> None:
        lines = io.StringIO()
        for message, why in self._rejected:
            record = {"position": message.position, "known_us": message.known_us, "error": why, "payload": message.payload}
            lines.write(json.dumps(record, default=str) + "\n")
        first, last = self._rejected[0][0].position, self._rejected[-1][0].position
        self.storage.write_bytes(f"streams/rejected/{source.name}/{first:020d}-{last:020d}.jsonl", lines.getvalue().encode())

    # ---------------------------------------------------------------------------- runner
    def run(self, stop: threading.Event) -> None:
        """``step`` until ``stop`` is set, backing off on errors; then a last flush."""
        backoff = 0.1
        while not stop.is_set():
            try:
                self.step()
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - the bus or a store failed: retry, nothing is lost
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %s; retrying in %.1fs", self.consumer, self.stats.last_error, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        for attempt in range(3):
            try:
                if self._retry:
                    self._handle(self._retry)
                self.flush()
                return
            except Exception as exc:  # noqa: BLE001 - what is left stays pending on the bus
                log.warning("%s: final flush failed (%s)%s", self.consumer, exc, "; retrying" if attempt < 2 else "")
                time.sleep(0.2)
