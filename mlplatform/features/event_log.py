"""The offline log of a stream source's events: what backfills and training sets read.

    append_events(storage, source, table)     # a processor, after applying a batch online
    read_events(storage, source)              # every logged event, as one Arrow table

Every event the stream processors apply online is appended here, with the id, times and
stream position it was applied with (``event_schema``), as one Parquet part per flushed
batch under ``source.dataset``. A part is written atomically (complete or absent), so a
reader never sees a partial batch. The log is append-only and may hold copies of an event (a
processor killed after writing a part but before acknowledging the batch writes it again after
the redelivery); :func:`mlplatform.features.realtime.usable` keeps the first copy of each id,
offline as online, so copies never count twice.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from mlplatform.errors import DataError
from mlplatform.features.definitions import StreamSource
from mlplatform.timestamps import CREATED_TIMESTAMP, UTC_MICROS, to_utc

if TYPE_CHECKING:
    from mlplatform.storage import Storage

__all__ = ["ARRIVAL", "append_events", "event_schema", "read_events"]

#: The stream position column: orders copies of an event accepted in the same microsecond.
ARRIVAL = "stream_position"

_ARROW = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_(), "timestamp": UTC_MICROS}


def event_schema(source: StreamSource) -> pa.Schema:
    """The logged events' columns: the event id, the payload fields, the event time,
    ``created_timestamp`` (when the bus accepted it) and ``stream_position``."""
    fields = [pa.field(source.event_id_field, pa.string(), nullable=False)]
    fields += [pa.field(f.name, _ARROW[f.dtype]) for f in source.schema_ if f.dtype in _ARROW]
    fields += [
        pa.field(source.timestamp_field, UTC_MICROS, nullable=False),
        pa.field(CREATED_TIMESTAMP, UTC_MICROS, nullable=False),
        pa.field(ARRIVAL, pa.int64(), nullable=False),
    ]
    return pa.schema(fields)


def _conform(source: StreamSource, table: pa.Table) -> pa.Table:
    schema = event_schema(source)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise DataError(f"events of stream source {source.name!r} lack columns {missing}; they have {table.column_names}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        columns.append(to_utc(column) if field.type == UTC_MICROS else column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def append_events(storage: Storage, source: StreamSource, table: pa.Table) -> str | None:
    """Log ``table``'s events (columns as ``event_schema``) as one new part; returns its key
    (None for an empty table)."""
    if table.num_rows == 0:
        return None
    table = _conform(source, table)
    positions = table.column(ARRIVAL)
    first, last = pa.compute.min(positions).as_py(), pa.compute.max(positions).as_py()
    key = f"{source.dataset}/part-{first:020d}-{last:020d}-{uuid.uuid4().hex[:8]}.parquet"
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(key, buffer.getvalue())
    return key


def read_events(storage: Storage, source: StreamSource, columns: Sequence[str] | None = None) -> pa.Table:
    """Every logged event of ``source`` (copies included), as one table with ``event_schema``
    (or just ``columns`` of it); an empty table if nothing was logged yet."""
    schema = event_schema(source)
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise DataError(f"stream source {source.name!r} logs no columns {unknown}; it logs {schema.names}")
        schema = pa.schema([schema.field(c) for c in columns])
    keys = [k for k in storage.walk_files(source.dataset) if k.endswith(".parquet") and "/part-" in k]
    if not keys:
        return schema.empty_table()
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(k)), columns=schema.names) for k in keys]
    return pa.concat_tables([t.cast(schema) for t in tables])
