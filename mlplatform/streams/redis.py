"""The production event bus: Redis Streams.

    bus = RedisEventBus("redis://bus:6379/0", project="bnpl", require_fsync=True)

One stream per source, key ``<prefix>:<project>:stream:<source>``; each entry holds the payload
as JSON in one field ``e``. Consumer groups are Redis's own (XREADGROUP, XACK, XAUTOCLAIM,
XPENDING, XINFO GROUPS); retention is ``XTRIM MINID`` below what every group acknowledged.

**Positions and times come from Redis.** An entry id ``<ms>-<seq>`` is assigned by the server:
``position = ms << 20 | seq`` (an int64 until the year 2248; ids are strictly increasing, so
positions are) and ``known_us = ms * 1000``: the acceptance time is Redis's clock at
millisecond precision, never the sender's, and never decreases along the stream (Redis keeps
ids increasing even if its clock steps back).

**What an accepted event is guaranteed.** ``append`` sends its events in one MULTI/EXEC
transaction (all or none of them, chunks of 1000 for bigger batches); it returns once Redis
answered EXEC. What that answer means depends on the server's persistence settings:

- ``appendonly yes`` + ``appendfsync always`` (+ ``no-appendfsync-on-rewrite no``, the
  default): Redis writes and fsyncs the AOF before it answers (it does so before sending any
  reply of that event-loop turn), so an accepted event survives redis-server being killed
  (SIGKILL, OOM) and the machine losing power (on a disk that honours fsync). With
  ``no-appendfsync-on-rewrite yes`` Redis skips that fsync while a background save or AOF
  rewrite runs; and AOF turned on at runtime (``CONFIG SET appendonly yes``) covers the data
  only once the AOF rewrite Redis starts then has finished.
- ``appendonly yes`` + ``appendfsync everysec`` (Redis's default for AOF): survives a clean
  restart (SHUTDOWN / SIGTERM writes the AOF out), but up to about two seconds of accepted
  events can be lost if redis-server or the machine dies.
- ``appendonly no`` (RDB snapshots or nothing): everything since the last snapshot can be lost.
- Replication is asynchronous in every case: after a failover to a replica, events the old
  primary accepted but had not yet sent can be lost (WAIT / WAITAOF on replicas are not used).

``require_fsync=True`` (config ``streams.durability: fsync_always``, the default) makes the
first case the contract: every append transaction starts with ``CONFIG GET append*`` and
``CONFIG GET no-appendfsync-on-rewrite``, so the check sees the settings in force when the
events were written (the runtime-enabling window above is not detected), and an
append made under any other setting raises ``EventBusUnavailable`` (its events are on the bus
but not vouched for; sending them again is safe: copies of an event id count once). A server
that refuses CONFIG (some managed services) is a ``ConfigError`` at the first append: there,
choose ``durability: as_configured`` and rely on the provider's stated persistence.

Timeouts: every command has ``timeout`` (socket and connect); a blocking read waits at most
``timeout`` minus half a second. Nothing is retried here: the caller (ingest's caller, the
processors' loop) decides, and a retry after an unknown outcome is safe by event id.
The password comes from the environment variable named by ``password_env`` in each process.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from mlplatform.errors import ConfigError, DependencyError, NotFoundError, StorageError
from mlplatform.streams.base import Accepted, EventBus, EventBusUnavailable, GroupInfo, Message

__all__ = ["RedisEventBus", "entry_id", "position_of"]

_SEQ_BITS = 20
_APPEND_CHUNK = 1000
_FIELD = "e"


def position_of(entry_id: str) -> int:
    """The int64 stream position of a Redis entry id ``<ms>-<seq>``: ``ms << 20 | seq``."""
    ms, _, seq = entry_id.partition("-")
    ms_i, seq_i = int(ms), int(seq)
    if seq_i >= 1 << _SEQ_BITS or ms_i >= 1 << (63 - _SEQ_BITS):
        raise StorageError(f"stream entry id {entry_id!r} does not fit a position (more than 2**20 entries in one ms?)")
    return ms_i << _SEQ_BITS | seq_i


def entry_id(position: int) -> str:
    """The Redis entry id of a stream position (inverse of ``position_of``)."""
    return f"{position >> _SEQ_BITS}-{position & ((1 << _SEQ_BITS) - 1)}"


class RedisEventBus(EventBus):
    """Event bus on Redis Streams; see the module doc for ids, durability and timeouts.

    Args:
        url: ``redis://host:port/db``, ``rediss://…`` or ``unix://…`` (no password in it).
        project: namespaces every key, so projects can share one Redis.
        key_prefix: the first part of every key.
        timeout: socket and connect timeout of every command.
        require_fsync: refuse to vouch for appends unless the server runs ``appendonly yes``
            with ``appendfsync always`` (checked inside each append's transaction).
        password_env: the environment variable holding the password (unset: none).
    """

    def __init__(
        self,
        url: str,
        *,
        project: str,
        key_prefix: str = "mlp",
        timeout: timedelta = timedelta(seconds=5),
        require_fsync: bool = True,
        password_env: str = "REDIS_PASSWORD",
    ) -> None:
        self.url = url
        self.project = project
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.require_fsync = require_fsync
        self.password_env = password_env
        self._client_: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisEventBus({self.url!r}, project={self.project!r})"

    def __getstate__(self) -> dict[str, Any]:
        keys = ("url", "project", "key_prefix", "timeout", "require_fsync", "password_env")
        return {k: getattr(self, k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("url"), **state)

    def key(self, stream: str) -> str:
        return f"{self.key_prefix}:{self.project}:stream:{stream}"

    # ----------------------------------------------------------------------- connection
    def _client(self) -> Any:
        if self._client_ is None or self._pid != os.getpid():
            with self._lock:
                if self._client_ is None or self._pid != os.getpid():
                    try:
                        import redis
                        from redis.backoff import NoBackoff
                        from redis.retry import Retry
                    except ImportError:
                        raise DependencyError.missing("redis", "redis>=5", "the Redis event bus") from None
                    seconds = self.timeout.total_seconds()
                    self._client_ = redis.Redis.from_url(
                        self.url,
                        password=os.environ.get(self.password_env) or None,
                        decode_responses=True,
                        socket_timeout=seconds,
                        socket_connect_timeout=seconds,
                        retry=Retry(NoBackoff(), 0),
                        health_check_interval=0,
                    )
                    self._pid = os.getpid()
        return self._client_

    def close(self) -> None:
        with self._lock:
            if self._client_ is not None and self._pid == os.getpid():
                self._client_.close()
            self._client_ = None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn``, turning Redis's errors into the platform's."""
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.exceptions.AuthenticationError as exc:
            raise EventBusUnavailable(f"Redis event bus at {self.url} refused {what}: {exc}; set ${self.password_env}") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise EventBusUnavailable(f"Redis event bus at {self.url} did not answer {what}: {exc}") from None
        except redis.exceptions.ResponseError as exc:
            if str(exc).startswith("NOGROUP"):
                raise NotFoundError(f"event bus: {exc}; create the consumer group first (create_group)") from None
            raise EventBusUnavailable(f"Redis event bus at {self.url}: {what} failed: {exc}") from None

    # ---------------------------------------------------------------------------- write
    def append(self, stream: str, payloads: Sequence[Mapping[str, Any]]) -> list[Accepted]:
        texts = [json.dumps(p, separators=(",", ":"), allow_nan=False) for p in payloads]
        key = self.key(stream)
        out: list[Accepted] = []
        for at in range(0, len(texts), _APPEND_CHUNK):
            out += self._append_chunk(key, texts[at : at + _APPEND_CHUNK])
        return out

    def _append_chunk(self, key: str, texts: Sequence[str]) -> list[Accepted]:
        import redis

        pipe = self._client().pipeline(transaction=True)
        if self.require_fsync:
            pipe.execute_command("CONFIG", "GET", "append*")
            pipe.execute_command("CONFIG", "GET", "no-appendfsync-on-rewrite")
        for text in texts:
            pipe.xadd(key, {_FIELD: text})
        try:
            replies = self._call("an append", pipe.execute)
        except EventBusUnavailable as exc:
            if self.require_fsync and "(CONFIG GET" in str(exc):
                raise ConfigError(
                    f"Redis event bus at {self.url} refuses CONFIG GET, so appendonly/appendfsync cannot be checked "
                    f"({exc}); set streams.durability: as_configured to rely on the server's persistence as configured"
                ) from None
            raise
        except redis.exceptions.RedisError as exc:  # e.g. a refused command inside EXEC
            raise EventBusUnavailable(f"Redis event bus at {self.url}: append failed: {exc}") from None
        if self.require_fsync:
            settings = {**_config_map(replies[0]), **_config_map(replies[1])}
            replies = replies[2:]
            wanted = {"appendonly": "yes", "appendfsync": "always", "no-appendfsync-on-rewrite": "no"}
            if any(settings.get(k) != v for k, v in wanted.items()):
                found = " ".join(f"{k}={settings.get(k)!r}" for k in wanted)
                raise EventBusUnavailable(
                    f"Redis event bus at {self.url} runs {found}: {len(texts)} events were written but may not be on "
                    "disk before the answer, as streams.durability: fsync_always requires; set 'appendonly yes', "
                    "'appendfsync always' and 'no-appendfsync-on-rewrite no' on the server (or durability: "
                    "as_configured); sending them again is safe"
                )
        accepted = []
        for reply in replies:
            position = position_of(reply)
            accepted.append(Accepted(position, (position >> _SEQ_BITS) * 1000))
        return accepted

    # -------------------------------------------------------------------------- groups
    def create_group(self, stream: str, group: str) -> None:
        import redis

        try:
            self._call("XGROUP CREATE", self._client().xgroup_create, self.key(stream), group, id="0", mkstream=True)
        except EventBusUnavailable as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        except redis.exceptions.RedisError as exc:  # pragma: no cover - _call maps the known ones
            raise EventBusUnavailable(str(exc)) from None

    def read(self, stream: str, group: str, consumer: str, *, count: int, block_ms: int = 0) -> list[Message]:
        longest = max(0, int(self.timeout.total_seconds() * 1000) - 500)
        block = min(block_ms, longest) if block_ms > 0 else None  # BLOCK 0 would wait forever
        reply = self._call(
            "XREADGROUP", self._client().xreadgroup, group, consumer, {self.key(stream): ">"}, count=count, block=block
        )
        return _messages(reply)

    def read_pending(self, stream: str, group: str, consumer: str, *, count: int, after: int = 0) -> list[Message]:
        reply = self._call(
            "XREADGROUP", self._client().xreadgroup, group, consumer, {self.key(stream): entry_id(after)}, count=count
        )
        return _messages(reply)

    def claim_stale(self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int) -> list[Message]:
        client, key = self._client(), self.key(stream)
        out: list[Message] = []
        start = "0-0"
        for _ in range(100):  # XAUTOCLAIM looks at up to 10 x COUNT entries per call
            reply = self._call("XAUTOCLAIM", client.xautoclaim, key, group, consumer, min_idle_ms, start, count=count - len(out))
            start, entries = reply[0], reply[1]
            out += [_message(i, f) for i, f in entries if f]
            if start == "0-0" or len(out) >= count:
                break
        return out

    def ack(self, stream: str, group: str, positions: Sequence[int]) -> int:
        client, key = self._client(), self.key(stream)
        done = 0
        ids = [entry_id(int(p)) for p in positions]
        for at in range(0, len(ids), _APPEND_CHUNK):
            done += int(self._call("XACK", client.xack, key, group, *ids[at : at + _APPEND_CHUNK]))
        return done

    # ------------------------------------------------------------------------ progress
    def _groups(self, stream: str) -> list[dict[str, Any]]:
        import redis

        try:
            return self._call("XINFO GROUPS", self._client().xinfo_groups, self.key(stream))
        except EventBusUnavailable as exc:
            if "no such key" in str(exc):
                return []
            raise
        except redis.exceptions.RedisError as exc:  # pragma: no cover
            raise EventBusUnavailable(str(exc)) from None

    def info(self, stream: str, group: str) -> GroupInfo:
        found = next((g for g in self._groups(stream) if g["name"] == group), None)
        if found is None:
            raise NotFoundError(f"stream {stream!r} has no consumer group {group!r}; create it first (create_group)")
        client, key = self._client(), self.key(stream)
        summary = self._call("XPENDING", client.xpending, key, group)
        consumers = {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}
        oldest = None
        if summary["pending"]:
            first = self._call("XPENDING", client.xpending_range, key, group, "-", "+", 1)
            oldest = int(first[0]["time_since_delivered"]) if first else None
        lag = found.get("lag")
        return GroupInfo(
            group=group,
            pending=int(summary["pending"]),
            lag=None if lag is None else int(lag),
            last_delivered=position_of(found["last-delivered-id"]),
            consumers=consumers,
            oldest_pending_ms=oldest,
        )

    def trim(self, stream: str) -> int:
        client, key = self._client(), self.key(stream)
        groups = self._groups(stream)
        if not groups:
            return 0
        bound = None
        for g in groups:
            # read the cursor before the pending list: a delivery in between only adds pending
            # entries above the cursor, so the bound stays below everything unacknowledged
            below = position_of(g["last-delivered-id"]) + 1
            summary = self._call("XPENDING", client.xpending, key, g["name"])
            if summary["pending"]:
                below = min(below, position_of(summary["min"]))
            bound = below if bound is None else min(bound, below)
        return int(self._call("XTRIM", client.xtrim, key, minid=entry_id(bound), approximate=False))

    def length(self, stream: str) -> int:
        return int(self._call("XLEN", self._client().xlen, self.key(stream)))


def _config_map(reply: Any) -> dict[str, str]:
    if isinstance(reply, Mapping):
        return {str(k): str(v) for k, v in reply.items()}
    return {str(reply[i]): str(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}


def _message(entry: str, fields: Mapping[str, str]) -> Message:
    position = position_of(entry)
    return Message(position, (position >> _SEQ_BITS) * 1000, json.loads(fields[_FIELD]))


def _messages(reply: Any) -> list[Message]:
    """XREADGROUP's reply (RESP2: ``[[key, [(id, fields), ...]]]``) as messages; an entry trimmed
    while pending comes back with no fields and has nothing to deliver."""
    return [_message(i, f) for _, entries in reply or [] for i, f in entries if f]
