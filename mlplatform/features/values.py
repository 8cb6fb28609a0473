"""Values checked against their declared dtype at the platform's boundaries.

    check_values("amount", [120.0, "abc"], "float64", where="request field of 'checkout_features'")
    # DataError: request field of 'checkout_features' 'amount' must hold numbers, got 'abc' (str) at row 1

Entity keys, request fields and pushed feature values come from outside (HTTP, files, a
caller's DataFrame). They are checked here, before any feature function, pandas or Arrow sees
them, so a bad value is a ``DataError`` that names the column, the row and the value — never
an ``OverflowError`` from deep inside a conversion. The rules per dtype:

- ``int64``: an ``int`` (not a ``bool``) in ``[-2**63, 2**63 - 1]``, or a float holding a whole
  number in that range (JSON and pandas write integers with a gap as floats);
- ``float64``: an ``int`` or ``float`` (not a ``bool``) that is finite once converted (so
  ``10**400`` and ``1e309`` are refused);
- ``string``: a ``str``; ``bool``: a ``bool``;
- ``timestamp``: a timezone-aware or naive (UTC) ``datetime``, or ISO 8601 text, between the
  years 1 and 9999 once converted to UTC;
- ``None`` (and NaN) is a missing value: allowed unless ``nullable=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mlplatform.errors import DataError

__all__ = ["INT64_MAX", "INT64_MIN", "check_value", "check_values"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_KINDS = {"int64": "integers", "float64": "numbers", "string": "strings", "bool": "booleans", "timestamp": "timestamps"}


def check_value(value: Any, dtype: str) -> Any:
    """``value`` as the plain Python value of ``dtype`` (None for a missing one).

    Raises:
        ValueError: the value does not fit ``dtype`` (the message says why, without the value).
    """
    if value is None or (not isinstance(value, (str, bytes, int)) and value != value):  # NaN, NaT
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes, datetime)):  # numpy scalars
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    if dtype == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError("not a boolean")
    if dtype == "string":
        if isinstance(value, str):
            return value
        raise ValueError("not a string")
    if dtype == "timestamp":
        return _timestamp(value)
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if dtype == "int64":
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise ValueError("not a whole number")
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("not an integer")
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError("outside the int64 range [-2**63, 2**63 - 1]")
        return value
    if dtype == "float64":
        if not isinstance(value, (int, float)):
            raise ValueError("not a number")
        try:
            number = float(value)
        except OverflowError:
            raise ValueError("too large for a float64") from None
        if not math.isfinite(number):
            raise ValueError("not finite")
        return number
    raise ValueError(f"unsupported dtype {dtype!r}")


def check_values(name: str, values: Sequence[Any], dtype: str, *, where: str, nullable: bool = True) -> list[Any]:
    """Every value of column ``name`` checked by ``check_value``; returns the plain values.

    Raises:
        DataError: ``{where} {name!r} must hold {kind}, got {value!r} ({type}) at row {i}: {why}``
            for the first bad value (a long value is cut to 60 characters).
    """
    out = []
    for i, value in enumerate(values):
        try:
            checked = check_value(value, dtype)
        except ValueError as exc:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(
                f"{where} {name!r} must hold {_KINDS.get(dtype, dtype)}, got {shown} ({type(value).__name__}) at row {i}: {exc}"
            ) from None
        if checked is None and not nullable:
            raise DataError(f"{where} {name!r} must not be null (row {i})")
        out.append(checked)
    return out


def _timestamp(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            raise ValueError("not ISO 8601 text") from None
    elif hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        raise ValueError("not a datetime or ISO 8601 text")
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("outside the years 1-9999 in UTC") from None
