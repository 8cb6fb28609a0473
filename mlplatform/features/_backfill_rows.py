"""What a backfill computes: the plan of a range and the Ray Data pipeline that makes its rows.

:class:`Plan` turns a feature view and a range ``(start, end]`` into everything the tasks need
(which source columns and event times to read, the output schema, the date partitions the
rows fall in). :func:`compute_rows` chains the tasks onto the source read: normalise and
filter the events, then either run the window kernel
(:func:`mlplatform.features._windows.window_aggregate`) on one hash bucket of whole entities
at a time, or copy a plain view's columns. Running the job, sorting and publishing the rows
is :mod:`mlplatform.features.backfill`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError, DefinitionError
from mlplatform.features._windows import boundary_indices, event_time_range, window_aggregate
from mlplatform.features.definitions import FeatureView
from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP, UTC_MICROS, to_utc

if TYPE_CHECKING:
    import ray.data

__all__ = ["PARTITION", "Plan", "compute_rows"]

#: The partition column of offline datasets: the UTC date of ``event_timestamp``, "YYYY-MM-DD".
PARTITION = "date"
_BUCKET = "__bucket"
_DAY = timedelta(days=1)
_US = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DTYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_(), "timestamp": UTC_MICROS}


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Plan:
    """Everything a task needs, picklable: which columns, which times, which output."""

    view: FeatureView
    start: datetime
    end: datetime
    read_after: datetime  # events with read_after < event time <= read_until matter
    read_until: datetime
    read_columns: tuple[str, ...]
    output: pa.Schema  # including the partition column
    dates: tuple[str, ...]  # every date partition the range touches
    partial_dates: tuple[str, ...]  # those of them with instants outside the range

    @classmethod
    def make(cls, view: FeatureView, schema: pa.Schema | None, start: datetime, end: datetime) -> Plan:
        source = view.source
        keys = list(view.join_keys)
        if view.aggregations:
            value_columns = list(dict.fromkeys(a.column for a in view.aggregations if a.column is not None))
        else:
            value_columns = [f.name for f in view.schema_]
        times = [source.timestamp_field, *([source.created_timestamp_field] if source.created_timestamp_field else [])]
        read_columns = list(dict.fromkeys([*keys, *times, *value_columns]))
        if schema is not None:
            missing = [c for c in read_columns if c not in schema.names]
            if missing:
                raise DataError(
                    f"view {view.name!r} needs column {missing[0]!r}"
                    + (f" (also {missing[1:]})" if len(missing) > 1 else "")
                    + f", which source dataset {source.dataset!r} lacks; it has {schema.names}"
                )
        clash = {PARTITION, EVENT_TIMESTAMP, CREATED_TIMESTAMP} & {*keys, *(f.name for f in view.features)}
        if clash:
            raise DefinitionError(
                f"view {view.name!r}: {sorted(clash)} are the offline store's own columns; rename those keys or features"
            )

        fields = []
        for k in keys:
            typ = schema.field(k).type if schema is not None else pa.int64()
            fields.append(pa.field(k, typ.value_type if pa.types.is_dictionary(typ) else typ))
        fields += [pa.field(EVENT_TIMESTAMP, UTC_MICROS), pa.field(CREATED_TIMESTAMP, UTC_MICROS)]
        fields += [pa.field(f.name, _DTYPES[f.dtype]) for f in view.features]
        fields.append(pa.field(PARTITION, pa.string()))

        if view.aggregations:
            read_after, read_until = event_time_range(view.aggregations, view.cadence, start, end)
            k0, k_last = boundary_indices(start, end, view.cadence)
            first = _EPOCH + (k0 + 1) * view.cadence
            last = _EPOCH + k_last * view.cadence
            step = max(view.cadence, _DAY)  # boundaries fall on every day, or every cadence
            grain = min(view.cadence, _DAY)  # the spacing of instants within a day
        else:
            read_after, read_until = start, end
            first, last, step, grain = start + _US, end, _DAY, _US
        dates: list[str] = []
        partial: list[str] = []
        if first <= last:
            day = first.replace(hour=0, minute=0, second=0, microsecond=0)
            while day <= last:
                dates.append(f"{day:%Y-%m-%d}")
                if not (day > start and day + _DAY - grain <= end):
                    partial.append(dates[-1])
                day += step
        return cls(
            view=view,
            start=start,
            end=end,
            read_after=read_after,
            read_until=read_until,
            read_columns=tuple(read_columns),
            output=pa.schema(fields),
            dates=tuple(dates),
            partial_dates=tuple(partial),
        )


# ---------------------------------------------------------------------------------- pipeline
def compute_rows(ds: ray.data.Dataset, plan: Plan, *, buckets: int, counter: Any) -> ray.data.Dataset:
    """The offline rows of ``plan``'s range from its source events, as a lazy Ray Data pipeline.

    Args:
        ds: the source dataset, read with ``plan.read_columns``.
        plan: the range's plan.
        buckets: hash buckets of entities the window kernel runs in (unused for a plain view).
        counter: a handle to an actor whose ``add(rows_in=, rows_out=, kernel_seconds=)``
            every task calls.

    Returns:
        The rows, in no particular order, with the ``date`` partition column, cast to ``plan.output``.
    """
    view = plan.view
    hashed = buckets if view.aggregations else 0
    ds = ds.map_batches(
        _prepare, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan, "buckets": hashed, "counter": counter}
    )
    if view.aggregations:
        return ds.groupby(_BUCKET).map_groups(
            _aggregate_bucket, batch_format="pyarrow", fn_kwargs={"plan": plan, "counter": counter}
        )
    return ds.map_batches(_copy_rows, batch_format="pyarrow", batch_size=None, fn_kwargs={"plan": plan, "counter": counter})


# ------------------------------------------------------------------------------ Ray tasks
def _prepare(batch: pa.Table, *, plan: Plan, buckets: int, counter: Any) -> pa.Table:
    """Timestamps to UTC microseconds, rows outside the time range or with null keys dropped,
    and (with ``buckets``) the entity's hash bucket added."""
    import ray

    source = plan.view.source
    event = to_utc(batch.column(source.timestamp_field))
    batch = batch.set_column(batch.schema.get_field_index(source.timestamp_field), source.timestamp_field, event)
    if source.created_timestamp_field:
        i = batch.schema.get_field_index(source.created_timestamp_field)
        batch = batch.set_column(i, source.created_timestamp_field, to_utc(batch.column(i)))
    lo = pa.scalar(plan.read_after, UTC_MICROS)
    hi = pa.scalar(plan.read_until, UTC_MICROS)
    keep = pc.and_(pc.greater(event, lo), pc.less_equal(event, hi))
    for k in plan.view.join_keys:
        keep = pc.and_(keep, pc.is_valid(batch.column(k)))
    batch = batch.filter(pc.fill_null(keep, False))
    ray.get(counter.add.remote(rows_in=batch.num_rows))
    if not buckets:
        return batch
    return batch.append_column(_BUCKET, pa.array(_bucket_of(batch, plan.view.join_keys, buckets)))


def _bucket_of(batch: pa.Table, keys: Sequence[str], buckets: int) -> np.ndarray:
    """A stable hash bucket per row from its join key values (the same in every process)."""
    if batch.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    frame = pd.DataFrame({k: _decoded(batch.column(k)).to_pandas() for k in keys})
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return (hashed % np.uint64(buckets)).astype(np.int64)


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _aggregate_bucket(batch: pa.Table, *, plan: Plan, counter: Any) -> pa.Table:
    import ray

    view = plan.view
    began = time.process_time()
    rows = window_aggregate(
        batch.drop_columns([_BUCKET]),
        join_keys=view.join_keys,
        event_ts=view.source.timestamp_field,
        created_ts=view.source.created_timestamp_field,
        aggregations=view.aggregations,
        cadence=view.cadence,
        availability_delay=view.availability_delay,
        start=plan.start,
        end=plan.end,
    )
    ray.get(counter.add.remote(rows_out=rows.num_rows, kernel_seconds=time.process_time() - began))
    return _with_partition(rows, plan)


def _copy_rows(batch: pa.Table, *, plan: Plan, counter: Any) -> pa.Table:
    """A plain view's rows: the source columns under the offline store's names and types."""
    import ray

    view, source = plan.view, plan.view.source
    event = batch.column(source.timestamp_field)  # UTC microseconds, in (start, end]: see _prepare
    created = batch.column(source.created_timestamp_field) if source.created_timestamp_field else event
    columns: dict[str, Any] = {k: _decoded(batch.column(k)) for k in view.join_keys}
    columns[EVENT_TIMESTAMP] = event
    columns[CREATED_TIMESTAMP] = pc.coalesce(created, event)
    for f in view.schema_:
        column = _decoded(batch.column(f.name))
        try:
            columns[f.name] = to_utc(column) if f.dtype == "timestamp" else column.cast(_DTYPES[f.dtype])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, DataError) as exc:
            raise DataError(
                f"view {view.name!r}: source column {f.name!r} ({column.type}) cannot be read as {f.dtype}: {exc}"
            ) from None
    rows = pa.table(columns)
    ray.get(counter.add.remote(rows_out=rows.num_rows))
    return _with_partition(rows, plan)


def _with_partition(rows: pa.Table, plan: Plan) -> pa.Table:
    day = pc.cast(pc.cast(rows.column(EVENT_TIMESTAMP), pa.date32()), pa.string())
    return rows.append_column(PARTITION, day).cast(plan.output)
