"""Idempotent decisions: the first answer given for an ``application_id``, shared by replicas.

    store = open_idempotency_store(platform.config, online_store)
    store.reserve_many([("app-1", pending_marker("replica-a"))])   # [None]: reserved by us
    store.get_many(["app-1", "app-2"])                      # ['{"pending": …}', None]
    store.put_if_absent_many([("app-1", entry)])            # [None]: ours replaced the reservation

A retried checkout (same ``application_id``) must get the decision it was given, not a new
one, whichever replica it reaches, and concurrent copies of one request must be decided once.
The decision endpoint therefore, per application:

1. looks the id up in a small per-replica memory of recent answers, and joins a copy of the
   same request already being decided in this replica;
2. **reserves** the id here (set-if-absent of a pending marker that expires after
   ``pending_ttl``). An answer found instead is returned; another replica's pending marker
   means a copy is being decided there: this copy waits for that answer (polling) and returns it;
3. the reserver decides, appends the decision to the decision log (durable), then stores the
   answer here over its reservation (``put_if_absent_many``: a pending marker does not count
   as an answer), and only then responds.

So every copy gets the same ``decision_id`` and the log holds one record for the application.
Only if a reserver stalls past ``pending_ttl`` (30 s) can a second copy reserve and decide;
the first to store its answer wins and the other is logged again as not returned.

The store lives beside the online store: Redis keys ``<prefix>:<project>:decision:<id>`` with
a TTL (``SET NX GET``: atomic on Redis and on each key's node of a Redis Cluster) when the
online store is Redis; otherwise a SQLite file ``<online db name>.decisions.db`` next to the
online store's file (one machine).
Entries expire after ``ttl`` (7 days by default): a retry later than that is a new decision.
When the store is unreachable the endpoint still answers (the per-replica memory still
catches retries that reach the same replica); ``IdempotencyUnavailable`` says so.
"""

from __future__ import annotations

import json
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

__all__ = [
    "IdempotencyStore",
    "IdempotencyUnavailable",
    "RedisIdempotencyStore",
    "SqliteIdempotencyStore",
    "is_pending",
    "open_idempotency_store",
    "pending_marker",
]

DEFAULT_TTL = timedelta(days=7)
PENDING_TTL = timedelta(seconds=30)
_PENDING = '{"pending":'


def pending_marker(owner: str) -> str:
    """The value that reserves an id for ``owner`` (a replica and request token) while it decides."""
    return json.dumps({"pending": owner, "at": time.time()}, separators=(",", ":"))


def is_pending(value: str | None) -> bool:
    """Whether a stored value is a reservation rather than an answer."""
    return value is not None and value.startswith(_PENDING)

# put-if-absent where a pending reservation counts as absent; returns what was there if it
# was an answer (nil when ours was stored). One key: safe on each node of a Redis Cluster.
_PUT_LUA = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 11) ~= '{"pending":' then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


class IdempotencyUnavailable(ServingError):
    """The idempotency store could not be read or written."""


class IdempotencyStore(ABC):
    """``application_id`` → a reservation or the stored answer (opaque text), first writer wins."""

    @abstractmethod
    def get_many(self, ids: Sequence[str]) -> list[str | None]:
        """The stored value of each id: an answer, a pending reservation (``is_pending``) or
        None (none stored, or expired).

        Raises:
            IdempotencyUnavailable: the store did not answer.
        """

    @abstractmethod
    def reserve_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        """Store each ``(id, pending marker)`` unless the id has a value. Per entry: None when
        the reservation is ours, else the value there (an answer or someone's reservation).
        Reservations expire after the store's ``pending_ttl``.

        Raises:
            IdempotencyUnavailable: the store did not answer; nothing is known to be reserved.
        """

    @abstractmethod
    def put_if_absent_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        """Store each ``(id, answer)`` unless the id already has an answer (a pending
        reservation, anyone's, is replaced). Per entry: None when ours was stored, else the
        answer stored before (which wins).

        Raises:
            IdempotencyUnavailable: the store did not answer; nothing is known to be stored.
        """

    def close(self) -> None:
        """Release connections (reopened on next use)."""


class RedisIdempotencyStore(IdempotencyStore):
    """Answers in Redis (or Redis Cluster) under ``<prefix>:<project>:decision:<id>``."""

    def __init__(
        self,
        url: str,
        *,
        project: str,
        key_prefix: str = "mlp",
        timeout: timedelta,
        ttl: timedelta = DEFAULT_TTL,
        pending_ttl: timedelta = PENDING_TTL,
    ) -> None:
        self.url = url
        self.prefix = f"{key_prefix}:{project}:decision:"
        self.timeout = timeout.total_seconds()
        self.ttl_ms = int(ttl.total_seconds() * 1000)
        self.pending_ttl_ms = max(1, int(pending_ttl.total_seconds() * 1000))
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
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                options = {
                    "socket_timeout": self.timeout,
                    "socket_connect_timeout": self.timeout,
                    "password": os.environ.get("REDIS_PASSWORD") or None,
                    "decode_responses": True,
                    # No retries inside a call: callers bound it by the request's deadline, and
                    # redis-py's default (3 retries with backoff) would hold an I/O thread for
                    # four timeouts on a hung store.
                    "retry": Retry(NoBackoff(), 0),
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

    def reserve_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        if not entries:
            return []
        import redis

        try:
            client = self._redis()
            pipe = client.pipeline(transaction=False)
            for i, marker in entries:
                # SET NX GET (Redis >= 7): sets only if absent and returns what was there.
                pipe.set(self.prefix + i, marker, nx=True, get=True, px=self.pending_ttl_ms)
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
                pipe.eval(_PUT_LUA, 1, self.prefix + i, answer, self.ttl_ms)
            return [v if v else None for v in pipe.execute()]
        except redis.RedisError as exc:
            raise IdempotencyUnavailable(f"idempotency store {self.url!r}: {exc}") from None

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


class SqliteIdempotencyStore(IdempotencyStore):
    """Answers in a SQLite file (WAL), shared by the processes of one machine."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: timedelta = DEFAULT_TTL,
        pending_ttl: timedelta = PENDING_TTL,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = str(Path(path).expanduser().resolve())
        self.ttl_s = ttl.total_seconds()
        self.pending_ttl_s = pending_ttl.total_seconds()
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

    def reserve_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        return self._put(entries, self.pending_ttl_s, replace_pending=False)

    def put_if_absent_many(self, entries: Sequence[tuple[str, str]]) -> list[str | None]:
        return self._put(entries, self.ttl_s, replace_pending=True)

    def _put(self, entries: Sequence[tuple[str, str]], ttl_s: float, *, replace_pending: bool) -> list[str | None]:
        if not entries:
            return []
        now = time.time()
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                out: list[str | None] = []
                for i, value in entries:
                    row = conn.execute(
                        "SELECT answer FROM mlp_decisions WHERE application_id = ? AND expires > ?", (i, now)
                    ).fetchone()
                    if row is not None and not (replace_pending and is_pending(row[0])):
                        out.append(row[0])
                        continue
                    conn.execute(
                        "INSERT OR REPLACE INTO mlp_decisions (application_id, answer, expires) VALUES (?, ?, ?)",
                        (i, value, now + ttl_s),
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
