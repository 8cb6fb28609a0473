"""The point-in-time (as-of) join of one partition: the kernel behind ``point_in_time_join``.

Pure pyarrow/numpy and fully vectorised: keys are factorised across both sides
(:mod:`mlplatform.features._join_keys`), the feature rows are sorted once by (key, time) and
every entity row is answered by one ``searchsorted``. No Ray here, so the kernel is
unit-testable and runs inside any Ray task unchanged. Timestamps are compared after
:func:`~mlplatform.timestamps.to_utc`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError
from mlplatform.features._join_keys import factorize_keys
from mlplatform.timestamps import micros_and_valid, to_utc

__all__ = ["asof_join"]

# Composite (key, time) codes are int64; stay clear of the sign bit with a margin.
_INT64_BUDGET = 1 << 62
_ONE_MICRO = dt.timedelta(microseconds=1)


def asof_join(
    entities: pa.Table,
    features: pa.Table,
    *,
    join_keys: Sequence[str],
    entity_ts: str,
    event_ts: str,
    created_ts: str | None,
    feature_columns: Sequence[str],
    ttl: dt.timedelta | None,
    as_known_at: bool,
    output_names: Sequence[str],
    event_ts_output: str | None = None,
) -> pa.Table:
    """Attach to every entity row the feature values that were current at its timestamp.

        >>> out = asof_join(entities, features, join_keys=["applicant_id"], entity_ts="ts",
        ...                 event_ts="event_ts", created_ts=None, feature_columns=["score"],
        ...                 ttl=timedelta(days=30), as_known_at=False, output_names=["score"])

    Semantics, exactly:

    * Every entity row appears once, in its input order, with its own columns unchanged; the
      output columns are appended. Duplicate entity rows each get the same answer. Rows with
      no usable feature row get nulls — nothing is dropped.
    * A feature row is a candidate for an entity row when all join keys are equal (a null key
      on either side never matches) and ``t - ttl <= event <= t``, where ``t`` is the entity
      timestamp; both bounds are inclusive and ``ttl=None`` means no lower bound. With
      ``as_known_at=True`` the row must also have been known: ``created <= t``.
    * Among candidates the winner has the greatest event timestamp; ties go to the greatest
      created timestamp; remaining ties go to the row whose feature values, compared column
      by column in ``feature_columns`` order, are greatest (null < NaN < any number; strings
      by code point). Rows equal on all of these carry the same values, so the answer does
      not depend on row order or on partitioning. Nested columns (lists, structs, maps) take
      no part in that last tie-break.
    * A view without a created column (``created_ts=None``), or a row whose created value is
      null, uses the event time as created time. Feature rows with a null event timestamp or
      a null key are never used; an entity row with a null timestamp gets nulls.
    * Timestamps are compared as UTC microseconds (see :func:`to_utc`).

    Args:
        entities: the entity rows; must hold ``join_keys`` and ``entity_ts``.
        features: the feature rows; must hold ``join_keys``, ``event_ts``, ``created_ts``
            (when given) and ``feature_columns``.
        join_keys: key columns, the same names on both sides; ints or strings.
        entity_ts: timestamp column of ``entities``.
        event_ts: event timestamp column of ``features``.
        created_ts: created timestamp column of ``features``, or None.
        feature_columns: feature columns to bring over.
        ttl: the oldest a usable event may be, relative to the entity timestamp; None = any.
        as_known_at: also require ``created <= t``.
        output_names: output name for each of ``feature_columns``, same order.
        event_ts_output: if given, also output the matched row's event timestamp under this
            name (``timestamp[us, tz=UTC]``, null where no match).

    Returns:
        ``entities`` with one column per output name (and ``event_ts_output``) appended.

    Raises:
        DataError: a named column is missing, an output name collides with an entity column
            or repeats, key types are incompatible, or ``ttl`` is negative.
    """
    join_keys = list(join_keys)
    feature_columns = list(feature_columns)
    output_names = list(output_names)
    _require(entities, [*join_keys, entity_ts], "entity table")
    feature_needed = [*join_keys, event_ts, *([created_ts] if created_ts else []), *feature_columns]
    _require(features, feature_needed, "feature table")
    if len(output_names) != len(feature_columns):
        raise DataError(
            f"got {len(output_names)} output names {output_names} for {len(feature_columns)} "
            f"feature columns {feature_columns}; pass one output name per feature column"
        )
    new_names = [*output_names, *([event_ts_output] if event_ts_output else [])]
    _check_new_names(entities.column_names, new_names)
    if ttl is not None and ttl < dt.timedelta(0):
        raise DataError(f"ttl must not be negative, got {ttl!r}")

    chosen = _choose_rows(
        entities, features, join_keys, entity_ts, event_ts, created_ts, feature_columns, ttl, as_known_at
    )
    take_idx = pa.array(chosen, mask=chosen < 0)
    out = entities
    for column, name in zip(feature_columns, output_names):
        out = out.append_column(name, _take(features.column(column), take_idx))
    if event_ts_output:
        out = out.append_column(event_ts_output, _take(to_utc(features.column(event_ts)), take_idx))
    return out


def _choose_rows(
    entities: pa.Table,
    features: pa.Table,
    join_keys: list[str],
    entity_ts: str,
    event_ts: str,
    created_ts: str | None,
    feature_columns: list[str],
    ttl: dt.timedelta | None,
    as_known_at: bool,
) -> np.ndarray:
    """For each entity row, the index of its winning feature row, or -1."""
    n = entities.num_rows
    chosen = np.full(n, -1, dtype=np.int64)
    if n == 0 or features.num_rows == 0:
        return chosen

    t, t_ok = micros_and_valid(entities.column(entity_ts))
    event, event_ok = micros_and_valid(features.column(event_ts))
    if created_ts is not None:
        created, created_ok = micros_and_valid(features.column(created_ts))
        if not created_ok.all():
            created = np.where(created_ok, created, event)
    else:
        created = event
    k_e, k_f, n_codes = factorize_keys(entities, features, join_keys)

    # Drop feature rows that can never match; remember where the rest came from.
    usable = (k_f >= 0) & event_ok
    if not usable.all():
        source = np.flatnonzero(usable)
        if source.size == 0:
            return chosen
        k_f, event, created = k_f[source], event[source], created[source]
    else:
        source = None

    # Order every feature row by (key, event, created, feature values): its preference rank.
    by_event, event_query = _compose(k_f, event, n_codes)
    order = np.argsort(by_event)
    by_event_sorted = by_event[order]
    del by_event
    _break_ties(order, by_event_sorted, created if created_ts else None, features, feature_columns, source)

    if as_known_at and created_ts is not None:
        # A row is usable at t iff max(event, created) <= t. Sort by that availability time and
        # keep a running best rank per key: the best row available by then. Ranks of key k all
        # exceed those of smaller keys, so one global running max never crosses a key boundary.
        available = np.maximum(event, created)
        search_codes, query = _compose(k_f, available, n_codes)
        by_available = np.argsort(search_codes)  # order within equal times is irrelevant
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        best_sorted = order[np.maximum.accumulate(rank[by_available])]
        search_sorted = search_codes[by_available]
    else:
        # Usable iff event <= t: the last row at or before t in preference order wins.
        query = event_query
        best_sorted = order
        search_sorted = by_event_sorted

    ask = np.flatnonzero((k_e >= 0) & t_ok)
    if ask.size == 0:
        return chosen
    q, key_floor = query(k_e[ask], t[ask])
    # Sorted needles make searchsorted cache-friendly (~10x faster than random order).
    q_order = np.argsort(q)
    pos = np.empty_like(q_order)
    pos[q_order] = np.searchsorted(search_sorted, q[q_order], side="right") - 1
    # The row found is the last one at or below q; it is of the asked key iff its code lies
    # above that key's floor (codes of smaller keys are all at or below it).
    hit = pos >= 0
    hit[hit] = search_sorted[pos[hit]] > key_floor[hit]
    winner = best_sorted[pos[hit]]
    if ttl is not None:
        # The winner has the greatest event among usable rows, so checking its event alone
        # is exact: if it is too old, every usable row is.
        fresh = event[winner] >= t[ask[hit]] - ttl // _ONE_MICRO
        hit[hit] = fresh
        winner = winner[fresh]
    chosen[ask[hit]] = winner if source is None else source[winner]
    return chosen


def _compose(k: np.ndarray, times: np.ndarray, n_codes: int):
    """Encode (key code, time) as one sortable int64 per row, plus the matching query encoder.

    Key k owns the code range ``(k * width, (k + 1) * width)``: its rows have codes strictly
    inside it. The query encoder maps (k, t) to ``(q, k * width)`` where, for rows of key k,
    ``row_code <= q`` iff ``time <= t``. Times are offset from their minimum when that fits
    in int64, else replaced by ranks.
    """
    lo, hi = int(times.min()), int(times.max())
    span = hi - lo
    if n_codes * (span + 2) < _INT64_BUDGET:
        width = span + 2
        codes = k * width
        codes += times
        codes -= lo - 1

        def query(qk: np.ndarray, qt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            floor = qk * width
            return floor + (np.clip(qt, lo - 1, hi) - lo + 1), floor

        return codes, query
    distinct, rank = np.unique(times, return_inverse=True)
    width = distinct.size + 1
    codes = k * width + (rank.astype(np.int64) + 1)

    def query_ranked(qk: np.ndarray, qt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        floor = qk * width
        return floor + np.searchsorted(distinct, qt, side="right"), floor

    return codes, query_ranked


def _break_ties(
    order: np.ndarray,
    sorted_codes: np.ndarray,
    created: np.ndarray | None,
    features: pa.Table,
    feature_columns: list[str],
    source: np.ndarray | None,
) -> None:
    """Reorder, in place, runs of equal (key, event) codes by (created, feature values).

    ``sorted_codes`` are the codes in ``order``. Ties are rare, so only the rows inside tie
    runs go through Arrow's multi-key sort.
    """
    same = sorted_codes[1:] == sorted_codes[:-1]
    if not same.any():
        return
    in_run = np.zeros(order.size, dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    at = np.flatnonzero(in_run)
    rows = order[at]
    columns = {"_code": pa.array(sorted_codes[at])}
    sort_keys = [("_code", "ascending", "at_start")]
    if created is not None:
        columns["_created"] = pa.array(created[rows])
        sort_keys.append(("_created", "ascending", "at_start"))
    original = pa.array(rows if source is None else source[rows])
    for i, name in enumerate(feature_columns):
        column = features.column(name)
        if _sortable(column.type):
            columns[f"_f{i}"] = column.take(original)
            sort_keys.append((f"_f{i}", "ascending", "at_start"))
    # Runs are contiguous and sorted by code, so sorting the subset keeps each run in place.
    within = pc.sort_indices(pa.table(columns), sort_keys=sort_keys).to_numpy()
    order[at] = rows[within]


def _sortable(typ: pa.DataType) -> bool:
    if pa.types.is_dictionary(typ):
        return False
    return (
        pa.types.is_integer(typ)
        or pa.types.is_floating(typ)
        or pa.types.is_boolean(typ)
        or pa.types.is_string(typ)
        or pa.types.is_large_string(typ)
        or pa.types.is_binary(typ)
        or pa.types.is_large_binary(typ)
        or pa.types.is_temporal(typ)
        or pa.types.is_decimal(typ)
    )


def _take(column: pa.ChunkedArray | pa.Array, indices: pa.Array) -> pa.Array | pa.ChunkedArray:
    if isinstance(column, pa.ChunkedArray) and column.num_chunks == 1:
        column = column.chunk(0)
    return column.take(indices)


def _require(table: pa.Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in table.column_names]
    if missing:
        raise DataError(
            f"column {missing[0]!r} is not in the {what}"
            + (f" (also missing: {missing[1:]})" if len(missing) > 1 else "")
            + f"; available columns: {table.column_names}"
        )


def _check_new_names(existing: Sequence[str], new_names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in new_names:
        if name in existing:
            raise DataError(
                f"output column {name!r} would overwrite the entity column of the same name; "
                "rename the entity column or use full_feature_names=True"
            )
        if name in seen:
            raise DataError(f"output column {name!r} would be produced twice; use full_feature_names=True")
        seen.add(name)
