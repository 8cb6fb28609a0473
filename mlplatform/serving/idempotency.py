"""Idempotent decisions: the first answer given for an ``application_id``, shared by replicas.

    store = open_idempotency_store(platform.config, online_store)
    store.get_many(["app-1", "app-2"])                      # [None, '{"decision_id": …}']
    store.put_if_absent_many([("app-1", entry)])            # [None]: ours is kept

A retried checkout (same ``application_id``) must get the decision it was given, not a new
one, whichever replica it reaches. The decision endpoint therefore, per application:

1. looks the id up here (and in a small per-replica memory of recent answers);
2. if absent, decides, appends the decision to the decision log (durable), then stores the
   answer here with put-if-absent, and only then responds. If another replica stored an
   answer first (two copies of one request raced), the stored one is returned instead, so
   every copy gets the same ``decision_id``. The loser's record stays in the decision log
   (it was decided, never returned); audits tell them apart by the stored answer.

The store lives beside the online store: Redis keys ``<prefix>:<project>:decision:<id>`` with
a TTL (``SET NX GET``: atomic on Redis and on each key's node of a Redis Cluster) when the
online store is Redis; otherwise a SQLite file ``<online db name>.decisions.db`` next to the
online store's file (one machine).
Entries expire after ``ttl`` (7 days by default): a retry later than that is a new decision.
When the store is unreachable the endpoint still answers (the per-replica memory still
catches retries that reach the same replica); ``IdempotencyUnavailable`` says so.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ServingError

if TYPE_CHECKING:
    from mlplatform.config import PlatformConfig
    from mlplatform.online import OnlineStore

__all__ = ["IdempotencyStore", "IdempotencyUnavailable", "RedisIdempotencyStore", "SqliteIdempotencyStore", "open_idempotency_store"]

DEFAULT_TTL = timedelta(days=7)


class IdempotencyUnavailable(ServingError):
    """The idempotency store could not be read or written."""


class IdempotencyStore(ABC):
    """``application_id`` → the stored answer (opaque text), first writer wins."""

    @abstractmethod
    def get_many(self, ids: Sequence[str]) -> list[str | None]:
        """The stored answer of each id (None: none stored or expired).

        Raises:
            IdempotencyUnavailable: the store did not answer.
        """

    @abstractmethod
    def put_if_absent_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        """Store each ``(id, answer)`` unless the id already has one. Per entry: None when
        ours was stored, else the answer stored before (which wins).

        Raises:
            IdempotencyUnavailable: the store did not answer; nothing is known to be stored.
        """

    def close(self) -> None:
        """Release connections (reopened on next use)."""


class RedisIdempotencyStore(IdempotencyStore):
    """Answers in Redis (or Redis Cluster) under ``<prefix>:<project>:decision:<id>``."""

    def __init__(self, url: str, *, project: str, key_prefix: str = "mlp", timeout: timedelta, ttl: timedelta = DEFAULT_TTL) -> None:
        self.url = url
        self.prefix = f"{key_prefix}:{project}:decision:"
        self.timeout = timeout.total_seconds()
        self.ttl_ms = int(ttl.total_seconds() * 1000)
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisIdempotencyStore({self.url!r}, prefix={self.prefix!r})"

    def _redis(self) -> Any:
        if self._client is not None and self._pid == os.getpid():
            return self._client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                import redis

                options = {
                    "socket_timeout": self.timeout,
                    "socket_connect_timeout": self.timeout,
                    "password": os.environ.get("REDIS_PASSWORD") or None,
                    "decode_responses": True,
                }
                client = redis.Redis.from_url(self.url, **options)
                try:
                    clustered = bool(client.info("cluster").get("cluster_enabled"))
                except redis.RedisError as exc:
                    raise IdempotencyUnavailable(f"idempotency store {self.url!r} unreachable: {exc}") from None
                if clustered:
                    client.close()
                    client = redis.RedisCluster.from_url(self.url, **options)
                self._client, self._pid = client, os.getpid()
        return self._client

    def get_many(self, ids: Sequence[str]) -> list[str | None]:
        if not ids:
            return []
        import redis

        try:
            client = self._redis()
            if len(ids) == 1:
                return [client.get(self.prefix + ids[0])]
            pipe = client.pipeline(transaction=False)
            for i in ids:
                pipe.get(self.prefix + i)
            return list(pipe.execute())
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(f"idempotency store {self.url!r}: {exc}") from None

    def put_if_absent_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        if not entries:
            return []
        import redis

        try:
            client = self._redis()
            pipe = client.pipeline(transaction=False)
            for i, answer in entries:
                # SET NX GET (Redis >= 7): sets only if absent and returns what was there.
                pipe.set(self.prefix + i, answer, nx=True, get=True, px=self.ttl_ms)
            return list(pipe.execute())
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(f"idempotency store {self.url!r}: {exc}") from None

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


class SqliteIdempotencyStore(IdempotencyStore):
    """Answers in a SQLite file (WAL), shared by the processes of one machine."""

    def __init__(self, path: str | os.PathLike[str], *, ttl: timedelta = DEFAULT_TTL, busy_timeout: float = 5.0) -> None:
        self.path = str(Path(path).expanduser().resolve())
        self.ttl_s = ttl.total_seconds()
        self.busy_timeout = busy_timeout
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SqliteIdempotencyStore({self.path!r})"

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mlp_decisions (application_id TEXT PRIMARY KEY, answer TEXT NOT NULL, expires REAL NOT NULL)"
        )
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def get_many(self, ids: Sequence[str]) -> list[str | None]:
        if not ids:
            return []
        try:
            conn = self._conn()
            marks = ",".join("?" * len(ids))
            rows = conn.execute(
                f"SELECT application_id, answer FROM mlp_decisions WHERE application_id IN ({marks}) AND expires > ?",
                (*ids, time.time()),
            ).fetchall()
        except sqlite3.Error as exc:
            raise IdempotencyUnavailable(f"idempotency store {self.path!r}: {exc}") from None
        found = dict(rows)
        return [found.get(i) for i in ids]

    def put_if_absent_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        if not entries:
            return []
        now = time.time()
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                out: list[str | None] = []
                for i, answer in entries:
                    row = conn.execute(
                        "SELECT answer FROM mlp_decisions WHERE application_id = ? AND expires > ?", (i, now)
                    ).fetchone()
                    if row is not None:
                        out.append(row[0])
                        continue
                    conn.execute(
                        "INSERT OR REPLACE INTO mlp_decisions (application_id, answer, expires) VALUES (?, ?, ?)",
                        (i, answer, now + self.ttl_s),
                    )
                    out.append(None)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise IdempotencyUnavailable(f"idempotency store {self.path!r}: {exc}") from None
        return out

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_idempotency_store(config: PlatformConfig, online: OnlineStore, *, ttl: timedelta = DEFAULT_TTL) -> IdempotencyStore:
    """The store that sits beside ``online``: Redis when it is Redis, else the SQLite file
    ``<name>.decisions.db`` next to the SQLite online store's ``<name>.db``."""
    settings = config.online_store
    if settings.type == "redis":
        return RedisIdempotencyStore(settings.url, project=config.project, key_prefix=settings.key_prefix, timeout=settings.timeout, ttl=ttl)
    path = Path(getattr(online, "path", ".mlplatform-online/online.db"))
    return SqliteIdempotencyStore(path.with_name(f"{path.stem}.decisions.db"), ttl=ttl)
