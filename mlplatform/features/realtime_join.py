"""Training sets for real-time views: each entity row gets the values at its own timestamp.

    joined = realtime_join(entities, [(view, ["loans_24h"])], storage, entity_ts="application_ts")

The values are what :func:`mlplatform.features.realtime.aggregate` computes from the offline
event log (``event_log.read_events``) at the row's timestamp ``t``: the events real and known
at ``t`` (so always "as known at": serving could not have seen an event before the bus
accepted it), late ones and later copies of an id excluded. The online read runs the same
function on the same events, so a training row and a decision at the same instant see the
same value.

The log is read once on the driver and shared through Ray's object store; each batch of
entity rows is computed key by key (cost: rows x events of their keys). That is sized for
credit events (tens per applicant a year); a log too large for one worker's memory would be
hash-partitioned by key first, like the as-of join does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mlplatform.features.definitions import FeatureView, StreamSource
from mlplatform.features.event_log import read_events
from mlplatform.features.realtime import EventArrays, aggregate, from_table
from mlplatform.timestamps import UTC_MICROS, micros_and_valid

if TYPE_CHECKING:
    import ray.data

    from mlplatform.storage import Storage

__all__ = ["realtime_join", "realtime_values"]

_ARROW = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_()}


def realtime_values(
    view: FeatureView, names: Sequence[str], events: pa.Table, keys: Sequence[tuple[Any, ...]], at_us: np.ndarray
) -> dict[str, list[Any]]:
    """The features ``names`` of ``view`` for each (key, time) pair, from logged ``events``;
    plus ``event_timestamp`` (µs or None) per row. Pure: no Ray, no storage."""
    by_key = _group(view, events)
    rows: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(tuple(key), []).append(i)
    out: dict[str, list[Any]] = {n: [None] * len(keys) for n in [*names, "event_timestamp"]}
    empty = from_table(view, events.slice(0, 0))
    for key, index in rows.items():
        values = aggregate(view, by_key.get(key, empty), at_us[index])
        for name in out:
            column = values[name]
            for j, i in enumerate(index):
                out[name][i] = column[j]
    return out


def _group(view: FeatureView, events: pa.Table) -> dict[tuple[Any, ...], EventArrays]:
    if events.num_rows == 0:
        return {}
    keys = list(zip(*(events.column(k).to_pylist() for k in view.join_keys), strict=True))
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    arrays = from_table(view, events)
    return {key: arrays.take(np.asarray(index)) for key, index in groups.items()}


def _arrow_type(view: FeatureView, name: str) -> pa.DataType:
    agg = next(a for a in view.aggregations if a.feature_name == name)
    if agg.function == "count":
        return pa.int64()
    if agg.function != "last_k":
        return pa.float64()
    source = view.source
    assert isinstance(source, StreamSource)
    field = source.field(agg.column or "")
    return pa.list_(_ARROW.get(field.dtype if field else "string", pa.string()))


class _Join:
    """``map_batches`` callable: adds the real-time columns to a batch of entity rows."""

    def __init__(self, views: list[tuple[FeatureView, list[str], Any]], entity_ts: str, full: bool, stamps: bool) -> None:
        self.views, self.entity_ts, self.full, self.stamps = views, entity_ts, full, stamps
        self._events: dict[str, pa.Table] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        at_us = micros_and_valid(batch.column(self.entity_ts))[0].astype(np.int64)
        for view, names, ref in self.views:
            if view.name not in self._events:
                self._events[view.name] = ray.get(ref)
            keys = list(zip(*(batch.column(k).to_pylist() for k in view.join_keys), strict=True))
            values = realtime_values(view, names, self._events[view.name], keys, at_us)
            for name in names:
                column = f"{view.name}__{name}" if self.full else name
                batch = batch.append_column(column, pa.array(values[name], type=_arrow_type(view, name)))
            if self.stamps:
                stamps = pa.array(values["event_timestamp"], type=pa.int64()).cast(pa.timestamp("us")).cast(UTC_MICROS)
                batch = batch.append_column(f"{view.name}__event_timestamp", stamps)
        return batch


def realtime_join(
    entities: ray.data.Dataset,
    views: Sequence[tuple[FeatureView, list[str]]],
    storage: Storage,
    *,
    entity_ts: str,
    full_feature_names: bool = False,
    include_event_timestamps: bool = False,
) -> ray.data.Dataset:
    """Add each real-time view's ``names`` to ``entities`` (timestamps already UTC), valued at
    each row's ``entity_ts``; see the module doc."""
    import ray

    shared = []
    for view, names in views:
        source = view.source
        assert isinstance(source, StreamSource)
        shared.append((view, list(names), ray.put(read_events(storage, source))))
    join = _Join(shared, entity_ts, full_feature_names, include_event_timestamps)
    return entities.map_batches(join, batch_format="pyarrow", zero_copy_batch=True)

