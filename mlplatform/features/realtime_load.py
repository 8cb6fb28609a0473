"""Load a real-time view's recent events from the offline log into the online event state.

    load_online_events(storage, online_store, view)   # after importing history, or a new store

The stream processors keep the online state current as events arrive; this fills it from
the log instead — a fresh online store, a view applied after its events were logged, or a
rebuild. It applies the same events the processors would (late ones left out, only those
within ``realtime.retention(view)`` of now), and applying is idempotent by event id, so it
is safe to run while processors run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from mlplatform.features.definitions import FeatureView, StreamSource
from mlplatform.features.event_log import read_events
from mlplatform.features.realtime import encode_events, is_late, retention
from mlplatform.timestamps import CREATED_TIMESTAMP, micros_and_valid

if TYPE_CHECKING:
    from mlplatform.online.events import EventState
    from mlplatform.storage import Storage

__all__ = ["load_online_events"]

_BATCH = 5_000
_US_PER_S = 1_000_000


def load_online_events(storage: Storage, online: EventState, view: FeatureView, now: datetime | None = None) -> int:
    """Apply the logged events of ``view`` that are within its retention at ``now`` (default:
    now) to ``online``; returns how many were new there."""
    source = view.source
    if not isinstance(source, StreamSource):
        raise TypeError(f"view {view.name!r} is not real-time")
    now = now or datetime.now(UTC)
    now_us = int(now.timestamp() * _US_PER_S)
    keep_us = retention(view).total_seconds() * _US_PER_S
    table = read_events(storage, source)
    if table.num_rows == 0:
        return 0
    event_us = micros_and_valid(table.column(source.timestamp_field))[0]
    known_us = micros_and_valid(table.column(CREATED_TIMESTAMP))[0]
    recent = (event_us > now_us - keep_us) & ~is_late(source, event_us, known_us)
    table = table.filter(recent)
    applied = 0
    for start in range(0, table.num_rows, _BATCH):
        events = encode_events(view, table.slice(start, _BATCH))
        applied += online.apply_events(view.name, events, now_us=now_us, retention_us=int(keep_us))
    return applied
