"""The platform's one time type, and the conversion every timestamp goes through.

    to_utc(frame["application_ts"])          # a column -> timestamp[us, tz=UTC]
    parse_instant("2024-01-01", "start")     # one value -> datetime(2024, 1, 1, tzinfo=UTC)

``UTC_MICROS`` (``timestamp[us, tz=UTC]``) is the type of every timestamp the platform
stores or compares; ``to_utc`` brings Arrow, pandas, numpy or Python values to it (naive
values are UTC), ``micros_and_valid`` gives the int64 microseconds the kernels compute on, and
``parse_instant`` reads one point in time (a range bound given by a user). Used by the as-of
join, the window kernel, backfills, materialization, push and the online store.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError

__all__ = ["CREATED_TIMESTAMP", "EVENT_TIMESTAMP", "UTC_MICROS", "micros_and_valid", "parse_instant", "to_utc"]

#: The platform's canonical timestamp type: microseconds since the epoch, tz-aware UTC.
UTC_MICROS = pa.timestamp("us", tz="UTC")

#: The two times every feature row carries, offline and online: when the value was observed
#: (usable for an event at ``t`` only if ``<= t``) and when the platform learnt it (``<= t`` too
#: in as-known-at mode).
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created_timestamp"


def to_utc(values: Any) -> pa.Array | pa.ChunkedArray:
    """Normalise timestamps to ``timestamp[us, tz=UTC]``, the platform's one time type.

        >>> to_utc(pd.Series(["2024-01-01 12:00", None], dtype="datetime64[ns]")).type
        TimestampType(timestamp[us, tz=UTC])

    Naive values are taken to be UTC; aware values in any zone are converted to UTC (the
    instant is kept). A pandas ``object`` column may mix naive ``datetime``, aware
    ``datetime``/``Timestamp`` and missing values. Sub-microsecond parts are truncated.
    Integers are taken to be microseconds since the epoch.

    Args:
        values: a pyarrow Array/ChunkedArray, pandas Series/Index, numpy array or list.

    Returns:
        A pyarrow Array (ChunkedArray if given one) of type ``timestamp[us, tz=UTC]``; nulls
        stay null.

    Raises:
        DataError: the values are not timestamps and cannot be parsed as such.
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        typ = values.type
        if pa.types.is_dictionary(typ):
            return to_utc(values.cast(typ.value_type))
        if pa.types.is_timestamp(typ):
            if typ == UTC_MICROS:
                return values
            # Arrow stores aware timestamps as UTC instants and we read naive ones as UTC, so
            # only the unit and the label change: a reinterpreting cast is exact.
            as_us = values.cast(pa.timestamp("us", tz=typ.tz), safe=False)
            return as_us.cast(pa.int64()).cast(UTC_MICROS)
        if pa.types.is_integer(typ):
            return values.cast(pa.int64()).cast(UTC_MICROS)
        if pa.types.is_date(typ) or pa.types.is_null(typ):
            return values.cast(pa.timestamp("us")).cast(pa.int64()).cast(UTC_MICROS)
        return _from_pandas(pd.Series(values.to_pandas()), chunked=isinstance(values, pa.ChunkedArray))
    if isinstance(values, (pd.Series, pd.Index)):
        return _from_pandas(pd.Series(values), chunked=False)
    try:
        inferred = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        inferred = None
    if inferred is not None and (pa.types.is_integer(inferred.type) or pa.types.is_timestamp(inferred.type)):
        return to_utc(inferred)
    return _from_pandas(pd.Series(values), chunked=False)


def _from_pandas(series: pd.Series, *, chunked: bool) -> pa.Array | pa.ChunkedArray:
    if pd.api.types.is_integer_dtype(series.dtype):
        arr = pa.array(series, type=pa.int64()).cast(UTC_MICROS)
    else:
        try:
            # utc=True localises naive values as UTC and converts aware ones, also when an
            # object column mixes the two (which pandas otherwise refuses).
            converted = pd.to_datetime(series, utc=True, format="ISO8601")
        except (ValueError, TypeError) as exc:
            sample = series.dropna().head(3).tolist()
            raise DataError(
                f"cannot read timestamps from values like {sample!r} (dtype {series.dtype}): {exc}; "
                "pass datetimes, pandas Timestamps or ISO-8601 strings"
            ) from exc
        arr = pa.array(converted.dt.as_unit("us"), type=UTC_MICROS)
    return pa.chunked_array([arr]) if chunked else arr


def micros_and_valid(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps (any of ``to_utc``'s inputs) as UTC microseconds since the epoch, int64 with
    0 where null, and the validity mask: what the join and window kernels compute on."""
    ints = to_utc(column).cast(pa.int64())
    if ints.null_count:
        return pc.fill_null(ints, 0).to_numpy(), ints.is_valid().to_numpy(zero_copy_only=False)
    values = ints.to_numpy()
    return values, np.ones(values.size, dtype=bool)


#: Years a plain datetime is converted in directly (the nanosecond Timestamp's whole years).
_PANDAS_YEARS = (1678, 2261)


def parse_instant(value: Any, what: str) -> datetime:
    """One point in time as a UTC-aware datetime, truncated to microseconds.

        >>> parse_instant("2024-01-01", "backfill start")
        datetime.datetime(2024, 1, 1, 0, 0, tzinfo=datetime.timezone.utc)

    Args:
        value: a datetime, date (its midnight), pandas Timestamp or ISO string; naive = UTC.
        what: what the value is, for the error message (e.g. ``"backfill start"``).

    Raises:
        DataError: the value is not a point in time (None included).
    """
    if type(value) is datetime and _PANDAS_YEARS[0] <= value.year <= _PANDAS_YEARS[1]:
        # A plain datetime is already whole microseconds: converted without pandas (~25 us
        # less a call, which a served model's input builder pays per request). Far years take
        # the path below, so the edges of the calendar fail as they did.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{what} {value!r} is not a point in time: {exc}; pass e.g. '2024-01-01'") from None
    if stamp is pd.NaT or not isinstance(stamp, pd.Timestamp):
        raise DataError(f"{what} {value!r} is not a point in time; pass e.g. '2024-01-01'")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor("us").to_pydatetime()
