"""Windowed aggregations of one bucket of entities: the kernel behind feature backfills.

Pure numpy/pyarrow and vectorised across entities; no Ray here, so the kernel is
unit-testable and runs inside any Ray task unchanged (``backfill`` hands it one bucket of
whole entities at a time).

How it works. Boundaries are numbered ``k`` (``T = k * cadence`` since the epoch). An event
is *active* on the half-open range of boundaries ``[enter, exit)``: it enters at the first
boundary at or after the moment it was both real and known, ``max(event, created)``, and
leaves at the first boundary ``T`` with ``event <= T - window``. Values can only change at
an ``enter`` or an ``exit``, so only those boundaries (each entity's *candidates*, plus the
baseline) are evaluated: they are numbered in one sorted run, entity by entity, and every
event becomes an interval ``[lo, hi)`` of candidate numbers. Then, with no per-entity loop:

* ``count``: +1 at ``lo``, -1 at ``hi``, cumulative sum (integers, exact).
* ``sum``/``mean``: the same with +v/-v, as a compensated running sum that restarts for
  every entity, so an entity's values never carry rounding from another's.
* ``min``/``max``: a "stabbing" query. Each interval is cut into the O(log n) canonical
  nodes of a segment tree over candidate numbers (one tree level per vectorised step);
  a node keeps the max of the events cut into it; the value at candidate ``p`` is the max
  over the nodes on the path to leaf ``p``, one per level.

This module checks the inputs, drives the phases and turns the values back into rows. The
events become those intervals in :mod:`mlplatform.features._candidates`; the interval
queries themselves are in :mod:`mlplatform.features._intervals`.

Cost: O(n log n) for n events, memory a few dozen arrays of n. The underwriting
``applicant_history`` view (14 aggregations over 30/90/365 days) takes about 0.9 CPU-s per
500k events of the generated ledger, 1.2-1.5 s on uniformly random events (more changes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mlplatform.errors import DataError
from mlplatform.features._candidates import Candidates, events_in_range, number_candidates, plain_array
from mlplatform.features._intervals import count_holding, running_sums, segment_cover, stab
from mlplatform.features.definitions import Aggregation
from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP, UTC_MICROS

__all__ = ["event_time_range", "boundary_indices", "window_aggregate"]

_US = dt.timedelta(microseconds=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _micros_of(value: dt.datetime | dt.timedelta) -> int:
    if isinstance(value, dt.timedelta):
        return value // _US
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _US


def boundary_indices(start: dt.datetime, end: dt.datetime, cadence: dt.timedelta) -> tuple[int, int]:
    """``(k0, k_last)``: the last boundary index ``<= start`` and the last ``<= end``.

    The boundaries computed are ``k0 < k <= k_last`` (``start < T <= end``); ``k0`` is the
    baseline the first of them is compared with. Naive datetimes are UTC.
    """
    cad = _micros_of(cadence)
    return _micros_of(start) // cad, _micros_of(end) // cad


def event_time_range(
    aggregations: Sequence[Aggregation], cadence: dt.timedelta, start: dt.datetime, end: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """``(lo, hi)``: only events with ``lo < event time <= hi`` can affect boundaries in ``(start, end]``.

    ``lo`` is the baseline boundary (the last one ``<= start``) minus the longest window, so
    the state at the range's first boundary is complete; ``hi`` is the range's last boundary.
    """
    k0, k_last = boundary_indices(start, end, cadence)
    cad = _micros_of(cadence)
    longest = max(_micros_of(a.window) for a in aggregations)
    return (
        _EPOCH + (k0 * cad - longest) * _US,
        _EPOCH + (k_last * cad) * _US,
    )


def window_aggregate(
    events: pa.Table,
    *,
    join_keys: Sequence[str],
    event_ts: str,
    created_ts: str | None,
    aggregations: Sequence[Aggregation],
    cadence: dt.timedelta,
    availability_delay: dt.timedelta,
    start: dt.datetime,
    end: dt.datetime,
) -> pa.Table:
    """The rows of a windowed feature view for boundaries in ``(start, end]``, changes only.

        >>> rows = window_aggregate(events, join_keys=["applicant_id"], event_ts="event_ts",
        ...                         created_ts="known_ts", aggregations=view.aggregations,
        ...                         cadence=timedelta(days=1), availability_delay=timedelta(0),
        ...                         start=datetime(2024, 1, 1), end=datetime(2024, 2, 1))

    Semantics, exactly:

    * Boundaries are ``T = epoch + k * cadence`` (UTC midnight-aligned for cadences that
      divide a day). Computed: every ``T`` with ``start < T <= end``.
    * The value of an aggregation at ``T`` covers the entity's events with event time in
      ``(T - window, T]`` that were known by ``T``: created time ``<= T``. So an event counts
      from the first boundary ``>= max(event, created)`` until (excluding) the first boundary
      ``T`` with ``event <= T - window``. A null created time (or ``created_ts=None``) means
      known when it happened; rows with a null event time or a null join key are ignored.
    * ``count`` counts non-null values (rows when ``column`` is None) and is 0 over an empty
      window; ``sum`` adds non-null values and is 0 over an empty window; ``mean``, ``min``,
      ``max`` skip nulls and are null when the window holds no non-null value. NaN counts as
      null. Values are added as float64.
    * A row is emitted for an entity at ``T`` only if some value differs from the entity's
      value at the previous boundary (null = null; a value leaving the window is a change).
      For the first boundary of the range the previous one is the last boundary ``<= start``,
      computed but not emitted, so consecutive ranges ``(a, b]`` and ``(b, c]`` give exactly
      the rows of ``(a, c]``. Events outside the range still shape values inside it.
    * Output columns: the join keys (their input types), ``event_timestamp`` (= ``T``) and
      ``created_timestamp`` (= ``T + availability_delay``), both ``timestamp[us, tz=UTC]``,
      then one column per aggregation named ``feature_name``: int64 for ``count``, float64
      otherwise. Rows are ordered by entity (first appearance in ``events``), then ``T``.

    Args:
        events: the source events of whole entities (every event of an entity that matters
            for the range must be here; extra events are harmless).
        join_keys: entity key columns (ints or strings); several form a composite key.
        event_ts / created_ts: event time column and optional created (known) time column;
            any timestamp type or zone (normalised to UTC microseconds).
        aggregations: the view's aggregations.
        cadence: boundary spacing; availability_delay: added to ``T`` for ``created_timestamp``.
        start / end: the range; naive datetimes are UTC.

    Raises:
        DataError: a column is missing or not numeric, or ``start >= end``.
    """
    join_keys = list(join_keys)
    _check_columns(events, join_keys, event_ts, created_ts, aggregations)
    start_us, end_us = _micros_of(start), _micros_of(end)
    if start_us >= end_us:
        raise DataError(f"backfill start {start!r} must be before end {end!r}")
    cad = _micros_of(cadence)
    k0, k_last = start_us // cad, end_us // cad
    span = k_last - k0  # boundaries k0+1 .. k_last are computed; k0 is the baseline
    key_types = [events.schema.field(k).type for k in join_keys]
    if span <= 0 or events.num_rows == 0:
        return _empty(join_keys, key_types, aggregations)
    windows = sorted({_micros_of(a.window) for a in aggregations})
    kept = events_in_range(events, join_keys, event_ts, created_ts, windows, cad=cad, k0=k0, k_last=k_last)
    if kept is None:
        return _empty(join_keys, key_types, aggregations)
    candidates = number_candidates(kept, windows, span)
    values = _values_at_candidates(events, aggregations, kept.rows, candidates)
    emit = _changes(values, candidates)
    boundary = (candidates.boundary_of[emit] + k0) * cad
    key_rows = kept.rows[kept.first_row[candidates.cand_ent[emit]]]
    return _output(events, join_keys, aggregations, values, emit, key_rows, boundary, _micros_of(availability_delay))


def _check_columns(
    events: pa.Table,
    join_keys: list[str],
    event_ts: str,
    created_ts: str | None,
    aggregations: Sequence[Aggregation],
) -> None:
    """Raise :class:`DataError` unless the events have every column the view reads and it has an aggregation."""
    needed = [*join_keys, event_ts, *([created_ts] if created_ts else [])]
    needed += [a.column for a in aggregations if a.column is not None]
    missing = [c for c in dict.fromkeys(needed) if c not in events.column_names]
    if missing:
        raise DataError(f"source column {missing[0]!r} is missing; the events have columns {events.column_names}")
    if not aggregations:
        raise DataError("window_aggregate needs at least one aggregation")


def _values_at_candidates(
    events: pa.Table, aggregations: Sequence[Aggregation], rows: np.ndarray, candidates: Candidates
) -> dict[str, np.ndarray]:
    """Every aggregation's value at every candidate, by feature name: int64 counts, float64 (NaN for null) otherwise."""
    intervals, q = candidates.intervals, candidates.q
    values: dict[str, np.ndarray] = {}
    # Aggregations of one window and column share their queries: a mean is a sum and a count,
    # and every non-count needs the count to tell an empty window.
    cache: dict[tuple[Any, ...], np.ndarray] = {}
    pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    columns = {a.column: _values(events.column(a.column), rows) for a in aggregations if a.column is not None}
    summed = list(dict.fromkeys((_micros_of(a.window), a.column) for a in aggregations if a.function in ("sum", "mean")))
    sums = running_sums([(intervals[w], columns[c][0]) for w, c in summed], candidates.cand_ent, q)
    cache.update({("sum", w, c): total for (w, c), total in zip(summed, sums)})

    def query(kind: str, w: int, column: str | None) -> np.ndarray:
        if kind == "count" and column is not None and columns[column][1] is None:
            column = None  # a column without nulls counts rows
        key = (kind, w, column)
        if key in cache:
            return cache[key]
        iv = intervals[w]
        if kind == "count":
            weights = None if column is None else columns[column][1][iv.idx]  # type: ignore[index]
            out = count_holding(iv.lo, iv.hi, weights, q)
        else:
            if w not in pieces:
                pieces[w] = segment_cover(iv.lo, iv.hi)
            out = stab(kind, pieces[w], columns[column][0][iv.idx], q)  # type: ignore[index]
        cache[key] = out
        return out

    for agg in aggregations:
        w = _micros_of(agg.window)
        count = query("count", w, agg.column)
        if agg.function == "count":
            values[agg.feature_name] = count.astype(np.int64)
            continue
        empty = count == 0
        if agg.function == "sum":
            total = query("sum", w, agg.column)
            values[agg.feature_name] = np.where(empty, 0.0, total)
        elif agg.function == "mean":
            total = query("sum", w, agg.column)
            with np.errstate(invalid="ignore", divide="ignore"):
                values[agg.feature_name] = np.where(empty, np.nan, total / np.where(empty, 1, count))
        else:
            extreme = query(agg.function, w, agg.column)
            values[agg.feature_name] = np.where(empty, np.nan, extreme)
    return values


def _changes(values: dict[str, np.ndarray], candidates: Candidates) -> np.ndarray:
    """The candidates to emit: those where some value differs from the entity's previous candidate (NaN equals NaN)."""
    changed = np.zeros(candidates.q, dtype=bool)
    for v in values.values():
        if v.dtype.kind == "f":
            nan = np.isnan(v)
            diff = (v[1:] != v[:-1]) & ~(nan[1:] & nan[:-1])
        else:
            diff = v[1:] != v[:-1]
        changed[1:] |= diff
    changed[candidates.ent_start] = False  # k0: the baseline, computed to compare with, never emitted
    return np.flatnonzero(changed)


def _output(
    events: pa.Table,
    join_keys: list[str],
    aggregations: Sequence[Aggregation],
    values: dict[str, np.ndarray],
    emit: np.ndarray,
    key_rows: np.ndarray,
    boundary: np.ndarray,
    delay: int,
) -> pa.Table:
    """The emitted rows: the keys of source rows ``key_rows``, ``T = boundary`` (µs), ``T + delay``, the values at ``emit``."""
    out: dict[str, Any] = {k: plain_array(events.column(k)).take(pa.array(key_rows)) for k in join_keys}
    out[EVENT_TIMESTAMP] = pa.array(boundary, pa.int64()).cast(UTC_MICROS)
    out[CREATED_TIMESTAMP] = pa.array(boundary + delay, pa.int64()).cast(UTC_MICROS)
    for agg in aggregations:
        v = values[agg.feature_name][emit]
        if agg.function == "count":
            out[agg.feature_name] = pa.array(v, pa.int64())
        else:
            out[agg.feature_name] = pa.array(v, pa.float64(), from_pandas=True)
    return pa.table(out)


def _values(column: pa.ChunkedArray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 values (NaN where null or NaN) of ``rows`` and their non-null mask (None: no nulls)."""
    column = plain_array(column)
    typ = column.type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
            or pa.types.is_decimal(typ) or pa.types.is_null(typ)):
        raise DataError(f"cannot aggregate column of type {typ}: count/sum/mean/min/max need numbers or booleans")
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)[rows]
    nan = np.isnan(values)
    return values, (~nan if nan.any() else None)


def _empty(join_keys: list[str], key_types: list[pa.DataType], aggregations: Sequence[Aggregation]) -> pa.Table:
    fields = [pa.field(k, t.value_type if pa.types.is_dictionary(t) else t) for k, t in zip(join_keys, key_types)]
    fields += [pa.field(EVENT_TIMESTAMP, UTC_MICROS), pa.field(CREATED_TIMESTAMP, UTC_MICROS)]
    fields += [pa.field(a.feature_name, pa.int64() if a.function == "count" else pa.float64()) for a in aggregations]
    return pa.schema(fields).empty_table()
