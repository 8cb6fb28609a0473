"""Candidate boundaries of the window kernel: where a bucket's values can change, numbered.

:func:`events_in_range` keeps the events that can shape a value in the range and puts them
in boundary indices: each *enters* at one boundary and, per window, *exits* at another.
:func:`number_candidates` numbers the boundaries worth evaluating (each entity's baseline,
enters and exits) in one sorted run, entity by entity, and turns every active event into an
interval ``[lo, hi)`` of those numbers, ready for the queries of
:mod:`mlplatform.features._intervals`. The semantics are stated in
:func:`mlplatform.features._windows.window_aggregate`, which drives both.

    >>> kept = events_in_range(events, ["applicant_id"], "event_ts", "known_ts", windows, cad=cad, k0=k0, k_last=k_last)
    >>> candidates = number_candidates(kept, windows, span=k_last - k0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError
from mlplatform.features._intervals import Intervals
from mlplatform.timestamps import micros_and_valid

__all__ = ["Candidates", "RangeEvents", "events_in_range", "number_candidates", "plain_array"]

# Composite keys and (entity, boundary) keys are int64; stay clear of the sign bit with a margin.
_INT64_BUDGET = 1 << 62


@dataclass(frozen=True)
class RangeEvents:
    """The events that can shape a value in the range, in boundary indices relative to ``k0``.

    Entry ``i`` is source row ``rows[i]``; entities are numbered ``0..n-1`` in order of first
    appearance (``ent``), and ``first_row[e]`` is entity ``e``'s first entry.
    """

    rows: np.ndarray
    ent: np.ndarray
    first_row: np.ndarray
    enter: np.ndarray  # the first boundary at which the event counts, in 0..span
    exits: dict[int, np.ndarray]  # per window (µs): the first boundary at which it no longer counts; may pass span


def events_in_range(
    events: pa.Table,
    join_keys: list[str],
    event_ts: str,
    created_ts: str | None,
    windows: list[int],
    *,
    cad: int,
    k0: int,
    k_last: int,
) -> RangeEvents | None:
    """The events that can affect boundaries ``k0..k_last``, each with its enter and exits; None if none can.

    An event enters at the first boundary at or after ``max(event, created)`` (a null created
    time: ``event``), never before ``k0``, and exits a window ``w`` at the first boundary
    ``T`` with ``event <= T - w``. Dropped: rows with a null event time or a null join key,
    events that have left even the longest window by ``k0``, and events known only after
    ``k_last``.

    Args:
        events: the source events; join_keys, event_ts, created_ts: their columns.
        windows: the distinct windows in microseconds, ascending.
        cad: the cadence in microseconds; k0 / k_last: the baseline and the last boundary.

    Raises:
        DataError: a join key is neither integers nor strings.
    """
    event, event_ok = micros_and_valid(events.column(event_ts))
    if created_ts:
        created, created_ok = micros_and_valid(events.column(created_ts))
        known = np.where(created_ok, np.maximum(event, created), event)
    else:
        known = event
    code, code_ok = _factorize(events, join_keys)
    longest = windows[-1]
    keep = event_ok & code_ok & (event > k0 * cad - longest) & (known <= k_last * cad)
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        return None
    event, known, code = event[rows], known[rows], code[rows]
    first_row, ent = _densify(code)
    enter = np.maximum(_ceil_div(known, cad), k0) - k0  # relative to k0, in 0..span
    exits = {w: _ceil_div(event + w, cad) - k0 for w in windows}  # relative, may pass span
    return RangeEvents(rows, ent, first_row, enter, exits)


@dataclass(frozen=True)
class Candidates:
    """The boundaries worth evaluating, numbered ``0..q-1`` entity by entity, and every window's
    active events as intervals of those numbers.

    ``cand_ent`` and ``boundary_of`` give each candidate's entity and boundary (relative to
    ``k0``); ``ent_start`` is each entity's first candidate, its baseline ``k0``.
    """

    q: int
    cand_ent: np.ndarray
    boundary_of: np.ndarray
    ent_start: np.ndarray
    intervals: dict[int, Intervals]


def number_candidates(kept: RangeEvents, windows: list[int], span: int) -> Candidates:
    """Number every entity's candidate boundaries and turn each active event into an interval of them.

    An entity's candidates are ``k0`` itself, every enter and every exit in range: values can
    change nowhere else. They are numbered globally in (entity, boundary) order, so an
    entity's candidates are contiguous, its first one being ``k0``. An event is active in a
    window if it enters before it exits; it holds candidates ``[enter, exit)``, where an exit
    after the range is numbered as the entity's end (the next entity's start).

    Raises:
        DataError: the bucket's entities times the range's boundaries would overflow int64.
    """
    ent, enter, exits = kept.ent, kept.enter, kept.exits
    n_ent = kept.first_row.size
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
    enter_at = np.full(kept.rows.size, -1, dtype=np.int64)
    enter_at[enter_rows] = number[n_ent : n_ent + enter_rows.size]

    # ``keys`` put the exits after the enters, window by window in the order of ``windows``:
    # their numbers are read back in that order.
    intervals: dict[int, Intervals] = {}
    at = n_ent + enter_rows.size
    for w in windows:
        idx = np.flatnonzero(active[w])
        hi = ent_end[ent]
        closes = np.zeros(kept.rows.size, dtype=bool)
        hi[inside[w]] = number[at : at + inside[w].size]
        closes[inside[w]] = True
        at += inside[w].size
        intervals[w] = Intervals(idx, enter_at[idx], hi[idx], closes[idx])
    return Candidates(q, cand_ent, boundary_of, ent_start, intervals)


def plain_array(column: pa.ChunkedArray) -> pa.Array:
    """``column`` as one Array of its value type: chunks combined, a dictionary decoded."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return column


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


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -((-a) // b)


def _factorize(table: pa.Table, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """An int64 code per row, equal iff all keys are equal, and whether no key is null."""
    code = np.zeros(table.num_rows, dtype=np.int64)
    ok = np.ones(table.num_rows, dtype=bool)
    card = 1
    for name in keys:
        column = plain_array(table.column(name))
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
