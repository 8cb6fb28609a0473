"""The embedded event bus: one SQLite file on one machine (the local default).

    bus = SqliteEventBus(".mlplatform/streams/events.db")

Layout::

    mlp_events(position INTEGER PRIMARY KEY AUTOINCREMENT, stream, known_us, payload JSON)
    mlp_groups(stream, grp, last_delivered)                   a group's read cursor
    mlp_pending(stream, grp, position, consumer, delivered_us, deliveries)
    mlp_clock(last_known_us)                                  keeps known_us non-decreasing

A message's position is its row id: AUTOINCREMENT never reuses one, even after trimming, so
positions only grow (one sequence for every stream of the file). ``known_us`` is this
machine's clock when the append's transaction took the write lock — it commits right after —
or the previous append's ``known_us`` if the clock went back, so it never decreases along
positions.

**Durability.** One append is one transaction, committed in WAL mode with
``synchronous=FULL``: the WAL is fsynced before ``append`` returns. An accepted message
survives the process being killed and the machine losing power (on a disk that honours
fsync); a failed append left nothing (the transaction rolled back). Several processes may use
one file (ingest in a driver or a Serve replica, processors in Ray actors): writers queue on
the busy timeout, readers never block.

Consumer groups work as in Redis Streams (see ``base``): ``read`` moves the group's cursor and
records each delivered message as pending for the consumer in the same transaction, so a
message is delivered to one consumer unless it is claimed or read again as pending.
A blocking ``read`` polls (a cheap read-only check every 20 ms), taking the write lock only
when there is something to deliver.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlplatform.errors import NotFoundError
from mlplatform.streams.base import Accepted, EventBus, EventBusUnavailable, GroupInfo, Message

__all__ = ["SqliteEventBus"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mlp_events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    known_us INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mlp_events_stream ON mlp_events (stream, position);
CREATE TABLE IF NOT EXISTS mlp_groups (
    stream TEXT NOT NULL,
    grp TEXT NOT NULL,
    last_delivered INTEGER NOT NULL,
    PRIMARY KEY (stream, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mlp_pending (
    stream TEXT NOT NULL,
    grp TEXT NOT NULL,
    position INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    delivered_us INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    PRIMARY KEY (stream, grp, position)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mlp_pending_consumer ON mlp_pending (stream, grp, consumer, position);
CREATE TABLE IF NOT EXISTS mlp_clock (id INTEGER PRIMARY KEY CHECK (id = 0), last_known_us INTEGER NOT NULL);
"""
_POLL_S = 0.02
_IN_CHUNK = 500


def _now_us() -> int:
    return time.time_ns() // 1000


class SqliteEventBus(EventBus):
    """Event bus in one SQLite file (WAL, fsync per append); see the module doc.

    Args:
        path: the database file; its folder is created if needed.
        busy_timeout: seconds a writer waits for another writer before failing.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 60.0) -> None:
        self.path = str(Path(path).expanduser().resolve())
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"SqliteEventBus({self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "busy_timeout": self.busy_timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], busy_timeout=state["busy_timeout"])

    # ----------------------------------------------------------------------- connection
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: an accepted append is on disk
        have = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'mlp_clock'").fetchone()[0]
        if not have:
            conn.executescript(_SCHEMA)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) under the thread lock."""
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise EventBusUnavailable(f"event bus {self.path!r} cannot be written: {exc}") from None
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise EventBusUnavailable(f"event bus {self.path!r}: commit failed, nothing was accepted: {exc}") from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as exc:
                raise EventBusUnavailable(f"event bus {self.path!r} cannot be read: {exc}") from None

    # ---------------------------------------------------------------------------- write
    def append(self, stream: str, payloads: Sequence[Mapping[str, Any]]) -> list[Accepted]:
        texts = [json.dumps(p, separators=(",", ":"), allow_nan=False) for p in payloads]
        if not texts:
            return []
        try:
            with self._write() as conn:
                last = conn.execute("SELECT last_known_us FROM mlp_clock WHERE id = 0").fetchone()
                known = max(_now_us(), last[0] if last else 0)
                conn.execute(
                    "INSERT INTO mlp_clock (id, last_known_us) VALUES (0, ?) "
                    "ON CONFLICT (id) DO UPDATE SET last_known_us = excluded.last_known_us",
                    (known,),
                )
                insert = "INSERT INTO mlp_events (stream, known_us, payload) VALUES (?, ?, ?)"
                positions = [conn.execute(insert, (stream, known, text)).lastrowid for text in texts]
        except sqlite3.Error as exc:
            raise EventBusUnavailable(f"event bus {self.path!r}: append failed, nothing was accepted: {exc}") from None
        return [Accepted(int(p), known) for p in positions]

    # -------------------------------------------------------------------------- groups
    def create_group(self, stream: str, group: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO mlp_groups (stream, grp, last_delivered) VALUES (?, ?, 0) ON CONFLICT DO NOTHING", (stream, group)
            )

    def _cursor(self, conn: sqlite3.Connection, stream: str, group: str) -> int:
        row = conn.execute("SELECT last_delivered FROM mlp_groups WHERE stream = ? AND grp = ?", (stream, group)).fetchone()
        if row is None:
            raise NotFoundError(f"stream {stream!r} has no consumer group {group!r}; create it first (create_group)")
        return int(row[0])

    def read(self, stream: str, group: str, consumer: str, *, count: int, block_ms: int = 0) -> list[Message]:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            with self._read() as conn:
                cursor = self._cursor(conn, stream, group)
                waiting = conn.execute(
                    "SELECT 1 FROM mlp_events WHERE stream = ? AND position > ? LIMIT 1", (stream, cursor)
                ).fetchone()
            if waiting:
                messages = self._deliver_new(stream, group, consumer, count)
                if messages:
                    return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(_POLL_S, remaining))

    def _deliver_new(self, stream: str, group: str, consumer: str, count: int) -> list[Message]:
        with self._write() as conn:
            cursor = self._cursor(conn, stream, group)
            rows = conn.execute(
                "SELECT position, known_us, payload FROM mlp_events WHERE stream = ? AND position > ? ORDER BY position LIMIT ?",
                (stream, cursor, count),
            ).fetchall()
            if not rows:
                return []
            now = _now_us()
            conn.executemany(
                "INSERT INTO mlp_pending (stream, grp, position, consumer, delivered_us, deliveries) VALUES (?, ?, ?, ?, ?, 1)",
                [(stream, group, r[0], consumer, now) for r in rows],
            )
            conn.execute("UPDATE mlp_groups SET last_delivered = ? WHERE stream = ? AND grp = ?", (rows[-1][0], stream, group))
        return [Message(int(p), int(k), json.loads(t)) for p, k, t in rows]

    def read_pending(self, stream: str, group: str, consumer: str, *, count: int, after: int = 0) -> list[Message]:
        with self._write() as conn:
            self._cursor(conn, stream, group)
            rows = conn.execute(
                "SELECT e.position, e.known_us, e.payload FROM mlp_pending p JOIN mlp_events e ON e.position = p.position "
                "WHERE p.stream = ? AND p.grp = ? AND p.consumer = ? AND p.position > ? ORDER BY p.position LIMIT ?",
                (stream, group, consumer, after, count),
            ).fetchall()
            self._redeliver(conn, stream, group, consumer, [r[0] for r in rows])
        return [Message(int(p), int(k), json.loads(t)) for p, k, t in rows]

    def claim_stale(self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int) -> list[Message]:
        with self._write() as conn:
            self._cursor(conn, stream, group)
            rows = conn.execute(
                "SELECT e.position, e.known_us, e.payload FROM mlp_pending p JOIN mlp_events e ON e.position = p.position "
                "WHERE p.stream = ? AND p.grp = ? AND p.delivered_us <= ? ORDER BY p.position LIMIT ?",
                (stream, group, _now_us() - min_idle_ms * 1000, count),
            ).fetchall()
            self._redeliver(conn, stream, group, consumer, [r[0] for r in rows])
        return [Message(int(p), int(k), json.loads(t)) for p, k, t in rows]

    @staticmethod
    def _redeliver(conn: sqlite3.Connection, stream: str, group: str, consumer: str, positions: Sequence[int]) -> None:
        now = _now_us()
        conn.executemany(
            "UPDATE mlp_pending SET consumer = ?, delivered_us = ?, deliveries = deliveries + 1 "
            "WHERE stream = ? AND grp = ? AND position = ?",
            [(consumer, now, stream, group, p) for p in positions],
        )

    def ack(self, stream: str, group: str, positions: Sequence[int]) -> int:
        positions = [int(p) for p in positions]
        done = 0
        with self._write() as conn:
            for at in range(0, len(positions), _IN_CHUNK):
                chunk = positions[at : at + _IN_CHUNK]
                done += conn.execute(
                    f"DELETE FROM mlp_pending WHERE stream = ? AND grp = ? AND position IN ({','.join('?' * len(chunk))})",
                    (stream, group, *chunk),
                ).rowcount
        return done

    # ------------------------------------------------------------------------ progress
    def info(self, stream: str, group: str) -> GroupInfo:
        with self._read() as conn:
            conn.execute("BEGIN")  # one snapshot for the four queries
            try:
                cursor = self._cursor(conn, stream, group)
                consumers = dict(
                    conn.execute(
                        "SELECT consumer, count(*) FROM mlp_pending WHERE stream = ? AND grp = ? GROUP BY consumer",
                        (stream, group),
                    ).fetchall()
                )
                oldest = conn.execute(
                    "SELECT min(delivered_us) FROM mlp_pending WHERE stream = ? AND grp = ?", (stream, group)
                ).fetchone()[0]
                lag = conn.execute(
                    "SELECT count(*) FROM mlp_events WHERE stream = ? AND position > ?", (stream, cursor)
                ).fetchone()[0]
            finally:
                conn.execute("COMMIT")
        return GroupInfo(
            group=group,
            pending=sum(consumers.values()),
            lag=int(lag),
            last_delivered=cursor,
            consumers=consumers,
            oldest_pending_ms=None if oldest is None else max(0, (_now_us() - int(oldest)) // 1000),
        )

    def trim(self, stream: str) -> int:
        with self._write() as conn:
            # per group, everything below its oldest pending message and up to its cursor is acknowledged
            bound = conn.execute(
                "SELECT min(coalesce((SELECT min(p.position) FROM mlp_pending p WHERE p.stream = g.stream AND p.grp = g.grp),"
                " g.last_delivered + 1)) FROM mlp_groups g WHERE g.stream = ?",
                (stream,),
            ).fetchone()[0]
            if bound is None:  # no group: nobody has acknowledged anything
                return 0
            return conn.execute("DELETE FROM mlp_events WHERE stream = ? AND position < ?", (stream, int(bound))).rowcount

    def length(self, stream: str) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT count(*) FROM mlp_events WHERE stream = ?", (stream,)).fetchone()[0])

