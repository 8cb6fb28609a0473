"""The online store contract: the latest feature row per entity key, in atomic generations.

    store = SqliteOnlineStore("/data/online.db")        # or RedisOnlineStore(...)
    generation = store.begin(view)                       # a new, invisible generation
    store.write(view, generation, rows)                  # batched, from as many tasks as you like
    store.publish(view, generation)                      # one atomic switch: readers see all of it
    store.read_one(view, (42,), ["loans_90d"], now)      # {"loans_90d": FeatureValue(3, PRESENT, ...)}

Keys are a view's join key values, in ``view.join_keys`` order (ints or strings). A stored row
is the features (int, float, string, bool, timestamp or null) plus the row's
``event_timestamp`` and ``created_timestamp``.

Generations. Everything a full materialization writes goes into a generation that readers do
not see until ``publish`` switches the view's pointer to it in one step; until then readers
see the previous complete generation. ``begin`` supersedes any generation of the view still
being written (its writer is presumed dead: a killed run leaves one behind), so one view has
at most one generation in progress, and writing to or publishing a superseded or aborted
generation raises ``ConflictError``. Re-running a materialization builds a new generation with
the same content: idempotent.

Kept generations and rollback. A store keeps the last ``keep_generations`` published
generations (the current one included; older ones are deleted after ``publish``/``abort``).
``generations(view)`` lists them; ``rollback(view)`` makes the newest kept generation older
than the current one current again, and ``rollback(view, generation)`` a named one (older or
newer: a rollback can be undone by naming the generation it left), in one atomic pointer
switch that readers pick up on their next read. A generation rolled back *from* stays kept
(state ``withdrawn``) so it can be restored by name, but a later ``rollback(view)`` without a
name skips it, so "go back" never returns to a generation someone already rolled back from.

Upserts (push, incremental materialization) go into the current generation *and* the one in
progress, if any, so a full rebuild running at the same time does not lose them. An upsert is
atomic per entity key: a reader sees a key's old row or its new row, never a mix. Kept (not
current) generations receive no upserts: a rollback restores a generation exactly as it was
when it stopped being current, so values pushed or incrementally materialized after that are
not in it (push them again, or materialize incrementally: the feature store's rollback points
its materialization state at the restored generation's own window).

Every write, into a generation or as an upsert, keeps the *newer* row per key: a row replaces
the stored one only if its ``(event_timestamp, created_timestamp)`` is greater or equal. So
writes may arrive in any order, from any number of tasks, and replaying them is harmless.

Reads enforce time: a row is usable at ``now`` only if ``now - ttl <= event_timestamp <= now``.
An older row comes back as ``None`` with status ``OUTSIDE_MAX_AGE``, never as a stale value;
a row from after ``now`` (not yet true at ``now``; also a clock-skew hazard for rows pushed from
another machine) as ``None`` with ``NOT_FOUND``, since the store keeps only the latest row per
key and has nothing older to fall back on. This is the same rule training sets use.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from mlplatform.errors import DataError, ServingError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "EncodedRow",
    "Generation",
    "FeatureStatus",
    "FeatureValue",
    "OnlineStore",
    "OnlineStoreUnavailable",
    "OnlineView",
    "StoredField",
    "encode_key",
    "encode_rows",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OnlineStoreUnavailable(ServingError):
    """The online store cannot be reached (down, or slower than its timeout); serving falls back."""


class FeatureStatus(str, Enum):
    """How a feature value was found (the names Feast's feature server uses)."""

    PRESENT = "PRESENT"
    NOT_FOUND = "NOT_FOUND"
    OUTSIDE_MAX_AGE = "OUTSIDE_MAX_AGE"

    def __str__(self) -> str:
        return self.value


class FeatureValue(NamedTuple):
    """One feature of one entity as read: ``value`` is None unless ``status`` is PRESENT
    (a PRESENT value may itself be None: the stored value was null)."""

    value: Any
    status: FeatureStatus
    event_timestamp: datetime | None


class EncodedRow(NamedTuple):
    """A row ready for a store: encoded key, event and created time in µs since the epoch, and
    the features as JSON text."""

    key: str
    event_us: int
    created_us: int
    values: str


class Generation(NamedTuple):
    """A kept generation of a view, as ``OnlineStore.generations`` lists it.

    ``state``: ``current`` (readers see it), ``kept`` (a previous one, the target of a plain
    rollback) or ``withdrawn`` (rolled back from; restorable by name only). ``rows``: entity
    keys it holds (None where the backend cannot tell).
    """

    generation: str
    state: str
    published_at: datetime | None
    rows: int | None


class StoredField(Protocol):
    """A feature as a store sees it: its name and dtype (``float64`` values are stored as floats)."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> str: ...


class OnlineView(Protocol):
    """What a store needs of a feature view: ``mlplatform.features.FeatureView`` is one. Stores
    depend on this shape, not on the feature store's definitions."""

    @property
    def name(self) -> str: ...

    @property
    def join_keys(self) -> tuple[str, ...]: ...

    @property
    def features(self) -> Sequence[StoredField]: ...

    @property
    def ttl(self) -> timedelta | None: ...


class OnlineStore(ABC):
    """The latest row per entity key of each view, written in generations; see the module doc.

    Stores are picklable (only their configuration travels) and open their connection lazily,
    so a Ray task can receive one and write from its own process.
    """

    # --------------------------------------------------------------------------- writes
    @abstractmethod
    def begin(self, view: OnlineView) -> str:
        """Start a new generation of ``view``, invisible to readers; supersedes one in progress."""

    @abstractmethod
    def write_encoded(self, view: OnlineView, generation: str, rows: Sequence[EncodedRow]) -> int:
        """Write rows into ``generation`` (newer row per key wins); returns the rows given.

        Raises:
            ConflictError: the generation was aborted, superseded or already replaced.
        """

    @abstractmethod
    def publish(self, view: OnlineView, generation: str) -> None:
        """Make ``generation`` the one readers see, atomically; then delete older generations.

        Raises:
            ConflictError: the generation was aborted or superseded (its writer lost the race).
        """

    @abstractmethod
    def abort(self, view: OnlineView, generation: str) -> None:
        """Drop ``generation``; readers never saw it. Aborting twice is harmless."""

    @abstractmethod
    def upsert_encoded(self, view: OnlineView, rows: Sequence[EncodedRow]) -> int:
        """Write rows into the current state (creating an empty one if the view has none),
        visible at once, atomic per key, newer row per key wins; returns the rows given."""

    def write(self, view: OnlineView, generation: str, rows: pa.Table | Iterable[Mapping[str, Any]]) -> int:
        """Write rows (join keys, ``event_timestamp``, optional ``created_timestamp``, features)
        into ``generation``. See ``encode_rows`` for what rows may hold."""
        return self.write_encoded(view, generation, encode_rows(view, rows))

    def upsert(self, view: OnlineView, rows: pa.Table | Iterable[Mapping[str, Any]]) -> int:
        """Write rows into the current state, visible at once; see ``upsert_encoded``."""
        return self.upsert_encoded(view, encode_rows(view, rows))

    @abstractmethod
    def rollback(self, view: OnlineView | str, generation: str | None = None) -> str:
        """Make a kept generation current again, atomically; returns it.

            store.rollback(view)          # the newest kept generation older than the current one
            store.rollback(view, "7")     # a named kept generation (older or newer)

        The generation left becomes ``withdrawn`` when the target is older (restorable by
        name, skipped by a plain rollback) and ``kept`` when it is newer. Naming the current
        generation changes nothing. A full materialization in progress is not stopped: when
        it publishes, its generation becomes current as usual.

        Raises:
            NotFoundError: ``generation`` is not a kept generation of the view (the message
                lists those that are), or there is no kept generation to go back to.
        """

    @abstractmethod
    def generations(self, view: OnlineView | str) -> list[Generation]:
        """The view's published generations still kept (the current one first, then newest
        first); empty if the view was never materialized or pushed."""

    # ---------------------------------------------------------------------------- reads
    @abstractmethod
    def current_generation(self, view: OnlineView | str) -> str | None:
        """The generation readers see, or None if the view was never materialized or pushed."""

    @abstractmethod
    def _fetch(self, view: OnlineView, keys: Sequence[str]) -> list[tuple[int, int, str] | None]:
        """Stored ``(event_us, created_us, values_json)`` per encoded key, from the current generation."""

    def read(
        self, view: OnlineView, keys: Sequence[Sequence[Any]], features: Sequence[str], now: datetime
    ) -> list[dict[str, FeatureValue]]:
        """The requested features of each key (a tuple of join key values in ``view.join_keys``
        order), in order, as seen at ``now`` (see the module doc for the time rule).

        Raises:
            OnlineStoreUnavailable: the store did not answer within its timeout.
        """
        found = self._fetch(view, [encode_key(k) for k in keys])
        cutoff = _cutoff(view, now)
        return [_evaluate(stored, features, cutoff) for stored in found]

    def read_one(self, view: OnlineView, key: Sequence[Any], features: Sequence[str], now: datetime) -> dict[str, FeatureValue]:
        """``read`` for a single key: the serving fast path (one query / one round trip)."""
        (stored,) = self._fetch(view, [encode_key(key)])
        return _evaluate(stored, features, _cutoff(view, now))

    def close(self) -> None:
        """Release connections; the store reopens them if used again."""


# ------------------------------------------------------------------------------ encoding


def encode_key(values: Sequence[Any]) -> str:
    """The stored form of a key: a compact JSON list, so ``1`` and ``"1"`` stay distinct.

        >>> encode_key((42, "m-7"))
        '[42,"m-7"]'

    numpy scalars become Python ones; integral floats (pandas turns an int column holding a
    null into floats) become ints.

    Raises:
        DataError: a key value is null, a bool, or not an int or string.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        values = (values,)
    out = []
    for v in values:
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):
            v = v.item()
        if isinstance(v, bool) or v is None:
            raise DataError(f"join key values must be ints or strings, got {v!r}")
        if isinstance(v, float):
            if not v.is_integer():
                raise DataError(f"join key values must be ints or strings, got {v!r}")
            v = int(v)
        elif not isinstance(v, (int, str)):
            raise DataError(f"join key values must be ints or strings, got {type(v).__name__} {v!r}")
        out.append(v)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def to_micros(value: datetime) -> int:
    """µs since the epoch of an aware datetime (naive is UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _plain(value: Any, as_float: bool = False) -> Any:
    """A JSON-able feature value: numpy scalars unwrapped, NaN as null, datetimes tagged, and
    ints as floats for float64 features (so ``3`` reads back as ``3.0`` either way)."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)) and not isinstance(value, datetime):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if as_float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, datetime):
        return {"$ts": to_micros(value)}
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        return {"$ts": to_micros(value.to_pydatetime())}
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise DataError(f"feature values must be int, float, string, bool, timestamp or null, got {type(value).__name__} {value!r}")
    return value


def _unplain(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$ts" in obj:
        return from_micros(obj["$ts"])
    return obj


def _decode_values(text: str) -> dict[str, Any]:
    if "$ts" in text:
        return json.loads(text, object_hook=_unplain)
    return json.loads(text)


def encode_rows(view: OnlineView, rows: pa.Table | Iterable[Mapping[str, Any]]) -> list[EncodedRow]:
    """Encode rows for a store: a pyarrow Table, pandas DataFrame or iterable of mappings with
    the view's join keys, ``event_timestamp`` (aware or naive-UTC datetime), an optional
    ``created_timestamp`` (missing or null = the event time) and the view's features (a missing
    feature column is stored as null; other columns are ignored).

    Raises:
        DataError: a join key or ``event_timestamp`` column is missing, or a value is unusable.
    """
    import pandas as pd
    import pyarrow as pa

    from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP

    keys = list(view.join_keys)
    features = [f.name for f in view.features]
    if isinstance(rows, pd.DataFrame):
        rows = _arrow_from_pandas(rows)
    floats = {f.name for f in view.features if f.dtype == "float64"}
    if isinstance(rows, pa.Table):
        return _encode_table(rows, keys, features, floats, view.name)
    out = []
    for row in rows:
        missing = [c for c in (*keys, EVENT_TIMESTAMP) if c not in row]
        if missing:
            raise DataError(f"rows for view {view.name!r} lack column(s) {missing}; a row has {sorted(row)}")
        event = row[EVENT_TIMESTAMP]
        created = row.get(CREATED_TIMESTAMP)
        if event is None:
            raise DataError(f"rows for view {view.name!r}: event_timestamp must not be null")
        event_us = to_micros(pd.Timestamp(event).to_pydatetime())
        created_us = event_us if created is None else to_micros(pd.Timestamp(created).to_pydatetime())
        values = {f: _plain(row.get(f), f in floats) for f in features}
        out.append(
            EncodedRow(encode_key([row[k] for k in keys]), event_us, created_us, json.dumps(values, separators=(",", ":")))
        )
    return out


def _arrow_from_pandas(frame: Any) -> pa.Table:
    """pandas → Arrow; the timestamp columns through ``to_utc`` (they may mix naive and aware)."""
    import pyarrow as pa

    from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP, to_utc

    stamps = {c: to_utc(frame[c]) for c in (EVENT_TIMESTAMP, CREATED_TIMESTAMP) if c in frame.columns}
    rest = frame.drop(columns=list(stamps))
    table = pa.Table.from_pandas(rest, preserve_index=False) if len(rest.columns) else pa.table({})
    if not len(rest.columns):
        return pa.table(stamps)
    for name, column in stamps.items():
        table = table.append_column(name, column)
    return table


def _encode_table(
    table: pa.Table, keys: list[str], features: list[str], floats: set[str], view: str
) -> list[EncodedRow]:
    import pyarrow as pa
    import pyarrow.compute as pc

    from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP, to_utc

    missing = [c for c in (*keys, EVENT_TIMESTAMP) if c not in table.column_names]
    if missing:
        raise DataError(f"rows for view {view!r} lack column(s) {missing}; they have {table.column_names}")
    if table.num_rows == 0:
        return []
    event = to_utc(table.column(EVENT_TIMESTAMP))
    if event.null_count:
        raise DataError(f"rows for view {view!r}: event_timestamp must not be null")
    event_us = pc.cast(event, pa.int64()).to_numpy(zero_copy_only=False).tolist()
    if CREATED_TIMESTAMP in table.column_names:
        created = pc.coalesce(to_utc(table.column(CREATED_TIMESTAMP)), event)
        created_us = pc.cast(created, pa.int64()).to_numpy(zero_copy_only=False).tolist()
    else:
        created_us = event_us
    encoded_keys = _encode_key_columns([table.column(k) for k in keys])
    columns = [_feature_column(table, f, f in floats) for f in features]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    return [
        EncodedRow(key, e, c, dumps(dict(zip(features, values))))
        for key, e, c, values in zip(encoded_keys, event_us, created_us, zip(*columns))
    ]


def _encode_key_columns(columns: list[Any]) -> list[str]:
    """``encode_key`` of every row, vectorised for the usual int and string key columns."""
    import pyarrow as pa

    plain = all(
        c.null_count == 0 and (pa.types.is_integer(c.type) or pa.types.is_string(c.type) or pa.types.is_large_string(c.type))
        for c in columns
    )
    if not plain:
        return [encode_key(k) for k in zip(*(c.to_pylist() for c in columns))]
    if len(columns) == 1 and pa.types.is_integer(columns[0].type):
        return [f"[{v}]" for v in columns[0].to_pylist()]
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    return [dumps(list(k)) for k in zip(*(c.to_pylist() for c in columns))]


def _feature_column(table: pa.Table, name: str, as_float: bool) -> list[Any]:
    """One feature column as JSON-able Python values (see ``_plain``), vectorised by type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mlplatform.timestamps import to_utc

    if name not in table.column_names:
        return [None] * table.num_rows
    column = table.column(name)
    typ = column.type
    if pa.types.is_floating(typ) or (as_float and pa.types.is_integer(typ)):
        column = column.cast(pa.float64())
        return pc.if_else(pc.is_nan(column), pa.scalar(None, pa.float64()), column).to_pylist()
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return column.to_pylist()
    if pa.types.is_timestamp(typ):
        micros = pc.cast(to_utc(column), pa.int64()).to_pylist()
        return [None if v is None else {"$ts": v} for v in micros]
    return [_plain(v, as_float) for v in column.to_pylist()]


# ------------------------------------------------------------------------------- reading


def _cutoff(view: OnlineView, now: datetime) -> tuple[int, int | None]:
    now_us = to_micros(now)
    return now_us, (None if view.ttl is None else now_us - view.ttl // timedelta(microseconds=1))


_MISSING = (None, FeatureStatus.NOT_FOUND, None)


def _evaluate(stored: tuple[int, int, str] | None, features: Sequence[str], cutoff: tuple[int, int | None]) -> dict[str, FeatureValue]:
    if stored is None:
        return {f: FeatureValue(*_MISSING) for f in features}
    event_us, _created_us, text = stored
    now_us, oldest_us = cutoff
    if event_us > now_us:
        return {f: FeatureValue(*_MISSING) for f in features}
    event = from_micros(event_us)
    if oldest_us is not None and event_us < oldest_us:
        return {f: FeatureValue(None, FeatureStatus.OUTSIDE_MAX_AGE, event) for f in features}
    values = _decode_values(text)
    return {
        f: FeatureValue(values[f], FeatureStatus.PRESENT, event) if f in values else FeatureValue(*_MISSING)
        for f in features
    }


def unknown_generation(view: str, generation: str | None, kept: Sequence[Generation]) -> Exception:
    """The ``NotFoundError`` a rollback raises: no such kept generation, or none to go back to."""
    from mlplatform.errors import NotFoundError

    listed = ", ".join(f"{g.generation} ({g.state})" for g in kept) or "none"
    if generation is None:
        return NotFoundError(
            f"view {view!r} has no kept generation older than the current one to roll back to; "
            f"kept generations: {listed} (keep more with online_store.keep_generations)"
        )
    return NotFoundError(
        f"view {view!r} has no kept generation {generation!r}; kept generations: {listed} "
        "(see platform.features.generations(view))"
    )


def name_of(view: OnlineView | str) -> str:
    """A view's name, given the view or its name."""
    return view if isinstance(view, str) else view.name
