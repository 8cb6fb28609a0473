"""The embedded online store: one SQLite file on one machine (the local default).

    store = SqliteOnlineStore(".mlplatform/online/online.db")

Layout::

    mlp_generations(id, view, state, begun_at, published_at)   state: writing | published | kept |
                                                                 withdrawn | dead | dropped
    mlp_pointers(view PRIMARY KEY, generation)                  the generation readers see
    mlp_rows_<id>(k PRIMARY KEY, e, c, v) WITHOUT ROWID          one table per generation:
                                                                 encoded key, event µs, created µs, JSON
    mlp_events(view, k, event_id, ...)                           real-time views' raw events
                                                                 (the event state, see ``sqlite_events``)

Generation ids come from an AUTOINCREMENT column, so an id is never reused: a writer still
holding a dead generation's id can only fail, never write into someone else's table.
``publish`` switches the pointer and keeps the previous generation (``kept``), marking those
beyond ``keep_generations`` dead, in one transaction, then drops dead tables. ``rollback``
switches the pointer to a kept generation in one transaction. A read runs its two queries (pointer, row) in one read transaction, so it
sees one committed state even while a publish lands.

The file runs in WAL mode: readers (several processes, e.g. Serve replicas) never block and
are never blocked by the one writer at a time; writers queue on a busy timeout. Every write
transaction is short (one batch), so readers always read a complete, committed state.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlplatform.errors import ConfigError, ConflictError, StorageError
from mlplatform.online import sqlite_events
from mlplatform.online.base import (
    EncodedRow,
    Generation,
    OnlineStore,
    OnlineStoreUnavailable,
    OnlineView,
    name_of,
    unknown_generation,
)
from mlplatform.online.events import EncodedEvent, EventState

__all__ = ["SqliteOnlineStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mlp_generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    view TEXT NOT NULL,
    state TEXT NOT NULL,
    begun_at TEXT NOT NULL,
    published_at TEXT
);
CREATE INDEX IF NOT EXISTS mlp_generations_view ON mlp_generations (view, state);
CREATE TABLE IF NOT EXISTS mlp_pointers (view TEXT PRIMARY KEY, generation INTEGER NOT NULL);
""" + sqlite_events.SCHEMA
_TABLES = ("mlp_generations", "mlp_pointers", "mlp_events")
_WRITE_CHUNK = 5000
_IN_CHUNK = 500  # SQLite's default limit on bound parameters is far above this


def _table(generation: int | str) -> str:
    return f"mlp_rows_{int(generation)}"


def _upsert_sql(generation: int | str) -> str:
    # Newer (event, created) wins; equal replaces, so replaying a write is harmless.
    t = _table(generation)
    return (
        f"INSERT INTO {t} (k, e, c, v) VALUES (?, ?, ?, ?) ON CONFLICT (k) DO UPDATE SET "
        f"e = excluded.e, c = excluded.c, v = excluded.v "
        f"WHERE excluded.e > {t}.e OR (excluded.e = {t}.e AND excluded.c >= {t}.c)"
    )


class SqliteOnlineStore(OnlineStore, EventState):
    """Online store in one SQLite file (WAL mode), safe for many reading processes and one
    writer at a time; see the module doc for the layout. Also keeps real-time views' events
    (``EventState``).

    Args:
        path: the database file; its folder is created if needed.
        busy_timeout: seconds a writer waits for another writer's transaction before failing.
        keep_generations: published generations kept for rollback, the current one included
            (1: none to roll back to).
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 60.0, keep_generations: int = 2) -> None:
        if isinstance(keep_generations, bool) or not isinstance(keep_generations, int) or keep_generations < 1:
            raise ConfigError(f"keep_generations must be an integer >= 1, got {keep_generations!r}")
        self.path = str(Path(path).expanduser().resolve())
        self.busy_timeout = busy_timeout
        self.keep_generations = keep_generations
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"SqliteOnlineStore({self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "busy_timeout": self.busy_timeout, "keep_generations": self.keep_generations}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], busy_timeout=state["busy_timeout"], keep_generations=state.get("keep_generations", 2))

    # ----------------------------------------------------------------------- connection
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)

        def prepare() -> None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            have = conn.execute(
                f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({','.join('?' * len(_TABLES))})", _TABLES
            ).fetchone()[0]
            # Creating takes the write lock: only when the schema is missing (or older than this code).
            if have < len(_TABLES):
                conn.executescript(_SCHEMA)

        _while_locked(prepare, self.busy_timeout)
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _write_txn(self) -> _WriteTxn:
        return _WriteTxn(self)

    # --------------------------------------------------------------------------- writes
    def begin(self, view: OnlineView) -> str:
        now = datetime.now(UTC).isoformat()
        with self._write_txn() as conn:
            conn.execute("UPDATE mlp_generations SET state = 'dead' WHERE view = ? AND state = 'writing'", (view.name,))
            gen = conn.execute(
                "INSERT INTO mlp_generations (view, state, begun_at) VALUES (?, 'writing', ?)", (view.name, now)
            ).lastrowid
            _create_table(conn, gen)
        self._drop_dead(view.name)
        return str(gen)

    def write_encoded(self, view: OnlineView, generation: str, rows: Sequence[EncodedRow]) -> int:
        sql = _upsert_sql(generation)
        for at in range(0, len(rows), _WRITE_CHUNK):
            with self._write_txn() as conn:
                state = _state(conn, view.name, generation)
                if state != "writing":
                    raise ConflictError(
                        f"generation {generation} of view {view.name!r} is {state or 'unknown'}, not being written: "
                        "a newer materialization superseded it or it was aborted"
                    )
                conn.executemany(sql, rows[at : at + _WRITE_CHUNK])
        return len(rows)

    def publish(self, view: OnlineView, generation: str) -> None:
        now = datetime.now(UTC).isoformat()
        with self._write_txn() as conn:
            state = _state(conn, view.name, generation)
            if state == "published":
                return  # publishing twice is harmless
            if state != "writing":
                raise ConflictError(
                    f"cannot publish generation {generation} of view {view.name!r}: it is {state or 'unknown'} "
                    "(superseded by a newer materialization, or aborted)"
                )
            conn.execute("UPDATE mlp_generations SET state = 'kept' WHERE view = ? AND state = 'published'", (view.name,))
            conn.execute(
                "UPDATE mlp_generations SET state = 'published', published_at = ? WHERE id = ?", (now, int(generation))
            )
            conn.execute(
                "INSERT INTO mlp_pointers (view, generation) VALUES (?, ?) "
                "ON CONFLICT (view) DO UPDATE SET generation = excluded.generation",
                (view.name, int(generation)),
            )
            # Keep keep_generations: the new current one, then kept before withdrawn, newest first.
            conn.execute(
                "UPDATE mlp_generations SET state = 'dead' WHERE id IN (SELECT id FROM mlp_generations "
                "WHERE view = ? AND state IN ('published', 'kept', 'withdrawn') "
                "ORDER BY state = 'withdrawn', id DESC LIMIT -1 OFFSET ?)",
                (view.name, self.keep_generations),
            )
        self._drop_dead(view.name)

    def rollback(self, view: OnlineView | str, generation: str | None = None) -> str:
        name = name_of(view)
        with self._write_txn() as conn:
            kept = _kept(conn, name)
            current = next((g for g in kept if g.state == "current"), None)
            if generation is None:
                older = [g for g in kept if g.state == "kept" and current is not None and int(g.generation) < int(current.generation)]
                if not older:
                    raise unknown_generation(name, None, kept)
                target = max(older, key=lambda g: int(g.generation))
            else:
                target = next((g for g in kept if g.generation == str(generation).strip()), None)
                if target is None:
                    raise unknown_generation(name, str(generation), kept)
            if current is not None and target.generation == current.generation:
                return target.generation
            if current is not None:
                left = "withdrawn" if int(target.generation) < int(current.generation) else "kept"
                conn.execute("UPDATE mlp_generations SET state = ? WHERE id = ?", (left, int(current.generation)))
            conn.execute("UPDATE mlp_generations SET state = 'published' WHERE id = ?", (int(target.generation),))
            conn.execute(
                "INSERT INTO mlp_pointers (view, generation) VALUES (?, ?) "
                "ON CONFLICT (view) DO UPDATE SET generation = excluded.generation",
                (name, int(target.generation)),
            )
        return target.generation

    def generations(self, view: OnlineView | str) -> list[Generation]:
        name = name_of(view)
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN")
                try:
                    kept = _kept(conn, name)
                    return [
                        g._replace(rows=conn.execute(f"SELECT count(*) FROM {_table(g.generation)}").fetchone()[0])
                        for g in kept
                    ]
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OnlineStoreUnavailable(f"online store {self.path!r} cannot be read: {exc}") from None

    def abort(self, view: OnlineView, generation: str) -> None:
        with self._write_txn() as conn:
            conn.execute(
                "UPDATE mlp_generations SET state = 'dead' WHERE id = ? AND view = ? AND state = 'writing'",
                (int(generation), view.name),
            )
        self._drop_dead(view.name)

    def upsert_encoded(self, view: OnlineView, rows: Sequence[EncodedRow]) -> int:
        for at in range(0, len(rows), _WRITE_CHUNK):
            with self._write_txn() as conn:
                for gen in self._live(conn, view.name):
                    conn.executemany(_upsert_sql(gen), rows[at : at + _WRITE_CHUNK])
        return len(rows)

    def _live(self, conn: sqlite3.Connection, view: str) -> list[int]:
        """The current generation (created, empty, if the view has none) and any in progress."""
        live = conn.execute(
            "SELECT id, state FROM mlp_generations WHERE view = ? AND state IN ('published', 'writing')", (view,)
        ).fetchall()
        if not any(state == "published" for _, state in live):
            now = datetime.now(UTC).isoformat()
            gen = conn.execute(
                "INSERT INTO mlp_generations (view, state, begun_at, published_at) VALUES (?, 'published', ?, ?)",
                (view, now, now),
            ).lastrowid
            _create_table(conn, gen)
            conn.execute(
                "INSERT INTO mlp_pointers (view, generation) VALUES (?, ?) "
                "ON CONFLICT (view) DO UPDATE SET generation = excluded.generation",
                (view, gen),
            )
            live.append((gen, "published"))
        return [gen for gen, _ in live]

    def _drop_dead(self, view: str) -> None:
        with self._lock:
            dead = self._connection().execute(
                "SELECT id FROM mlp_generations WHERE view = ? AND state = 'dead'", (view,)
            ).fetchall()
        for (gen,) in dead:
            with self._write_txn() as conn:
                conn.execute(f"DROP TABLE IF EXISTS {_table(gen)}")
                conn.execute("UPDATE mlp_generations SET state = 'dropped' WHERE id = ? AND state = 'dead'", (gen,))

    # ---------------------------------------------------------------------------- reads
    def current_generation(self, view: OnlineView | str) -> str | None:
        name = view if isinstance(view, str) else view.name
        with self._lock:
            try:
                row = self._connection().execute("SELECT generation FROM mlp_pointers WHERE view = ?", (name,)).fetchone()
            except sqlite3.Error as exc:
                raise OnlineStoreUnavailable(f"online store {self.path!r} cannot be read: {exc}") from None
        return None if row is None else str(row[0])

    def _fetch(self, view: OnlineView, keys: Sequence[str]) -> list[tuple[int, int, str] | None]:
        with self._lock:
            try:
                conn = self._connection()
                # One read transaction: the pointer and the rows come from the same snapshot,
                # so a publish (and the drop of the old table) cannot land in between.
                conn.execute("BEGIN")
                try:
                    row = conn.execute("SELECT generation FROM mlp_pointers WHERE view = ?", (view.name,)).fetchone()
                    if row is None:
                        return [None] * len(keys)
                    table = _table(row[0])
                    if len(keys) == 1:
                        found = conn.execute(f"SELECT e, c, v FROM {table} WHERE k = ?", (keys[0],)).fetchone()
                        return [found]
                    by_key: dict[str, tuple[int, int, str]] = {}
                    unique = list(dict.fromkeys(keys))
                    for at in range(0, len(unique), _IN_CHUNK):
                        chunk = unique[at : at + _IN_CHUNK]
                        marks = ",".join("?" * len(chunk))
                        for k, e, c, v in conn.execute(f"SELECT k, e, c, v FROM {table} WHERE k IN ({marks})", chunk):
                            by_key[k] = (e, c, v)
                    return [by_key.get(k) for k in keys]
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OnlineStoreUnavailable(f"online store {self.path!r} cannot be read: {exc}") from None

    # ---------------------------------------------------------------------- event state
    def apply_events(self, view: str, events: Sequence[EncodedEvent], *, now_us: int, retention_us: int) -> int:
        """See ``EventState.apply_events``; one write transaction for the whole call, which also
        trims every key of ``view`` (not only the touched ones), see ``sqlite_events``.

        Raises:
            StorageError: the file cannot be written (as for every write to this store), e.g.
                another writer held it past ``busy_timeout``; nothing was applied.
        """
        if not events:
            return 0
        with self._write_txn() as conn:
            return sqlite_events.apply(conn, view, events, now_us=now_us, retention_us=retention_us)

    def fetch_events(self, view: str, keys: Sequence[str], *, after_us: int) -> list[list[EncodedEvent]]:
        with self._lock:
            try:
                return sqlite_events.fetch(self._connection(), view, keys, after_us=after_us)
            except sqlite3.Error as exc:
                raise OnlineStoreUnavailable(f"online store {self.path!r} cannot be read: {exc}") from None

    def drop_events(self, view: str) -> None:
        with self._write_txn() as conn:
            sqlite_events.drop(conn, view)


class _WriteTxn:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) under the store's thread lock."""

    def __init__(self, store: SqliteOnlineStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.conn = self.store._connection()
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.store._lock.release()
            raise StorageError(f"online store {self.store.path!r} cannot be written: {exc}") from None
        except BaseException:
            self.store._lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise StorageError(f"online store {self.store.path!r} cannot be written: {exc}") from exc


def _while_locked(step: Any, timeout_s: float) -> None:
    """Run ``step``, again while SQLite answers "database is locked" (up to ``timeout_s``):
    switching a new file to WAL and creating the schema can be refused at once, without the
    busy handler, when other connections open the same new file at the same moment."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def _create_table(conn: sqlite3.Connection, gen: int) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {_table(gen)} "
        "(k TEXT PRIMARY KEY, e INTEGER NOT NULL, c INTEGER NOT NULL, v TEXT NOT NULL) WITHOUT ROWID"
    )


def _kept(conn: sqlite3.Connection, view: str) -> list[Generation]:
    """The view's kept generations, the current one first, then newest first (rows not counted)."""
    found = conn.execute(
        "SELECT id, state, published_at FROM mlp_generations WHERE view = ? AND state IN ('published', 'kept', 'withdrawn')",
        (view,),
    ).fetchall()
    out = [
        Generation(str(gen), "current" if state == "published" else state, _instant(at), None)
        for gen, state, at in found
    ]
    return sorted(out, key=lambda g: (g.state != "current", -int(g.generation)))


def _instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _state(conn: sqlite3.Connection, view: str, generation: str) -> str | None:
    try:
        gen = int(generation)
    except (TypeError, ValueError):
        return None
    row = conn.execute("SELECT state FROM mlp_generations WHERE id = ? AND view = ?", (gen, view)).fetchone()
    return None if row is None else row[0]
