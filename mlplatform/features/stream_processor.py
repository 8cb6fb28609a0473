"""Stream processors: Ray actors that apply the event bus to online state and the offline log.

    processors = platform.features.start_processors()    # every stream source, as configured
    processors.stats()                                   # per processor: read, applied, logged, ...
    processors.stop()                                    # flush, acknowledge, stop

Each stream source gets ``streams.processors`` actors (``StreamProcessor``), spread over the
cluster's nodes, each one consumer (``<source>-<i>``) of the source's group ``processors``.
A processor's loop (``ProcessorLoop``):

1. take over messages another consumer left pending for ``claim_idle`` (a dead processor's),
   otherwise read a batch of new ones (waiting up to ``block``);
2. for every real-time view on the source (from the registry, re-read every flush interval):
   drop late events, ``encode_events``, ``online_store.apply_events`` — the values are live now;
3. keep the batch in memory; every ``flush_interval`` (or ``flush_events`` events) append the
   kept batches to the offline log (``event_log.append_events``), THEN acknowledge them.

**Guarantees.** A message is acknowledged only after it is applied online and written to the
offline log, so a processor killed at any point (SIGKILL included) loses nothing: what it had
not acknowledged is delivered again — to itself when Ray restarts it (its own pending first),
or to another processor after ``claim_idle``. Nothing counts twice: ``apply_events`` keeps one
copy per event id, and the offline log may hold copies that every reader dedupes by id
(``realtime.usable``). A processor that cannot reach the online store or the storage root
keeps its batch and retries with backoff, reading nothing new meanwhile; the bus holds the rest.
A message that does not fit its source (not written by ``ingest``, or under an older schema)
is logged, kept as JSON lines under ``streams/rejected/<source>/`` and acknowledged, so one bad
message cannot stall a stream.

Actors are restartable (``max_restarts=-1``; their methods are idempotent, so calls are retried
across a restart) and named ``mlp-stream-<root hash>-<source>-<i>``: starting again attaches
to running ones (``get_if_exists``). ``start_processors(..., detached=True)`` keeps them alive
after the starting process exits (for the serving application).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ConfigError
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

__all__ = ["GROUP", "ProcessorLoop", "StreamProcessor", "StreamProcessors", "consumer_name", "start_processors"]

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


class StreamProcessor:
    """A Ray actor running one ``ProcessorLoop`` in a thread of its own (so ``stats`` and
    ``stop`` answer while it works). Ray restarts it after a crash and the loop starts over
    from the bus: its own pending messages first."""

    def __init__(
        self, source: str, index: int, *, bus: EventBus, storage: Storage, online_store: EventState, settings: StreamSettings
    ) -> None:
        self.loop = ProcessorLoop(
            source, consumer_name(source, index), bus=bus, storage=storage, online_store=online_store, settings=settings
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.loop.run, args=(self._stop,), name=f"stream-{source}-{index}", daemon=True)
        self._thread.start()

    def pid(self) -> int:
        """The worker process id (what a fault test kills)."""
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        stats = self.loop.stats
        return {**vars(stats), "consumer": self.loop.consumer, "running": self._thread.is_alive(), "pid": os.getpid()}

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop the loop after a last flush (acknowledging what it applied); returns ``stats``."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.stats()


def _actor_name(storage: Storage, source: str, index: int) -> str:
    root = hashlib.sha256(str(storage.root).encode()).hexdigest()[:10]
    return f"mlp-stream-{root}-{source}-{index}"


class StreamProcessors:
    """The processors ``start_processors`` started (or found running): stats, wait, stop."""

    def __init__(self, ray: Any, handles: dict[tuple[str, int], Any]) -> None:
        self._ray = ray
        self.handles = handles

    def __repr__(self) -> str:
        sources = sorted({s for s, _ in self.handles})
        return f"StreamProcessors({len(self.handles)} processors on {', '.join(sources) or 'no sources'})"

    def __str__(self) -> str:
        sources = sorted({s for s, _ in self.handles})
        return f"{len(self.handles)} stream processors on {len(sources)} sources ({', '.join(sources) or 'none'})"

    def ready(self, timeout_s: float = 120.0) -> StreamProcessors:
        """Wait until every processor's actor is up and its loop running; returns self."""
        self._ray.get([h.pid.remote() for h in self.handles.values()], timeout=timeout_s)
        return self

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per consumer name, its counters (see ``LoopStats``)."""
        names = list(self.handles)
        values = self._ray.get([self.handles[n].stats.remote() for n in names])
        return {consumer_name(*n): v for n, v in zip(names, values, strict=True)}

    def wait(self, every_s: float = 10.0) -> None:
        """Block forever (Ctrl-C ends it), logging each processor's counters every ``every_s``."""
        while True:
            time.sleep(every_s)
            for name, s in self.stats().items():
                log.info(
                    "%s: read %d, applied %d, late %d, logged %d, acked %d, errors %d",
                    name, s["read"], s["applied"], s["late"], s["logged"], s["acked"], s["errors"],
                )

    def stop(self, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """Flush, acknowledge and stop every processor; returns their final counters."""
        names = list(self.handles)
        refs = [self.handles[n].stop.remote(timeout_s) for n in names]
        final = dict(zip([consumer_name(*n) for n in names], self._ray.get(refs, timeout=timeout_s + 30), strict=True))
        for n in names:
            self._ray.kill(self.handles[n], no_restart=True)
        self.handles = {}
        return final


def start_processors(
    ray: Any,
    sources: Sequence[StreamSource],
    *,
    bus: EventBus,
    storage: Storage,
    online_store: EventState,
    settings: StreamSettings,
    detached: bool = False,
) -> StreamProcessors:
    """Start ``settings.processors`` processors per source of ``sources`` (or attach to those
    already running under the same names), spread over the cluster's nodes.

    Args:
        ray: the connected ``ray`` module.
        detached: keep them running after this process exits (the serving application);
            otherwise they stop with the Ray job that started them.

    Raises:
        ConfigError: the online store keeps no event state (``EventState``).
    """
    from mlplatform.online.events import EventState

    if not isinstance(online_store, EventState):
        raise ConfigError(
            f"the online store {online_store!r} keeps no event state (EventState), so stream processors cannot apply events"
        )
    actor = ray.remote(max_restarts=-1, max_task_retries=-1)(StreamProcessor)
    handles = {}
    for source in sources:
        bus.create_group(source.name, GROUP)  # here, so the group's progress is readable on return
        for index in range(settings.processors):
            options: dict[str, Any] = {
                "name": _actor_name(storage, source.name, index),
                "get_if_exists": True,
                "num_cpus": settings.processor_cpus,
                "scheduling_strategy": "SPREAD",
            }
            if detached:
                options["lifetime"] = "detached"
            handles[(source.name, index)] = actor.options(**options).remote(
                source.name, index, bus=bus, storage=storage, online_store=online_store, settings=settings
            )
    log.info("started %d stream processors on %s", len(handles), ", ".join(s.name for s in sources) or "no sources")
    return StreamProcessors(ray, handles)
