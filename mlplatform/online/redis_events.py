"""The event state of the Redis online store: each key's recent events in two structures.

    store.apply_events("applicant_activity", events, now_us=now, retention_us=ret)   # RedisOnlineStore
    # -> redis_events.apply(client, store._eval, keys_of, events, ...): one pipeline, a script per key

Per (view, key) (names in ``RedisOnlineStore``'s module doc; one hash tag, so one slot)::

    <events>            HASH   event id -> "<event µs>|<known µs>|<arrival>|<payload JSON>"
    <events>:by_time    ZSET   event id scored by event µs: finds the events to trim

The hash is the state; the sorted set only indexes it. ``apply`` runs a Lua script once per key
(atomic per key: a reader sees all of a call's events for the key or none), pipelined, and
``fetch`` reads every key's hash in one pipeline. The guarantees are those of
:mod:`mlplatform.online.events`. Trimming is per touched key; each apply also sets both
structures to expire when the key's newest event leaves the window (``PEXPIRE`` of newest +
retention - ``now_us``, on the Redis clock from then), so a key that stops getting events
disappears by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mlplatform.online.events import EncodedEvent

__all__ = ["apply", "drop", "fetch"]

_WRITE_CHUNK = 1000  # events per pipeline
_DROP_CHUNK = 500  # keys per pipeline

# KEYS: events hash, by_time zset. ARGV: cutoff µs, now µs, retention µs, then per event:
# id, event µs, known µs, arrival, payload. Returns how many ids were not kept before.
# Known µs and arrival are compared as decimal strings, digit by digit: Lua numbers are
# doubles, exact only to 2^53, and a stream position may be larger.
_APPLY = "\n".join(
    line.strip()
    for line in """
local function less(a, b)
  if a == b then return false end
  local na = string.sub(a, 1, 1) == '-'
  if na ~= (string.sub(b, 1, 1) == '-') then return na end
  if #a ~= #b then return (#a < #b) ~= na end
  for j = 1, #a do
    local x, y = string.byte(a, j), string.byte(b, j)
    if x ~= y then return (x < y) ~= na end
  end
end
local new = 0
for i = 4, #ARGV, 5 do
  local id, e, k, a = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local cur = redis.call('HGET', KEYS[1], id)
  local earlier = true
  if cur then
    local ck, ca = string.match(cur, '^%-?%d+|(%-?%d+)|(%-?%d+)|')
    earlier = less(k, ck) or (k == ck and less(a, ca))
  else
    new = new + 1
  end
  if earlier then
    redis.call('HSET', KEYS[1], id, e .. '|' .. k .. '|' .. a .. '|' .. ARGV[i + 4])
    redis.call('ZADD', KEYS[2], e, id)
  end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for at = 1, #old, 1000 do
  redis.call('HDEL', KEYS[1], unpack(old, at, math.min(at + 999, #old)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2]
if newest then
  local ms = math.ceil((tonumber(newest) + tonumber(ARGV[3]) - tonumber(ARGV[2])) / 1000)
  ms = string.format('%.0f', math.max(ms, 1))
  redis.call('PEXPIRE', KEYS[1], ms)
  redis.call('PEXPIRE', KEYS[2], ms)
else
  redis.call('DEL', KEYS[1], KEYS[2])
end
return new
""".strip().splitlines()
)  # compact, as ``redis._lua`` does: on a cluster the text travels with every EVAL


def apply(
    client: Any,
    run_script: Callable[..., Any],
    keys_of: Callable[[str], tuple[str, str]],
    events: Sequence[EncodedEvent],
    *,
    now_us: int,
    retention_us: int,
) -> int:
    """Keep ``events`` (the earliest copy per ``(key, event_id)``), skip those with
    ``event_us <= now_us - retention_us`` and trim every key they name (even one whose events
    were all skipped).

    Args:
        client: the write client.
        run_script: ``RedisOnlineStore._eval`` (source, keys, args, client=pipeline).
        keys_of: an encoded key's (hash, sorted set) names.

    Returns:
        How many ``(key, event_id)`` were not kept before the call.
    """
    cutoff = now_us - retention_us
    per_key: dict[str, list[Any]] = {}
    for event in events:
        args = per_key.setdefault(event.key, [])
        if event.event_us > cutoff:
            args += [event.event_id, event.event_us, event.known_us, event.arrival, event.values]
    new = 0
    batch: list[tuple[str, list[Any]]] = []
    size = 0
    for key, args in per_key.items():
        batch.append((key, args))
        size += 1 + len(args) // 5
        if size >= _WRITE_CHUNK:
            new += _apply_batch(client, run_script, keys_of, batch, [cutoff, now_us, retention_us])
            batch, size = [], 0
    if batch:
        new += _apply_batch(client, run_script, keys_of, batch, [cutoff, now_us, retention_us])
    return new


def _apply_batch(
    client: Any, run_script: Callable[..., Any], keys_of: Callable[[str], tuple[str, str]],
    batch: list[tuple[str, list[Any]]], head: list[int],
) -> int:
    pipe = client.pipeline(transaction=False)
    for key, args in batch:
        run_script(_APPLY, list(keys_of(key)), [*head, *args], client=pipe)
    return sum(int(n) for n in pipe.execute())


def fetch(client: Any, keys_of: Callable[[str], tuple[str, str]], keys: Sequence[str], *, after_us: int) -> list[list[EncodedEvent]]:
    """Per key of ``keys``, in order, its kept events with ``event_us > after_us`` (any order),
    read in one pipeline (``HGETALL`` per key: each one sees one state of its key)."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(keys_of(key)[0])
    out: list[list[EncodedEvent]] = []
    for key, fields in zip(keys, pipe.execute(), strict=True):
        kept = []
        for event_id, stored in fields.items():
            event_us, known_us, arrival, payload = stored.split("|", 3)
            if int(event_us) > after_us:
                kept.append(EncodedEvent(key, event_id, int(event_us), int(known_us), int(arrival), payload))
        out.append(kept)
    return out


def drop(client: Any, pattern: str) -> None:
    """Delete every key matching ``pattern`` (one view's events; SCAN walks every node of a
    cluster), in pipelines of ``UNLINK``."""
    batch: list[str] = []
    for name in client.scan_iter(match=pattern, count=1000):
        batch.append(name)
        if len(batch) >= _DROP_CHUNK:
            _unlink(client, batch)
            batch = []
    if batch:
        _unlink(client, batch)


def _unlink(client: Any, names: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for name in names:  # one key per command: a cluster refuses keys of several slots in one
        pipe.unlink(name)
    pipe.execute()
