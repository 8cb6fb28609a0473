"""The online event-state contract: each key's recent raw events of a real-time view.

    store.apply_events("applicant_activity", events, now_us=now, retention_us=ret)  # processors
    store.fetch_events("applicant_activity", ['[42]', '[7]'], after_us=now - ret)   # one round trip

A real-time view (a ``FeatureView`` on a ``StreamSource``) is aggregated at read time from the
raw events its keys had in the last ``retention`` (see :mod:`mlplatform.features.realtime`,
which owns the semantics); a store only keeps those events, exactly:

- **Idempotent and commutative.** Per ``(key, event_id)`` the store keeps one copy: the one
  with the smallest ``(known_us, arrival)``. Applying the same events again, or copies of one
  event in any order, from any number of processors at once, leaves the same state, so an
  at-least-once bus never double-counts.
- **Atomic per key.** A reader sees all of one ``apply_events`` call's events for a key or
  none of them.
- **Bounded.** Events with ``event_us <= now_us - retention_us`` are not kept: ``apply_events``
  skips them and trims the keys it touches; a key untouched for ``retention`` expires (Redis)
  or is trimmed by the view's next ``apply_events``, which trims all of its keys (SQLite).

Keys are ``encode_key`` strings, as for materialized rows; ``view`` is the view's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["EncodedEvent", "EventState"]


class EncodedEvent(NamedTuple):
    """One event as an online store keeps it: the entity key (``encode_key``), the event id,
    its event time and the time the bus accepted it (UTC microseconds), its stream position
    (orders copies accepted in the same microsecond) and its payload (compact JSON)."""

    key: str
    event_id: str
    event_us: int
    known_us: int
    arrival: int
    values: str


class EventState(ABC):
    """Raw recent events per key of real-time views; see the module doc for the guarantees."""

    @abstractmethod
    def apply_events(self, view: str, events: Sequence[EncodedEvent], *, now_us: int, retention_us: int) -> int:
        """Keep ``events`` (first copy per ``(key, event_id)`` wins, see the module doc) and
        trim the touched keys' events older than ``now_us - retention_us``.

        Returns:
            How many events were new (not a copy of one already kept).

        Raises:
            OnlineStoreUnavailable: the store did not answer; nothing or all of a key's events
                may have been applied (applying them again is harmless).
        """

    @abstractmethod
    def fetch_events(self, view: str, keys: Sequence[str], *, after_us: int) -> list[list[EncodedEvent]]:
        """Per key, in order, its kept events with ``event_us > after_us`` (any order), in
        one round trip for the whole batch.

        Raises:
            OnlineStoreUnavailable: the store did not answer within its timeout.
        """

    @abstractmethod
    def drop_events(self, view: str) -> None:
        """Forget every event of ``view`` (a view re-created or re-bootstrapped)."""
