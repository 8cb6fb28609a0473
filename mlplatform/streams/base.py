"""The event bus contract: durable, ordered streams of messages read by consumer groups.

    accepted = bus.append("checkouts", [{"event_id": "e-1", "amount": 120.0, ...}])
    bus.create_group("checkouts", "processors")
    messages = bus.read("checkouts", "processors", "checkouts-0", count=500, block_ms=500)
    ...                                                     # apply them somewhere durable
    bus.ack("checkouts", "processors", [m.position for m in messages])

A *stream* (one per source name) is an append-only sequence of messages; a message is a
JSON-able ``dict`` payload stamped by the bus with

- ``position``: an int64, unique in the stream and increasing in the order the bus accepted
  the messages (a later append never gets a smaller position);
- ``known_us``: when the bus accepted it, UTC microseconds since the epoch, by the bus's own
  clock (never the sender's); non-decreasing along positions.

**Accepted means durable.** ``append`` returns only once its messages are stored as durably as
the backend promises (each backend's module says exactly what that is); if it raises, the
messages may or may not have been accepted, and sending them again is the way to be sure (the
platform's readers count copies of one event id once).

**Consumer groups** (the Redis Streams model). A group reads a stream once: each message is
delivered to one consumer of the group and stays *pending* — delivered, not acknowledged — until
that consumer ``ack``s it. What a consumer that died left pending is redelivered: to itself
when it comes back (``read_pending``), or to a live consumer that ``claim_stale``s messages
idle for longer than a bound. Delivery is therefore at least once: a consumer must make its
work idempotent and acknowledge only what it has made durable.

**Retention.** ``trim`` deletes the messages every group of the stream has acknowledged; a
message some group has not acknowledged (pending, or not yet delivered) is kept.

Backends: ``sqlite`` (embedded default, one machine) and ``redis`` (Redis Streams), chosen by
the ``streams`` config section; they pass the same contract tests. Kafka fits the same shape
(a topic per source, a consumer group; positions from partition offsets).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mlplatform.errors import StorageError

__all__ = ["Accepted", "EventBus", "EventBusUnavailable", "GroupInfo", "Message"]


class EventBusUnavailable(StorageError):
    """The event bus did not answer, or answered without its durability guarantee; what was
    being appended may or may not have been accepted (sending it again is safe)."""


class Accepted(NamedTuple):
    """Where and when the bus accepted one message."""

    position: int
    known_us: int


@dataclass(frozen=True)
class Message:
    """One message as delivered to a consumer: its stream position, when the bus accepted it
    (UTC µs) and its payload."""

    position: int
    known_us: int
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class GroupInfo:
    """A consumer group's progress on one stream.

    ``pending``: delivered, not yet acknowledged; ``lag``: not yet delivered to the group
    (None when the backend cannot tell); ``consumers``: pending messages per consumer;
    ``oldest_pending_ms``: how long the longest-pending message has been waiting since its
    last delivery (None with nothing pending).
    """

    group: str
    pending: int
    lag: int | None
    last_delivered: int
    consumers: Mapping[str, int] = field(default_factory=dict)
    oldest_pending_ms: int | None = None


class EventBus(ABC):
    """Durable streams with consumer groups; see the module doc for the guarantees.

    Implementations pickle (Ray actors receive them) and connect lazily in each process.
    """

    @abstractmethod
    def append(self, stream: str, payloads: Sequence[Mapping[str, Any]]) -> list[Accepted]:
        """Accept ``payloads`` (JSON-able dicts) at the end of ``stream``, durably, in order.

        Returns:
            Per payload, its position and acceptance time, in the order given.

        Raises:
            EventBusUnavailable: the bus did not confirm; some or all may have been accepted.
        """

    @abstractmethod
    def create_group(self, stream: str, group: str) -> None:
        """Create consumer ``group`` on ``stream`` (and the stream), reading from its oldest
        retained message; nothing if the group exists."""

    @abstractmethod
    def read(self, stream: str, group: str, consumer: str, *, count: int, block_ms: int = 0) -> list[Message]:
        """Up to ``count`` messages never delivered to ``group``, oldest first, now pending for
        ``consumer``; waits up to ``block_ms`` for the first one (0: do not wait).

        Raises:
            NotFoundError: the group does not exist (``create_group`` first).
            EventBusUnavailable: the bus did not answer.
        """

    @abstractmethod
    def read_pending(self, stream: str, group: str, consumer: str, *, count: int, after: int = 0) -> list[Message]:
        """``consumer``'s own pending messages with position > ``after``, oldest first (what it
        held when it last stopped): delivered again, to it."""

    @abstractmethod
    def claim_stale(self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int) -> list[Message]:
        """Take over up to ``count`` messages pending in ``group`` (for any consumer) whose last
        delivery was at least ``min_idle_ms`` ago, oldest first, and deliver them to
        ``consumer``: how the work of a consumer that died gets done."""

    @abstractmethod
    def ack(self, stream: str, group: str, positions: Sequence[int]) -> int:
        """Acknowledge messages of ``group`` (no longer pending). Returns how many were pending."""

    @abstractmethod
    def info(self, stream: str, group: str) -> GroupInfo:
        """``group``'s pending messages, lag and consumers on ``stream``.

        Raises:
            NotFoundError: the group does not exist.
        """

    @abstractmethod
    def trim(self, stream: str) -> int:
        """Delete the messages every group of ``stream`` has acknowledged (nothing if the stream
        has no group). Returns how many were deleted."""

    @abstractmethod
    def length(self, stream: str) -> int:
        """How many messages ``stream`` retains (0 for a stream never written)."""

    def close(self) -> None:
        """Release connections (the bus reconnects on next use)."""

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
