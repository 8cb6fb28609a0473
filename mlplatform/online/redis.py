"""The production online store: Redis or Redis Cluster (detected on connect).

    store = RedisOnlineStore("redis://cache:6379/0", project="bnpl", timeout=timedelta(milliseconds=50))

Key layout (``P`` = key prefix, ``proj`` = project, ``view`` = view name)::

    P:{proj:view}:current          STRING  the generation readers see
    P:{proj:view}:gens             HASH    generation -> writing | published | kept | withdrawn | dead
    P:{proj:view}:seq              STRING  generation counter (INCR)
    P:{proj:view}:published_at     HASH    generation -> ISO time it was first published
    P:{proj:view}:rows             HASH    generation -> entity keys it holds
    P:{proj:view:<key>}            HASH    generation -> "<event µs>|<created µs>|<features JSON>"
    P:events:{proj:view:<key>}           HASH  a real-time view's recent events of one key
    P:events:{proj:view:<key>}:by_time   ZSET  their event times (the event state: ``redis_events``)

``<key>`` is the encoded join key (a JSON list, e.g. ``[42]`` or ``[42,"m-7"]``). The ``{…}``
hash tags put a view's bookkeeping keys in one slot, so begin/publish/abort/rollback are single
Lua scripts (atomic), and each entity's hash in its own slot, so no command ever spans slots:
that is what makes the layout work unchanged on Redis Cluster. A read is one pipeline —
``GET current`` plus ``HGETALL`` of each entity hash — so one round trip on a single Redis,
where it runs as one MULTI/EXEC and so sees one consistent state (on a cluster: one round
trip to each node involved, in parallel, not one transaction; ``cleanup_grace`` keeps the old
generation readable meanwhile). The reader picks the field of the current generation. An
entity hash holds one field per live generation (the current one, the kept ones a rollback can
return to — ``keep_generations`` in all —, and the one being written during a materialization).
A write counts the fields it creates per generation into ``rows`` (one HINCRBY per batch).

Writes are a Lua script per entity (keep the newer row, see ``base``), pipelined in batches.
After a publish or abort, a cleanup pass SCANs the view's entity hashes (every node on a
cluster) and deletes fields of generations that are no longer live; generation numbers only
grow, so a generation begun after the pass started is never touched.

Timeouts: reads use ``timeout`` for connect and socket and never retry, so an outage raises
``OnlineStoreUnavailable`` within about the timeout and serving can fall back. Writes (batch
work) use ``write_timeout`` and retry a few times. The password comes from the
``REDIS_PASSWORD`` environment variable of each process (it never travels in a pickle).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from mlplatform.errors import ConfigError, ConflictError, DependencyError, StorageError
from mlplatform.online import redis_events
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

__all__ = ["RedisOnlineStore"]

_WRITE_CHUNK = 1000


def _lua(source: str) -> str:
    """Scripts travel with every EVAL on a cluster: drop the indentation."""
    return "\n".join(line.strip() for line in source.strip().splitlines())


_CLEANUP_CHUNK = 500

# KEYS: gens, seq. Supersede whatever is being written; start a new generation.
_BEGIN = _lua("""
local gens = redis.call('HGETALL', KEYS[1])
for i = 1, #gens, 2 do
  if gens[i + 1] == 'writing' then redis.call('HSET', KEYS[1], gens[i], 'dead') end
end
local g = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], g, 'writing')
return tostring(g)
""")

# KEYS: gens, current, published_at. ARGV: generation, keep, now. Switch the pointer; the
# previous one is kept; `keep` generations stay: the new current one, then kept before
# withdrawn, newest first; the rest become dead.
_PUBLISH = _lua("""
local s = redis.call('HGET', KEYS[1], ARGV[1])
if s == 'published' then return 'ok' end
if s ~= 'writing' then return s or 'unknown' end
local cur = redis.call('GET', KEYS[2])
if cur then redis.call('HSET', KEYS[1], cur, 'kept') end
redis.call('HSET', KEYS[1], ARGV[1], 'published')
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('SET', KEYS[2], ARGV[1])
local kept = {}
local gens = redis.call('HGETALL', KEYS[1])
for i = 1, #gens, 2 do
  local st = gens[i + 1]
  if st == 'published' or st == 'kept' or st == 'withdrawn' then
    table.insert(kept, {tonumber(gens[i]), st == 'withdrawn' and 1 or 0})
  end
end
table.sort(kept, function(a, b) if a[2] ~= b[2] then return a[2] < b[2] end return a[1] > b[1] end)
for i = tonumber(ARGV[2]) + 1, #kept do redis.call('HSET', KEYS[1], tostring(kept[i][1]), 'dead') end
return 'ok'
""")

# KEYS: gens, current. ARGV: target generation, or '' for the newest kept one older than the
# current one. Returns {status, target}: ok | none (nothing to go back to) | missing.
_ROLLBACK = _lua("""
local cur = redis.call('GET', KEYS[2])
local target = ARGV[1]
if target == '' then
  if not cur then return {'none', ''} end
  local best = nil
  local gens = redis.call('HGETALL', KEYS[1])
  for i = 1, #gens, 2 do
    local g = tonumber(gens[i])
    if gens[i + 1] == 'kept' and g < tonumber(cur) and (best == nil or g > best) then best = g end
  end
  if best == nil then return {'none', ''} end
  target = tostring(best)
else
  local st = redis.call('HGET', KEYS[1], target)
  if st ~= 'kept' and st ~= 'withdrawn' and st ~= 'published' then return {'missing', ''} end
end
if target == cur then return {'ok', target} end
if cur then
  if tonumber(target) < tonumber(cur) then redis.call('HSET', KEYS[1], cur, 'withdrawn')
  else redis.call('HSET', KEYS[1], cur, 'kept') end
end
redis.call('HSET', KEYS[1], target, 'published')
redis.call('SET', KEYS[2], target)
return {'ok', target}
""")

# KEYS: gens. ARGV: generation.
_ABORT = _lua("""
if redis.call('HGET', KEYS[1], ARGV[1]) == 'writing' then redis.call('HSET', KEYS[1], ARGV[1], 'dead') end
return 'ok'
""")

# KEYS: gens, seq, current, published_at. ARGV: now. Live generations (published first),
# creating an empty current one.
_LIVE = _lua("""
local cur = redis.call('GET', KEYS[3])
if not cur then
  cur = tostring(redis.call('INCR', KEYS[2]))
  redis.call('HSET', KEYS[1], cur, 'published')
  redis.call('HSET', KEYS[4], cur, ARGV[1])
  redis.call('SET', KEYS[3], cur)
end
local out = {cur}
local gens = redis.call('HGETALL', KEYS[1])
for i = 1, #gens, 2 do
  if gens[i + 1] == 'writing' then table.insert(out, gens[i]) end
end
return out
""")

# KEYS: one entity hash. ARGV: event µs, created µs, payload, generation... Keep the newer row.
# Returns, per generation, 1 where the key was new to it (counted into the view's rows hash).
_UPSERT = _lua("""
local e = tonumber(ARGV[1])
local c = tonumber(ARGV[2])
local created = {}
for i = 4, #ARGV do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local newer = true
  created[i - 3] = 0
  if not cur then created[i - 3] = 1 end
  if cur then
    local ce, cc = string.match(cur, '^(%-?%d+)|(%-?%d+)|')
    ce = tonumber(ce)
    cc = tonumber(cc)
    if ce > e or (ce == e and cc > c) then newer = false end
  end
  if newer then redis.call('HSET', KEYS[1], ARGV[i], ARGV[3]) end
end
return created
""")

# KEYS: one entity hash. ARGV: highest generation that existed when the pass began, live....
_CLEANUP = _lua("""
local maxgen = tonumber(ARGV[1])
local live = {}
for i = 2, #ARGV do live[ARGV[i]] = true end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local g = tonumber(f)
  if not live[f] and g and g <= maxgen then redis.call('HDEL', KEYS[1], f) end
end
return 0
""")


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class RedisOnlineStore(OnlineStore, EventState):
    """Online store on Redis or Redis Cluster; see the module doc for keys and timeouts. Also
    keeps real-time views' events (``EventState``).

    Args:
        url: ``redis://host:port/db``, ``rediss://…`` or ``unix://…`` (no password in it).
        project: namespaces every key, so projects can share one Redis.
        key_prefix: the first part of every key.
        timeout: connect and socket timeout of reads (the serving path).
        write_timeout: socket timeout of writes (batches from materialization and push).
        cleanup_grace: on a cluster, how long after a publish the previous generation's fields
            stay, so a read that fetched the old pointer still finds them (reads there are not
            one transaction). None = max(1 s, 20 × timeout). A single Redis reads in MULTI/EXEC
            and needs none.
        keep_generations: published generations kept for rollback, the current one included
            (1: none to roll back to). Each kept generation holds a full copy of the view.
    """

    def __init__(
        self,
        url: str,
        *,
        project: str,
        key_prefix: str = "mlp",
        timeout: timedelta = timedelta(milliseconds=50),
        write_timeout: timedelta = timedelta(seconds=30),
        cleanup_grace: timedelta | None = None,
        keep_generations: int = 2,
    ) -> None:
        if isinstance(keep_generations, bool) or not isinstance(keep_generations, int) or keep_generations < 1:
            raise ConfigError(f"keep_generations must be an integer >= 1, got {keep_generations!r}")
        self.keep_generations = keep_generations
        self.url = url
        self.project = project
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.write_timeout = write_timeout
        self.cleanup_grace = max(timedelta(seconds=1), 20 * timeout) if cleanup_grace is None else cleanup_grace
        self._clients: dict[str, Any] | None = None
        self._scripts: dict[str, Any] = {}
        self._cluster = False
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisOnlineStore({self.url!r}, project={self.project!r})"

    def __getstate__(self) -> dict[str, Any]:
        keys = ("url", "project", "key_prefix", "timeout", "write_timeout", "cleanup_grace", "keep_generations")
        return {k: getattr(self, k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("url"), **state)

    # ----------------------------------------------------------------------------- keys
    def _meta(self, view: str) -> str:
        return f"{self.key_prefix}:{{{self.project}:{view}}}"

    def _entity(self, view: str, key: str) -> str:
        return f"{self.key_prefix}:{{{self.project}:{view}:{key}}}"

    def _entity_pattern(self, view: str) -> str:
        return _glob_escape(f"{self.key_prefix}:{{{self.project}:{view}:") + "*"

    # Event keys start "P:events:{", so the entity pattern above (and its cleanup) never matches them.
    def _events_keys(self, view: str, key: str) -> tuple[str, str]:
        events = f"{self.key_prefix}:events:{{{self.project}:{view}:{key}}}"
        return events, f"{events}:by_time"

    def _events_pattern(self, view: str) -> str:
        return _glob_escape(f"{self.key_prefix}:events:{{{self.project}:{view}:") + "*"

    # ----------------------------------------------------------------------- connection
    def _client(self, role: str) -> Any:
        """``"read"`` (short timeout, no retries) or ``"write"`` client, created on first use."""
        if self._clients is None or self._pid != os.getpid():
            with self._lock:
                if self._clients is None or self._pid != os.getpid():
                    self._clients = self._connect(role)
                    self._cluster = self._clients.pop("cluster")
                    self._scripts = {}
                    self._pid = os.getpid()
        return self._clients[role]

    def _connect(self, role: str) -> dict[str, Any]:
        try:
            import redis
            from redis.backoff import ExponentialBackoff, NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise DependencyError.missing("redis", "redis>=5", "the Redis online store") from None
        password = os.environ.get("REDIS_PASSWORD") or None
        read_s = self.timeout.total_seconds()
        write_s = self.write_timeout.total_seconds()
        common = {"password": password, "decode_responses": True, "health_check_interval": 0}
        read_kwargs = {**common, "socket_timeout": read_s, "socket_connect_timeout": read_s, "retry": Retry(NoBackoff(), 0)}
        write_kwargs = {
            **common,
            "socket_timeout": write_s,
            "socket_connect_timeout": min(write_s, 5.0),
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        }
        # One probe, bounded like the call that needs it, tells a cluster from a single Redis.
        probe = redis.Redis.from_url(self.url, **(read_kwargs if role == "read" else write_kwargs))
        try:
            cluster = int(probe.info("cluster").get("cluster_enabled", 0)) == 1
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError) as exc:
            raise OnlineStoreUnavailable(
                f"Redis at {self.url} refused the connection: {exc}; set REDIS_PASSWORD in the environment"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise OnlineStoreUnavailable(f"Redis at {self.url} is unavailable: {exc}") from None
        finally:
            probe.close()
        if cluster:
            from redis.cluster import RedisCluster

            return {
                "read": RedisCluster.from_url(self.url, **read_kwargs),
                "write": RedisCluster.from_url(self.url, **write_kwargs),
                "cluster": True,
            }
        return {
            "read": redis.Redis.from_url(self.url, **read_kwargs),
            "write": redis.Redis.from_url(self.url, **write_kwargs),
            "cluster": False,
        }

    def _eval(self, source: str, keys: list[str], args: Sequence[Any] = (), client: Any = None) -> Any:
        """Run a Lua script on ``client`` (default: the write client), which may be a pipeline.

        A single Redis gets EVALSHA (the script is loaded once); Redis Cluster pipelines refuse
        EVALSHA (a node may not have the script), so there the text goes along with EVAL, which
        the server still compiles only once.
        """
        writer = self._client("write")
        if self._cluster:
            return (client or writer).execute_command("EVAL", source, len(keys), *keys, *args)
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = writer.register_script(source)
        return script(keys=keys, args=list(args), client=client or writer)

    def close(self) -> None:
        with self._lock:
            if self._clients is not None and self._pid == os.getpid():
                for role in ("read", "write"):
                    self._clients[role].close()
            self._clients = None

    def _call(self, what: str, fn: Any) -> Any:
        """Run a write-side operation, mapping Redis failures onto platform errors."""
        import redis

        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise OnlineStoreUnavailable(f"Redis at {self.url} is unavailable ({what}): {exc}") from None
        except redis.exceptions.RedisError as exc:
            raise StorageError(f"Redis at {self.url}: {what} failed: {exc}") from None

    # --------------------------------------------------------------------------- writes
    def begin(self, view: OnlineView) -> str:
        meta = self._meta(view.name)
        gen = self._call("begin", lambda: self._eval(_BEGIN, [f"{meta}:gens", f"{meta}:seq"]))
        self._cleanup(view.name)
        return str(gen)

    def write_encoded(self, view: OnlineView, generation: str, rows: Sequence[EncodedRow]) -> int:
        gens = f"{self._meta(view.name)}:gens"
        for at in range(0, len(rows), _WRITE_CHUNK):
            state = self._call("write", lambda: self._client("write").hget(gens, generation))
            if state != "writing":
                raise ConflictError(
                    f"generation {generation} of view {view.name!r} is {state or 'unknown'}, not being written: "
                    "a newer materialization superseded it or it was aborted"
                )
            self._write_rows(view.name, rows[at : at + _WRITE_CHUNK], [generation])
        return len(rows)

    def upsert_encoded(self, view: OnlineView, rows: Sequence[EncodedRow]) -> int:
        meta = self._meta(view.name)
        keys = [f"{meta}:gens", f"{meta}:seq", f"{meta}:current", f"{meta}:published_at"]
        for at in range(0, len(rows), _WRITE_CHUNK):
            live = self._call("upsert", lambda: self._eval(_LIVE, keys, [datetime.now(UTC).isoformat()]))
            self._write_rows(view.name, rows[at : at + _WRITE_CHUNK], list(live))
        return len(rows)

    def _write_rows(self, view: str, rows: Sequence[EncodedRow], generations: list[str]) -> None:
        if not rows:
            return
        def run() -> None:
            client = self._client("write")
            pipe = client.pipeline(transaction=False)
            for row in rows:
                payload = f"{row.event_us}|{row.created_us}|{row.values}"
                args = [row.event_us, row.created_us, payload, *generations]
                self._eval(_UPSERT, [self._entity(view, row.key)], args, client=pipe)
            created = [0] * len(generations)
            for flags in pipe.execute():
                for i, flag in enumerate(flags):
                    created[i] += int(flag)
            counts = client.pipeline(transaction=False)
            for gen, n in zip(generations, created):
                if n:
                    counts.hincrby(f"{self._meta(view)}:rows", gen, n)
            counts.execute()

        self._call("write", run)

    def publish(self, view: OnlineView, generation: str) -> None:
        meta = self._meta(view.name)
        keys = [f"{meta}:gens", f"{meta}:current", f"{meta}:published_at"]
        args = [generation, self.keep_generations, datetime.now(UTC).isoformat()]
        result = self._call("publish", lambda: self._eval(_PUBLISH, keys, args))
        if result != "ok":
            raise ConflictError(
                f"cannot publish generation {generation} of view {view.name!r}: it is {result} "
                "(superseded by a newer materialization, or aborted)"
            )
        if self._cluster:
            time.sleep(self.cleanup_grace.total_seconds())
        self._cleanup(view.name)

    def rollback(self, view: OnlineView | str, generation: str | None = None) -> str:
        name = name_of(view)
        meta = self._meta(name)
        wanted = "" if generation is None else str(generation).strip()
        if generation is not None and not wanted.isdigit():
            raise unknown_generation(name, str(generation), self.generations(name))
        status, target = self._call(
            "rollback", lambda: self._eval(_ROLLBACK, [f"{meta}:gens", f"{meta}:current"], [wanted])
        )
        if status != "ok":
            raise unknown_generation(name, None if generation is None else wanted, self.generations(name))
        return str(target)

    def generations(self, view: OnlineView | str) -> list[Generation]:
        meta = self._meta(name_of(view))

        def run() -> list[Any]:
            pipe = self._client("write").pipeline(transaction=not self._cluster)
            pipe.hgetall(f"{meta}:gens")
            pipe.hgetall(f"{meta}:published_at")
            pipe.hgetall(f"{meta}:rows")
            return pipe.execute()

        gens, published, rows = self._call("list generations", run)
        out = [
            Generation(
                gen,
                "current" if state == "published" else state,
                datetime.fromisoformat(published[gen]) if gen in published else None,
                int(rows.get(gen, 0)),
            )
            for gen, state in gens.items()
            if state in ("published", "kept", "withdrawn")
        ]
        return sorted(out, key=lambda g: (g.state != "current", -int(g.generation)))

    def abort(self, view: OnlineView, generation: str) -> None:
        meta = self._meta(view.name)
        self._call("abort", lambda: self._eval(_ABORT, [f"{meta}:gens"], [generation]))
        self._cleanup(view.name)

    def _cleanup(self, view: str) -> None:
        """Delete entity fields of generations that are no longer live (see the module doc)."""
        meta = self._meta(view)
        client = self._client("write")

        def run() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.get(f"{meta}:seq")
            pipe.hgetall(f"{meta}:gens")
            seq, gens = pipe.execute()
            if seq is None:
                return
            live = [g for g, state in gens.items() if state in ("writing", "published", "kept", "withdrawn")]
            dead = [g for g, state in gens.items() if state == "dead"]
            batch: list[str] = []

            def flush() -> None:
                pipe = client.pipeline(transaction=False)
                for key in batch:
                    self._eval(_CLEANUP, [key], [seq, *live], client=pipe)
                pipe.execute()
                batch.clear()

            for key in client.scan_iter(match=self._entity_pattern(view), count=1000):
                batch.append(key)
                if len(batch) >= _CLEANUP_CHUNK:
                    flush()
            if batch:
                flush()
            if dead:  # their fields are gone: forget them
                forget = client.pipeline(transaction=False)
                for suffix in ("gens", "published_at", "rows"):
                    forget.hdel(f"{meta}:{suffix}", *dead)
                forget.execute()

        self._call("cleanup", run)

    # ---------------------------------------------------------------------------- reads
    def current_generation(self, view: OnlineView | str) -> str | None:
        name = view if isinstance(view, str) else view.name
        return self._read("read", lambda client: client.get(f"{self._meta(name)}:current"))

    def _read(self, what: str, fn: Any) -> Any:
        import redis

        try:
            return fn(self._client("read"))
        except redis.exceptions.RedisError as exc:
            raise OnlineStoreUnavailable(f"Redis at {self.url} did not answer the {what} within {self.timeout}: {exc}") from None

    def _fetch(self, view: OnlineView, keys: Sequence[str]) -> list[tuple[int, int, str] | None]:
        current = f"{self._meta(view.name)}:current"

        def run(client: Any) -> list[Any]:
            # A single Redis answers the whole read as one MULTI/EXEC: one consistent state,
            # still one round trip. A cluster cannot (keys live in many slots); see cleanup_grace.
            pipe = client.pipeline(transaction=not self._cluster)
            pipe.get(current)
            for key in keys:
                pipe.hgetall(self._entity(view.name, key))
            return pipe.execute()

        replies = self._read("read", run)
        gen = replies[0]
        out: list[tuple[int, int, str] | None] = []
        for fields in replies[1:]:
            payload = fields.get(gen) if gen is not None else None
            if payload is None:
                out.append(None)
                continue
            event, created, values = payload.split("|", 2)
            out.append((int(event), int(created), values))
        return out

    # ---------------------------------------------------------------------- event state
    def apply_events(self, view: str, events: Sequence[EncodedEvent], *, now_us: int, retention_us: int) -> int:
        if not events:
            return 0
        return self._call(
            "apply events",
            lambda: redis_events.apply(
                self._client("write"), self._eval, partial(self._events_keys, view), events,
                now_us=now_us, retention_us=retention_us,
            ),
        )

    def fetch_events(self, view: str, keys: Sequence[str], *, after_us: int) -> list[list[EncodedEvent]]:
        if not keys:
            return []
        return self._read(
            "event fetch", lambda client: redis_events.fetch(client, partial(self._events_keys, view), keys, after_us=after_us)
        )

    def drop_events(self, view: str) -> None:
        self._call("drop events", lambda: redis_events.drop(self._client("write"), self._events_pattern(view)))
