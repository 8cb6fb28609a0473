"""The event bus: durable streams of events, read by consumer groups.

    bus = open_event_bus(config.streams, storage, project="bnpl")   # SQLite or Redis Streams
    bus.append("checkouts", [{"event_id": "e-1", ...}])

Backends share one contract (``EventBus`` in ``base``): ``sqlite`` (embedded default, one
machine) and ``redis`` (Redis Streams), chosen by ``streams.type``. This package knows
messages, not features: what an event must hold and what is done with it is the feature
store's (``mlplatform.features.ingest`` and ``.stream_processor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mlplatform.streams.base import Accepted, EventBus, EventBusUnavailable, GroupInfo, Message

if TYPE_CHECKING:
    from mlplatform.config import RedisStreamsConfig, SqliteStreamsConfig
    from mlplatform.storage import Storage

__all__ = ["Accepted", "EventBus", "EventBusUnavailable", "GroupInfo", "Message", "open_event_bus"]


def open_event_bus(config: SqliteStreamsConfig | RedisStreamsConfig, storage: Storage, *, project: str) -> EventBus:
    """The bus ``config`` describes (nothing connects until first use).

    SQLite without a ``path`` lives at ``<storage root>/streams/events.db`` when the root is a
    local directory; with an ``s3://`` root at ``./.mlplatform-streams/<project>.db`` relative
    to the directory of the process that opens it (made absolute then, so Ray actors given the
    bus use the same file). Set ``streams.path`` to choose, or use Redis beyond one machine.
    """
    if config.type == "redis":
        from mlplatform.streams.redis import RedisEventBus

        return RedisEventBus(
            config.url,
            project=project,
            key_prefix=config.key_prefix,
            timeout=config.timeout,
            require_fsync=config.durability == "fsync_always",
            password_env=config.password_env,
        )
    from mlplatform.streams.sqlite import SqliteEventBus

    if config.path is not None:
        return SqliteEventBus(config.path)
    if storage.is_s3:
        return SqliteEventBus(Path(".mlplatform-streams") / f"{project}.db")
    return SqliteEventBus(Path(storage.root) / "streams" / "events.db")
