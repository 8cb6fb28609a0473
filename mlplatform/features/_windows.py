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

This module turns events into those intervals and the results back into rows; the interval
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
import pyarrow.compute as pc

from mlplatform.errors import DataError
from mlplatform.features._intervals import Intervals, count_holding, running_sums, segment_cover, stab
from mlplatform.features.definitions import Aggregation
from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP, UTC_MICROS, micros_and_valid

__all__ = ["event_time_range", "boundary_indices", "window_aggregate"]

_US = dt.timedelta(microseconds=1)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_INT64_BUDGET = 1 << 62


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
    needed = [*join_keys, event_ts, *([created_ts] if created_ts else [])]
    needed += [a.column for a in aggregations if a.column is not None]
    missing = [c for c in dict.fromkeys(needed) if c not in events.column_names]
    if missing:
        raise DataError(f"source column {missing[0]!r} is missing; the events have columns {events.column_names}")
    if not aggregations:
        raise DataError("window_aggregate needs at least one aggregation")
    start_us, end_us = _micros_of(start), _micros_of(end)
    if start_us >= end_us:
        raise DataError(f"backfill start {start!r} must be before end {end!r}")
    cad = _micros_of(cadence)
    k0, k_last = start_us // cad, end_us // cad
    span = k_last - k0  # boundaries k0+1 .. k_last are computed; k0 is the baseline
    key_types = [events.schema.field(k).type for k in join_keys]
    if span <= 0 or events.num_rows == 0:
        return _empty(join_keys, key_types, aggregations)

    # ---- per-event times, in boundary indices
    event, event_ok = micros_and_valid(events.column(event_ts))
    if created_ts:
        created, created_ok = micros_and_valid(events.column(created_ts))
        known = np.where(created_ok, np.maximum(event, created), event)
    else:
        known = event
    code, code_ok = _factorize(events, join_keys)
    windows = sorted({_micros_of(a.window) for a in aggregations})
    longest = windows[-1]
    keep = event_ok & code_ok & (event > k0 * cad - longest) & (known <= k_last * cad)
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        return _empty(join_keys, key_types, aggregations)
    event, known, code = event[rows], known[rows], code[rows]
    first_row, ent = _densify(code)
    n_ent = first_row.size
    enter = np.maximum(_ceil_div(known, cad), k0) - k0  # relative to k0, in 0..span
    exits = {w: _ceil_div(event + w, cad) - k0 for w in windows}  # relative, may pass span

    # ---- candidate boundaries per entity: k0 itself, every enter, every exit in range.
    # Candidates are numbered globally in (entity, boundary) order; an entity's candidates
    # are contiguous, its first one being k0.
    width = span + 2  # relative boundary 0..span, and span+1 = "after the range"
    if n_ent * width >= _INT64_BUDGET:
        raise DataError(f"range of {span} boundaries is too long for one backfill bucket; split the range")
    base = ent * width
    active = {w: enter < ex for w, ex in exits.items()}
    any_active = np.logical_or.reduce(list(active.values()))
    enter_rows = np.flatnonzero(any_active)
    inside = {w: np.flatnonzero(active[w] & (ex <= span)) for w, ex in exits.items()}
    keys = np.concatenate(
        [np.arange(n_ent, dtype=np.int64) * width, (base + enter)[enter_rows]]
        + [(base + exits[w])[inside[w]] for w in windows]
    )
    number = _number(keys)  # global candidate number of each key
    ent_start = number[:n_ent]
    q = int(number.max()) + 1
    ent_end = np.append(ent_start[1:], q)
    cand_ent = np.repeat(np.arange(n_ent, dtype=np.int64), ent_end - ent_start)
    boundary_of = np.empty(q, dtype=np.int64)
    boundary_of[number] = keys % width
    enter_at = np.full(rows.size, -1, dtype=np.int64)
    enter_at[enter_rows] = number[n_ent : n_ent + enter_rows.size]

    # ---- per window: every active event as an interval [lo, hi) of candidate numbers
    # (an exit after the range is numbered as the entity's end: the next entity's start)
    intervals: dict[int, Intervals] = {}
    at = n_ent + enter_rows.size
    for w in windows:
        idx = np.flatnonzero(active[w])
        hi = ent_end[ent]
        closes = np.zeros(rows.size, dtype=bool)
        hi[inside[w]] = number[at : at + inside[w].size]
        closes[inside[w]] = True
        at += inside[w].size
        intervals[w] = Intervals(idx, enter_at[idx], hi[idx], closes[idx])
    pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    # ---- per aggregation: the value at every candidate
    values: dict[str, np.ndarray] = {}
    cache: dict[tuple[Any, ...], np.ndarray] = {}
    columns = {a.column: _values(events.column(a.column), rows) for a in aggregations if a.column is not None}
    summed = list(dict.fromkeys((_micros_of(a.window), a.column) for a in aggregations if a.function in ("sum", "mean")))
    sums = running_sums([(intervals[w], columns[c][0]) for w, c in summed], cand_ent, q)
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

    # ---- keep candidates whose values differ from the entity's previous candidate
    changed = np.zeros(q, dtype=bool)
    for v in values.values():
        if v.dtype.kind == "f":
            nan = np.isnan(v)
            diff = (v[1:] != v[:-1]) & ~(nan[1:] & nan[:-1])
        else:
            diff = v[1:] != v[:-1]
        changed[1:] |= diff
    changed[ent_start] = False  # k0: the baseline, computed to compare with, never emitted
    emit = np.flatnonzero(changed)

    boundary = (boundary_of[emit] + k0) * cad
    key_rows = pa.array(rows[first_row[cand_ent[emit]]])
    out: dict[str, Any] = {k: _plain(events.column(k)).take(key_rows) for k in join_keys}
    out[EVENT_TIMESTAMP] = pa.array(boundary, pa.int64()).cast(UTC_MICROS)
    out[CREATED_TIMESTAMP] = pa.array(boundary + _micros_of(availability_delay), pa.int64()).cast(UTC_MICROS)
    for agg in aggregations:
        v = values[agg.feature_name][emit]
        if agg.function == "count":
            out[agg.feature_name] = pa.array(v, pa.int64())
        else:
            out[agg.feature_name] = pa.array(v, pa.float64(), from_pandas=True)
    return pa.table(out)


def _number(keys: np.ndarray) -> np.ndarray:
    """Dense rank of each key among the distinct keys (equal keys, equal numbers)."""
    order = np.argsort(keys)
    ordered = keys[order]
    new = np.empty(ordered.size, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    number = np.empty(keys.size, dtype=np.int64)
    number[order] = np.cumsum(new) - 1
    return number


# ------------------------------------------------------------------------------ helpers
def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -((-a) // b)


def _plain(column: pa.ChunkedArray) -> pa.Array:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column


def _factorize(table: pa.Table, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """An int64 code per row, equal iff all keys are equal, and whether no key is null."""
    code = np.zeros(table.num_rows, dtype=np.int64)
    ok = np.ones(table.num_rows, dtype=bool)
    card = 1
    for name in keys:
        column = _plain(table.column(name))
        if not (pa.types.is_integer(column.type) or pa.types.is_string(column.type)
                or pa.types.is_large_string(column.type) or pa.types.is_binary(column.type)):
            raise DataError(f"join key {name!r} must be integers or strings, got {column.type}")
        encoded = column.dictionary_encode()
        indices = encoded.indices
        if indices.null_count:
            ok &= indices.is_valid().to_numpy(zero_copy_only=False)
            indices = pc.fill_null(indices, 0)
        c = indices.to_numpy().astype(np.int64)
        n = max(len(encoded.dictionary), 1)
        if card * n >= _INT64_BUDGET:
            _, code = np.unique(code, return_inverse=True)
            card = int(code.max()) + 1
        code = code * n + c
        card *= n
    return code, ok


def _densify(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense entity numbers ``0..n-1`` in order of first appearance, and each one's first row."""
    _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(order.size)
    return first[order], renumber[inverse.reshape(-1)]


def _values(column: pa.ChunkedArray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 values (NaN where null or NaN) of ``rows`` and their non-null mask (None: no nulls)."""
    column = _plain(column)
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
