"""The event state of the SQLite online store: one table of every real-time view's events.

    store.apply_events("applicant_activity", events, now_us=now, retention_us=ret)   # SqliteOnlineStore
    # -> sqlite_events.apply(conn, ...) inside one write transaction

Layout (one row per kept event, whatever the view)::

    mlp_events(view, k, event_id, event_us, known_us, arrival, payload)   PRIMARY KEY (view, k, event_id)
    mlp_events_time ON mlp_events (view, event_us)                       finds old events to trim

``SqliteOnlineStore`` runs ``apply`` and ``drop`` in one write transaction each (so a call is
atomic for all its keys at once) and ``fetch`` as one query; the guarantees are those of
:mod:`mlplatform.online.events`. Trimming is per view rather than per touched key: every
``apply`` deletes the view's events with ``event_us <= now_us - retention_us``, found through
``mlp_events_time``, so the cost is the rows deleted and a key that no longer gets events
does not outlive its retention by more than the view's next write.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from mlplatform.online.events import EncodedEvent

__all__ = ["SCHEMA", "apply", "drop", "fetch"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS mlp_events (
    view TEXT NOT NULL,
    k TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_us INTEGER NOT NULL,
    known_us INTEGER NOT NULL,
    arrival INTEGER NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (view, k, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mlp_events_time ON mlp_events (view, event_us);
"""

_INSERT_NEW = (
    "INSERT INTO mlp_events (view, k, event_id, event_us, known_us, arrival, payload) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (view, k, event_id) DO NOTHING"
)
# A kept copy gives way only to a strictly earlier one: an exact (known_us, arrival) tie is
# the same copy delivered twice.
_KEEP_EARLIEST = (
    "UPDATE mlp_events SET event_us = ?4, known_us = ?5, arrival = ?6, payload = ?7 "
    "WHERE view = ?1 AND k = ?2 AND event_id = ?3 AND (known_us, arrival) > (?5, ?6)"
)


def apply(conn: sqlite3.Connection, view: str, events: Sequence[EncodedEvent], *, now_us: int, retention_us: int) -> int:
    """Keep ``events`` of ``view`` (the earliest copy per ``(key, event_id)``), skip those with
    ``event_us <= now_us - retention_us`` and delete the view's events that old. Run it inside
    one write transaction.

    Returns:
        How many ``(key, event_id)`` were not kept before the call.
    """
    cutoff = now_us - retention_us
    fresh = [
        (view, e.key, e.event_id, e.event_us, e.known_us, e.arrival, e.values) for e in events if e.event_us > cutoff
    ]
    # Two passes rather than one upsert, because an upsert's change count cannot tell a new
    # event from a replaced copy: the insert counts the new ones, the update then lets the
    # earliest of all copies (the call's and the kept one) win.
    new = conn.executemany(_INSERT_NEW, fresh).rowcount if fresh else 0
    if fresh:
        conn.executemany(_KEEP_EARLIEST, fresh)
    conn.execute("DELETE FROM mlp_events WHERE view = ? AND event_us <= ?", (view, cutoff))
    return new


def fetch(conn: sqlite3.Connection, view: str, keys: Sequence[str], *, after_us: int) -> list[list[EncodedEvent]]:
    """Per key of ``keys``, in order, the kept events of ``view`` with ``event_us > after_us``
    (any order), read by one query for the whole batch."""
    if not keys:
        return []
    # The keys travel as one JSON array, so a batch of any size is one statement. The unary
    # plus keeps the planner on the primary key (view, k): without it, it prefers scanning
    # the whole view's recent events through mlp_events_time.
    rows = conn.execute(
        "SELECT k, event_id, event_us, known_us, arrival, payload FROM mlp_events "
        "WHERE view = ? AND k IN (SELECT value FROM json_each(?)) AND +event_us > ?",
        (view, json.dumps(list(dict.fromkeys(keys))), after_us),
    ).fetchall()
    by_key: dict[str, list[EncodedEvent]] = {}
    for row in rows:
        by_key.setdefault(row[0], []).append(EncodedEvent(*row))
    return [list(by_key.get(key, ())) for key in keys]


def drop(conn: sqlite3.Connection, view: str) -> None:
    """Delete every event of ``view``."""
    conn.execute("DELETE FROM mlp_events WHERE view = ?", (view,))
