"""The decision record: its keys and types, its line in a spool segment, and its Arrow schema
in the compacted Parquet dataset ``decisions/log``.

    line = encode_line(validate_record(record))     # DataError names the bad key and value
    records, dropped = parse_lines(segment_bytes)   # the lines whose CRC matches

A segment holds one record per line: ``<crc32 of the JSON, 8 hex> <JSON>\\n``. A line whose
CRC does not match (the torn tail of a write cut short by a crash) is dropped: its record was
never acknowledged, because acknowledgement comes only after the whole write is fsynced.

Records: see ``validate_record`` for the keys and their types.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["DATASET", "encode_line", "parse_lines", "read_segments", "record_schema", "validate_record"]

#: The compacted decision log, a dataset under the storage root partitioned by UTC ``date``.
DATASET = "decisions/log"

# key -> (types allowed, nullable, JSON-encoded string whose decoded value must be of this type)
_STR, _JSON = (str,), (str,)
_FIELDS: dict[str, tuple[tuple[type, ...], bool, type | None]] = {
    "decision_id": (_STR, False, None),
    "application_id": (_STR, False, None),
    "request": (_JSON, False, object),
    "decision": (_STR, False, None),
    "probability_of_default": ((float, int), False, None),
    "reasons": (_JSON, False, object),
    "model_name": (_STR, False, None),
    "model_version": ((int,), True, None),
    "model_sha256": (_STR, False, None),
    "feature_names": (_JSON, False, list),
    "features": (_JSON, False, dict),
    "feature_event_timestamps": (_JSON, False, object),
    "fallback": ((bool,), False, None),
    "fallback_reason": (_STR, True, None),
    "latency_ms": ((float, int), False, None),
    "created_at": (_STR, False, None),
    "shadow": (_JSON, True, object),
    "rule_models": (_JSON, True, list),
    "offer": (_JSON, True, dict),
    "returned": ((bool,), False, None),
    "confirmed": ((bool,), False, None),
}
# Keys added after the first records were written: a record without them gets these values.
_DEFAULTS = {"returned": True, "confirmed": True, "rule_models": None, "offer": None}
# A fallback decision may have been made without a model, hence without a score.
_NULLABLE_IN_FALLBACK = {"probability_of_default", "model_name", "model_sha256"}


def record_schema() -> pa.Schema:
    import pyarrow as pa

    kinds = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64()}
    return pa.schema([pa.field(k, kinds[types[0]]) for k, (types, _, _) in _FIELDS.items()])


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Check a decision record and return it as a plain dict (ints in float fields as floats).

    Keys, all required but ``returned``, ``confirmed``, ``rule_models`` and ``offer`` (no others allowed): ``decision_id``, ``application_id``, ``decision``,
    ``model_name``, ``model_sha256`` (str); ``request``, ``reasons``,
    ``feature_event_timestamps`` (JSON text); ``feature_names`` (JSON list, the model's feature
    order); ``features`` (JSON object name -> value, null when missing); ``shadow`` (JSON text
    or None); ``rule_models`` (JSON list or None: per model the policy's rules consulted, its
    name, version, artifact sha256, flavor, score, input and status); ``offer`` (JSON object or
    None: an approved decision's offer — tier, action, propensity, allowed tiers, every tier's
    probability, policy and version, context, PD, the shadow policy's choice; see
    ``mlplatform.serving.offers``); ``probability_of_default``, ``latency_ms`` (finite float); ``model_version``
    (int or None); ``fallback`` (bool); ``fallback_reason`` (str or None); ``created_at`` (ISO
    8601 in UTC, e.g. ``2025-01-31T09:00:00.123456+00:00``); ``returned`` (bool: this decision
    is the answer given for its application — False on a second record of the same
    ``decision_id`` whose answer lost to another copy's); ``confirmed`` (bool: False when the
    idempotency store could not reserve the application, so the decision was made without
    knowing whether a copy had been decided elsewhere; both default to True when absent).
    When ``fallback`` is true, ``probability_of_default``, ``model_name`` and
    ``model_sha256`` may be None.

    Raises:
        DataError: a key is missing or unknown, or a value has the wrong type or is not valid
            JSON / UTC ISO time; the message names the key and the value.
    """
    # On the request path: the common case (a dict of exact types) takes the cheap checks.
    if type(record) is not dict and not isinstance(record, Mapping):
        raise DataError(f"a decision record must be a mapping, got {type(record).__name__}")
    if any(k not in record for k in _DEFAULTS):
        record = {**_DEFAULTS, **record}
    missing = [k for k in _FIELDS if k not in record]
    if missing:
        raise DataError(f"decision record {record.get('decision_id')!r} lacks keys {missing}")
    unknown = sorted(set(record) - set(_FIELDS)) if len(record) != len(_FIELDS) else None
    if unknown:
        raise DataError(f"decision record {record.get('decision_id')!r} has unknown keys {unknown}; allowed: {list(_FIELDS)}")
    out: dict[str, Any] = {}
    fallback = record["fallback"]
    for key, (types, nullable, decoded) in _FIELDS.items():
        value = record[key]
        if value is None:
            if nullable or (fallback is True and key in _NULLABLE_IN_FALLBACK):
                out[key] = None
                continue
            raise DataError(f"decision record {record['decision_id']!r}: {key} must not be None")
        kind = type(value)
        if kind not in types and (kind is bool or not isinstance(value, types)):
            raise DataError(
                f"decision record {record['decision_id']!r}: {key} must be {'/'.join(t.__name__ for t in types)}, "
                f"got {type(value).__name__} {value!r:.80}"
            )
        if float in types:
            value = float(value)
            if not math.isfinite(value):
                raise DataError(f"decision record {record['decision_id']!r}: {key} must be finite, got {value!r}")
        if decoded is not None:
            try:
                parsed = json.loads(value)
            except ValueError:
                raise DataError(f"decision record {record['decision_id']!r}: {key} is not valid JSON: {value!r:.80}") from None
            if not isinstance(parsed, decoded):
                raise DataError(f"decision record {record['decision_id']!r}: {key} must be a JSON {decoded.__name__}, got {value!r:.80}")
        out[key] = value
    if not out["decision_id"]:
        raise DataError("decision record has an empty decision_id")
    try:
        created = datetime.fromisoformat(out["created_at"])
    except ValueError:
        created = None
    if created is None or created.utcoffset() is None or created.utcoffset().total_seconds() != 0:
        raise DataError(
            f"decision record {out['decision_id']!r}: created_at must be ISO 8601 in UTC "
            f"(e.g. '2025-01-31T09:00:00+00:00'), got {out['created_at']!r}"
        )
    return out


# ---------------------------------------------------------------------- spool lines
def encode_line(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Records of the lines whose CRC matches, and how many lines were dropped."""
    records, dropped = [], 0
    for line in data.split(b"\n"):
        if not line:
            continue
        payload = line[9:]
        try:
            ok = len(line) > 9 and line[8:9] == b" " and int(line[:8], 16) == zlib.crc32(payload)
            record = json.loads(payload) if ok else None
        except ValueError:
            record = None
        if record is None:
            dropped += 1
        else:
            records.append(record)
    return records, dropped


def read_segments(paths: list[str]) -> tuple[pa.Table | None, int]:
    """The valid lines of ``paths`` as one table (None if there are none), and how many lines
    were dropped. Only the CRC check runs in Python; Arrow parses the JSON, off the GIL, so a
    compaction on a serving replica costs its request path little."""
    import pyarrow as pa
    import pyarrow.json as pajson

    payloads, dropped, longest = [], 0, 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        for line in data.split(b"\n"):
            if not line:
                continue
            payload = line[9:]
            try:
                ok = line[8:9] == b" " and int(line[:8], 16) == zlib.crc32(payload)
            except ValueError:
                ok = False
            if ok:
                payloads.append(payload)
                longest = max(longest, len(payload))
            else:
                dropped += 1
    if not payloads:
        return None, dropped
    table = pajson.read_json(
        pa.BufferReader(b"\n".join(payloads)),
        read_options=pajson.ReadOptions(block_size=max(1 << 20, 2 * longest + 2)),
        parse_options=pajson.ParseOptions(explicit_schema=record_schema(), unexpected_field_behavior="error"),
    )
    return table, dropped
