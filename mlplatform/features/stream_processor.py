"""Stream processors: Ray actors that apply the event bus to online state and the offline log.

    processors = platform.features.start_processors()    # every stream source, as configured
    processors.stats()                                   # per processor: read, applied, logged, ...
    processors.stop()                                    # flush, acknowledge, stop

Each stream source gets ``streams.processors`` actors (``StreamProcessor``), spread over the
cluster's nodes, each one consumer (``<source>-<i>``) of the source's group ``processors``.
A processor runs one ``ProcessorLoop`` (``mlplatform.features.stream_loop``): claim what a
dead consumer left or read a batch, apply it online for every real-time view on the source,
append it to the offline log every flush interval, THEN acknowledge it.

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
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ConfigError
from mlplatform.features.definitions import StreamSource
from mlplatform.features.stream_loop import GROUP, ProcessorLoop, consumer_name

if TYPE_CHECKING:
    from mlplatform.config import RedisStreamsConfig, SqliteStreamsConfig
    from mlplatform.online.events import EventState
    from mlplatform.storage import Storage
    from mlplatform.streams import EventBus

    StreamSettings = SqliteStreamsConfig | RedisStreamsConfig

__all__ = ["GROUP", "StreamProcessor", "StreamProcessors", "start_processors"]

log = logging.getLogger(__name__)


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
