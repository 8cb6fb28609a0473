"""Ingest: events of a stream source, checked, onto the event bus.

    result = platform.features.ingest("checkouts", [
        {"event_id": "c-1", "applicant_id": 42, "amount": 120.0, "checkout_ts": datetime.now(UTC)},
    ])
    print(result)   # ingested 1 event into 'checkouts' (positions 17-17, known 2024-03-01T12:00:00.123Z)

This module owns the shape of an event on the bus (a *payload*): ``to_payloads`` checks rows
against their ``StreamSource`` and writes payloads, ``events_table`` reads delivered messages
back into the offline log's columns (``event_log.event_schema``) for the stream processors.
A payload is a JSON object: the event id, every schema field (null when not given) and the
event time; timestamps are ISO 8601 text in UTC with microseconds. The time the bus accepted
the event and its stream position travel beside the payload (``mlplatform.streams.Message``),
stamped by the bus, never by the sender.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError
from mlplatform.features.definitions import StreamSource
from mlplatform.features.values import check_value, check_values

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.config import FeaturesConfig
    from mlplatform.streams import EventBus, Message

__all__ = ["MAX_EVENT_ID_LENGTH", "IngestResult", "events_table", "ingest", "read_rows", "to_payloads"]

log = logging.getLogger(__name__)

#: An event id is a non-empty string of at most this many characters.
MAX_EVENT_ID_LENGTH = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class IngestResult:
    """What the bus accepted: how many events, the first and last stream positions, and when
    the bus accepted the first and the last (UTC; None for an empty batch)."""

    source: str
    count: int
    first_position: int | None = None
    last_position: int | None = None
    first_known_at: datetime | None = None
    last_known_at: datetime | None = None

    def __str__(self) -> str:
        noun = "event" if self.count == 1 else "events"
        if not self.count:
            return f"ingested 0 events into {self.source!r}"
        known = self.last_known_at.isoformat(timespec="milliseconds") if self.last_known_at else "?"
        return (
            f"ingested {self.count} {noun} into {self.source!r} "
            f"(positions {self.first_position}-{self.last_position}, known {known})"
        )


def ingest(
    source: StreamSource,
    rows: Any,
    *,
    bus: EventBus,
    config: FeaturesConfig,
    required: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> IngestResult:
    """Check every event of ``rows`` against ``source``, then append them all to the bus.

        ingest(source, [{"event_id": "c-1", "applicant_id": 42, "checkout_ts": now, ...}], bus=bus, config=cfg)

    Rows are a list of dicts, a pandas DataFrame or an Arrow table. Each event must have:

    - the event id (``source.event_id_field``): a non-empty string of at most 256 characters,
      unique per event; copies of one id count once (the copy the bus accepted first);
    - the event time (``source.timestamp_field``): timezone-aware or naive (= UTC), between
      the years 1 and 9999, not before ``features.min_event_time`` and not after the server
      clock plus ``features.max_future_skew``;
    - schema fields of their declared dtype (``mlplatform.features.values``); a missing field is
      null, except those in ``required`` (the join keys of the source's real-time views);
    - nothing else: an unknown field (``created_timestamp`` included: the bus stamps it) is
      refused.

    A bad batch raises before anything is appended, so nothing of it reaches the bus.
    Accepted means durable as the bus promises (``mlplatform.streams``); an event accepted more
    than ``source.allowed_lateness`` after its event time is kept offline but counted nowhere.

    Args:
        required: fields that must not be null, with why (for the message).
        now: the server clock (default: now), for the future bound.

    Returns:
        An ``IngestResult``.

    Raises:
        DataError: naming the row and the field of the first bad value; nothing was appended.
        EventBusUnavailable: the bus did not confirm; the events may or may not be accepted,
            and ingesting them again is safe (copies of an id count once).
    """
    payloads = to_payloads(source, rows, config=config, required=required, now=now)
    if not payloads:
        return IngestResult(source.name, 0)
    accepted = bus.append(source.name, payloads)
    first, last = accepted[0], accepted[-1]
    log.debug("ingested %d events into %r at positions %d-%d", len(accepted), source.name, first.position, last.position)
    return IngestResult(
        source.name,
        len(accepted),
        first.position,
        last.position,
        _EPOCH + first.known_us * _US,
        _EPOCH + last.known_us * _US,
    )


def to_payloads(
    source: StreamSource,
    rows: Any,
    *,
    config: FeaturesConfig,
    required: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """``rows`` checked against ``source`` (see ``ingest``) as bus payloads.

    Raises:
        DataError: naming the row and the field of the first bad value.
    """
    where = f"ingest into stream source {source.name!r}:"
    records = _records(rows, where)
    if not records:
        return []
    required = dict(required or {})
    id_field, time_field = source.event_id_field, source.timestamp_field
    allowed = [id_field, *(f.name for f in source.schema_), time_field]
    known = set(allowed)
    now = now or datetime.now(UTC)
    latest = now + config.max_future_skew
    ids, times = [], []
    for i, record in enumerate(records):
        unknown = [str(k) for k in record if k not in known]
        if unknown:
            hint = " (the bus stamps created_timestamp)" if "created_timestamp" in unknown else ""
            raise DataError(f"{where} row {i} has unknown field(s) {sorted(unknown)}{hint}; the source has {allowed}")
        ids.append(_event_id(record.get(id_field), i, id_field, where))
        times.append(_event_time(record.get(time_field), i, time_field, where, latest=latest, floor=config.min_event_time, now=now))
    columns = {}
    for field in source.schema_:
        columns[field.name] = check_values(
            field.name, [r.get(field.name) for r in records], field.dtype, where=f"{where} field"
        )
        if field.name in required:
            missing = next((i for i, v in enumerate(columns[field.name]) if v is None), None)
            if missing is not None:
                raise DataError(f"{where} row {missing} field {field.name!r} must not be null: {required[field.name]}")
    payloads = []
    for i in range(len(records)):
        payload: dict[str, Any] = {id_field: ids[i]}
        for name, values in columns.items():
            payload[name] = _json_value(values[i])
        payload[time_field] = _iso(times[i])
        payloads.append(payload)
    return payloads


def events_table(source: StreamSource, messages: Sequence[Message]) -> tuple[pa.Table, list[tuple[Message, str]]]:
    """Delivered messages as the offline log's table (``event_log.event_schema``): the payload's
    columns plus ``created_timestamp`` (when the bus accepted it) and ``stream_position``.

    Returns:
        The table of the messages that fit ``source``, and the others with why (a payload
        written under an older schema, or not by ``ingest``): those cannot be applied.
    """
    import pyarrow as pa

    from mlplatform.features.event_log import ARRIVAL, event_schema
    from mlplatform.timestamps import CREATED_TIMESTAMP

    schema = event_schema(source)
    fields = [f for f in source.schema_ if f.name in schema.names]
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    rejected: list[tuple[Message, str]] = []
    for message in messages:
        try:
            row = _decode(source, fields, message.payload)
        except (ValueError, TypeError, KeyError) as exc:
            rejected.append((message, str(exc)))
            continue
        row[CREATED_TIMESTAMP] = message.known_us
        row[ARRIVAL] = message.position
        for name in schema.names:
            columns[name].append(row[name])
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema), rejected


def _decode(source: StreamSource, fields: Sequence[Any], payload: Mapping[str, Any]) -> dict[str, Any]:
    event_id = payload[source.event_id_field]
    if not isinstance(event_id, str) or not event_id:
        raise ValueError(f"event id {event_id!r} is not a non-empty string")
    row: dict[str, Any] = {source.event_id_field: event_id}
    for field in fields:
        value = check_value(payload.get(field.name), field.dtype)
        row[field.name] = _micros(value) if isinstance(value, datetime) else value
    event_time = check_value(payload[source.timestamp_field], "timestamp")
    if event_time is None:
        raise ValueError("no event time")
    row[source.timestamp_field] = _micros(event_time)
    return row


def read_rows(path: str | os.PathLike[str]) -> pa.Table | list[dict[str, Any]]:
    """Events from a file, for ``ingest``: Parquet (``.parquet``, ``.pq``) as a table, JSON lines
    (``.jsonl``, ``.ndjson``, ``.json``: one JSON object per line) as dicts.

    Raises:
        DataError: the file is missing, of another kind, or not what its name says.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    suffix = Path(name).suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(name)
        if suffix in (".jsonl", ".ndjson", ".json"):
            rows = []
            with open(name, encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise DataError(f"{name}: line {number} is not JSON: {exc}") from None
            return rows
    except OSError as exc:
        raise DataError(f"cannot read events from {name!r}: {exc}") from None
    except pa.ArrowException as exc:
        raise DataError(f"{name}: not a readable Parquet file: {exc}") from None
    raise DataError(f"cannot tell the format of {name!r}: name it .parquet or .jsonl (JSON lines)")


def _records(rows: Any, where: str) -> list[Mapping[str, Any]]:
    import pandas as pd
    import pyarrow as pa

    if isinstance(rows, pa.Table):
        return rows.to_pylist()
    if isinstance(rows, pd.DataFrame):
        return rows.to_dict("records")
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise DataError(f"{where} rows must be a list of dicts, a pandas DataFrame or an Arrow table, got {type(rows).__name__}")
    records = list(rows)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"{where} row {i} is a {type(record).__name__}, not a dict of fields")
    return records


def _event_id(value: Any, row: int, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = "missing" if value is None else f"{value!r} ({type(value).__name__})"
        raise DataError(f"{where} row {row} field {field!r} (the event id) must be a non-empty string, got {shown}")
    if len(value) > MAX_EVENT_ID_LENGTH:
        raise DataError(f"{where} row {row} field {field!r} (the event id) is {len(value)} characters; at most {MAX_EVENT_ID_LENGTH}")
    return value


def _event_time(value: Any, row: int, field: str, where: str, *, latest: datetime, floor: datetime, now: datetime) -> datetime:
    try:
        checked = check_value(value, "timestamp")
    except ValueError as exc:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DataError(f"{where} row {row} field {field!r} (the event time) must be a timestamp, got {shown}: {exc}") from None
    if checked is None:
        raise DataError(f"{where} row {row} field {field!r} (the event time) is missing")
    if checked > latest:
        raise DataError(
            f"{where} row {row} field {field!r} (the event time) {checked.isoformat()} is in the future: more than "
            f"{latest - now} after the server clock ({now.isoformat()}); send events as they happen "
            "(features.max_future_skew bounds clock skew)"
        )
    if checked < floor:
        raise DataError(
            f"{where} row {row} field {field!r} (the event time) {checked.isoformat()} is before "
            f"features.min_event_time ({floor.isoformat()}); check the timestamp's unit and time zone"
        )
    return checked


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _json_value(value: Any) -> Any:
    return _iso(value) if isinstance(value, datetime) else value


def _micros(value: datetime) -> int:
    return (value - _EPOCH) // _US
