"""Real-time windowed aggregations: the one implementation of a streaming view's semantics.

    events = EventArrays.from_table(view, table)      # one entity key's events, offline or online
    values = aggregate(view, events, at_us)           # {feature: [value at each time in at_us]}

The stream processors, the online read and the training-set path all go through this module,
so what a model is trained on and what it is served cannot drift apart.

**The semantics.** For a view on a ``StreamSource``, the value of an aggregation with window
``w`` for entity key ``k`` at time ``t`` covers exactly the events of ``k`` that are

1. *usable*: not late, and the first copy of their event id (below);
2. *real* at ``t``: event time in ``(t - w, t]`` (the window is open on the left, closed on
   the right, as for batch views, and ``t`` is any instant, not a boundary);
3. *known* at ``t``: accepted by the event bus at or before ``t`` (``created_timestamp``). A
   model trained on a row at ``t`` therefore sees only what serving could have seen at ``t``.

- **Event time versus arrival time.** An event's time is when it happened (given by the
  sender); its ``created_timestamp`` is when the bus accepted it (stamped by the platform,
  never by the sender). Events may arrive in any order: an event that happened before
  another but arrives after it is placed by its event time.
- **Allowed lateness.** An event accepted more than ``allowed_lateness`` after its event time
  is *late*: it is kept in the offline log (with everything else) but counted nowhere, online
  or offline, so a late event never changes a value that was already served. Ingest refuses
  events from the future (beyond ``features.max_future_skew``).
- **Duplicates.** Copies of one event id for one entity key are one event: the copy accepted
  first counts (smallest ``created_timestamp``, then the earlier stream position); the others
  are ignored, whatever else they carry. A copy the bus delivers twice (at-least-once) is the
  same copy. (Ids are per key: a sender that reuses an id for another key sends two events.)
- **Empty windows.** ``count`` and ``sum`` are 0, ``mean``/``min``/``max`` are null,
  ``last_k`` is an empty list. ``count`` counts non-null values (rows if the column is None);
  the other functions skip nulls.
- **``last_k``** lists the ``k`` most recent non-null values in the window, oldest first;
  "most recent" orders by event time, then acceptance (``created_timestamp``, stream
  position), then event id.
- **Exactness.** Counts, min, max and last_k are exact; sums and means are correctly rounded
  (``math.fsum``), so neither the order events arrived in nor the path (online or offline)
  changes a value.

**Online state.** Stores keep each key's usable raw events for ``retention(view)`` (the
longest window plus the allowed lateness) and aggregate at read time with this module: one
round trip per view for a batch of keys, exact by construction. Its cost grows with the
events a key has in its longest window — small for per-applicant credit events (tens a year)
— rather than with the window's length; tiles of partial aggregates are the way to add
long windows over busy keys, without changing these semantics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

from mlplatform.errors import DataError
from mlplatform.features.definitions import Aggregation, FeatureView, StreamSource
from mlplatform.features.event_log import ARRIVAL
from mlplatform.online.base import FeatureStatus, FeatureValue
from mlplatform.online.events import EncodedEvent, EventState
from mlplatform.timestamps import CREATED_TIMESTAMP, micros_and_valid

__all__ = [
    "EncodedEvent",
    "EventArrays",
    "aggregate",
    "empty_value",
    "encode_events",
    "from_table",
    "is_late",
    "read_online",
    "retention",
    "usable",
]

_US = timedelta(microseconds=1)



def retention(view: FeatureView) -> timedelta:
    """How long online state keeps an event after its event time: reads at any ``t`` no
    older than the allowed lateness before now are exact."""
    source = _source(view)
    return max(a.window for a in view.aggregations) + source.allowed_lateness


def is_late(source: StreamSource, event_us: np.ndarray, known_us: np.ndarray) -> np.ndarray:
    """True where an event was accepted more than ``allowed_lateness`` after it happened."""
    return (np.asarray(known_us, dtype=np.int64) - np.asarray(event_us, dtype=np.int64)) > source.allowed_lateness // _US


def empty_value(agg: Aggregation) -> Any:
    """The value of ``agg`` over an empty window."""
    return {"count": 0, "sum": 0.0, "last_k": []}.get(agg.function)


def _source(view: FeatureView) -> StreamSource:
    if not isinstance(view.source, StreamSource):
        raise DataError(f"feature view {view.name!r} is not real-time: its source {view.source.name!r} is not a StreamSource")
    return view.source


@dataclass(frozen=True)
class EventArrays:
    """The events of one entity key, as parallel arrays (any order, duplicates allowed)."""

    event_us: np.ndarray  # int64
    known_us: np.ndarray  # int64
    arrival: np.ndarray  # int64
    event_id: np.ndarray  # object (str)
    columns: Mapping[str, np.ndarray]  # object arrays: payload values, None for null

    @classmethod
    def from_encoded(cls, view: FeatureView, events: Sequence[EncodedEvent]) -> EventArrays:
        """From an online store's events (their ``values`` JSON holds the payload)."""
        names = _value_columns(view)
        payloads = _payloads(events)
        return cls(
            event_us=np.fromiter((e.event_us for e in events), dtype=np.int64, count=len(events)),
            known_us=np.fromiter((e.known_us for e in events), dtype=np.int64, count=len(events)),
            arrival=np.fromiter((e.arrival for e in events), dtype=np.int64, count=len(events)),
            event_id=np.array([e.event_id for e in events], dtype=object),
            columns={n: np.array([p.get(n) for p in payloads], dtype=object) for n in names},
        )

    def __len__(self) -> int:
        return len(self.event_us)

    def take(self, index: np.ndarray) -> EventArrays:
        return EventArrays(
            self.event_us[index], self.known_us[index], self.arrival[index], self.event_id[index],
            {n: c[index] for n, c in self.columns.items()},
        )


def _payloads(events: Sequence[EncodedEvent]) -> list[Any]:
    """Each event's decoded ``values``: one ``json.loads`` of them all (less than half the cost
    of one per event), or one per event when that does not give one object per event (then a
    bad payload raises as it would alone)."""
    if len(events) > 1:
        try:
            payloads = json.loads("[" + ",".join([e.values for e in events]) + "]")
        except ValueError:
            payloads = None
        if payloads is not None and len(payloads) == len(events) and all(type(p) is dict for p in payloads):
            return payloads
    return [json.loads(e.values) for e in events]


def _value_columns(view: FeatureView) -> list[str]:
    return sorted({a.column for a in view.aggregations if a.column})


def usable(view: FeatureView, events: EventArrays) -> EventArrays:
    """The events that count: late ones dropped, then one copy per event id (the first
    accepted), sorted by (event time, acceptance, stream position, event id)."""
    source = _source(view)
    keep = ~is_late(source, events.event_us, events.known_us)
    if not keep.all():
        events = events.take(np.flatnonzero(keep))
    if not len(events):
        return events
    ids = events.event_id.astype(str)
    if len(set(ids.tolist())) < len(ids):
        # first copy per id: sort by (id, known, arrival) and keep each id's first row
        order = np.lexsort((events.arrival, events.known_us, ids))
        first = np.ones(len(order), dtype=bool)
        first[1:] = ids[order][1:] != ids[order][:-1]
        events, ids = events.take(order[first]), ids[order[first]]
    return events.take(np.lexsort((ids, events.arrival, events.known_us, events.event_us)))


def aggregate(view: FeatureView, events: EventArrays, at_us: Sequence[int] | np.ndarray) -> dict[str, list[Any]]:
    """The value of every aggregation of ``view`` at each time of ``at_us`` (UTC microseconds)
    over one key's ``events``; see the module doc for the semantics.

    Returns:
        ``{feature name: [value at at_us[0], value at at_us[1], ...]}``, plus
        ``"event_timestamp"``: per time, the event time (µs) of the newest event that counts
        in any window, or None if none does.
    """
    at = np.asarray(at_us, dtype=np.int64)
    events = usable(view, events)
    out: dict[str, list[Any]] = {}
    if not len(events) or not len(at):
        for agg in view.aggregations:
            out[agg.feature_name] = [empty_value(agg) for _ in range(len(at))]
        out["event_timestamp"] = [None] * len(at)
        return out
    # times x events: known and real at t (events are sorted by event time)
    known = events.known_us[None, :] <= at[:, None]
    real = events.event_us[None, :] <= at[:, None]
    visible = known & real
    newest: list[Any] = [None] * len(at)
    longest = max(a.window for a in view.aggregations) // _US
    for agg in view.aggregations:
        inside = visible & (events.event_us[None, :] > (at - agg.window // _US)[:, None])
        if agg.column is None:
            out[agg.feature_name] = inside.sum(axis=1).astype(int).tolist()
            continue
        column = events.columns[agg.column]
        present = np.array([v is not None and not (isinstance(v, float) and math.isnan(v)) for v in column], dtype=bool)
        inside &= present[None, :]
        out[agg.feature_name] = [_reduce(agg, column, np.flatnonzero(row)) for row in inside]
    anywhere = visible & (events.event_us[None, :] > (at - longest)[:, None])
    for i, row in enumerate(anywhere):
        hits = np.flatnonzero(row)
        if len(hits):
            newest[i] = int(events.event_us[hits[-1]])
    out["event_timestamp"] = newest
    return out


def _reduce(agg: Aggregation, column: np.ndarray, index: np.ndarray) -> Any:
    """``agg`` over ``column[index]`` (non-null values, in event-time order)."""
    if agg.function == "count":
        return int(len(index))
    if agg.function == "last_k":
        return [_plain(v) for v in column[index[-agg.k :]]] if len(index) else []  # type: ignore[index]
    if not len(index):
        return empty_value(agg)
    values = [float(v) for v in column[index]]
    if agg.function == "sum":
        return math.fsum(values)
    if agg.function == "mean":
        return math.fsum(values) / len(values)
    if agg.function == "min":
        return min(values)
    return max(values)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def encode_events(view: FeatureView, table: pa.Table) -> list[EncodedEvent]:
    """Events in the offline log's shape (``event_log.event_schema``) as an online store keeps
    them for ``view``: keyed by its join keys, with only the columns it aggregates."""
    from mlplatform.online.base import encode_key

    source = _source(view)
    rows = table.select([*view.join_keys, source.event_id_field, *_value_columns(view)]).to_pylist()
    event_us = micros_and_valid(table.column(source.timestamp_field))[0]
    known_us = micros_and_valid(table.column(CREATED_TIMESTAMP))[0]
    arrival = table.column(ARRIVAL).to_numpy()
    names = _value_columns(view)
    return [
        EncodedEvent(
            encode_key([row[k] for k in view.join_keys]), str(row[source.event_id_field]), int(event_us[i]), int(known_us[i]),
            int(arrival[i]), json.dumps({n: row[n] for n in names}, separators=(",", ":")),
        )
        for i, row in enumerate(rows)
    ]


def from_table(view: FeatureView, table: pa.Table) -> EventArrays:
    """Logged events (``event_log.event_schema``; one key's, or any rows) as ``EventArrays``."""
    source = _source(view)
    return EventArrays(
        event_us=micros_and_valid(table.column(source.timestamp_field))[0].astype(np.int64),
        known_us=micros_and_valid(table.column(CREATED_TIMESTAMP))[0].astype(np.int64),
        arrival=table.column(ARRIVAL).to_numpy().astype(np.int64),
        event_id=np.array(table.column(source.event_id_field).to_pylist(), dtype=object),
        columns={n: np.array(table.column(n).to_pylist(), dtype=object) for n in _value_columns(view)},
    )


def read_online(
    store: EventState, view: FeatureView, keys: Sequence[Sequence[Any]], names: Sequence[str], now: datetime
) -> list[dict[str, FeatureValue]]:
    """The online value of each feature ``names`` of a real-time ``view`` for each key at
    ``now``: the events the store keeps (one round trip for all keys), aggregated here.

    Status PRESENT with the value, or NOT_FOUND where it is null (a mean, min or max over an
    empty window); the event time is that of the newest event counting in any window.
    """
    from mlplatform.online.base import encode_key, from_micros, to_micros

    at = to_micros(now)
    after = at - retention(view) // _US
    found = store.fetch_events(view.name, [encode_key(k) for k in keys], after_us=after)
    out = []
    for events in found:
        values = aggregate(view, EventArrays.from_encoded(view, events), [at])
        stamp = values["event_timestamp"][0]
        when = None if stamp is None else from_micros(stamp)
        row = {}
        for name in names:
            value = values[name][0]
            status = FeatureStatus.NOT_FOUND if value is None else FeatureStatus.PRESENT
            row[name] = FeatureValue(value, status, when)
        out.append(row)
    return out
