"""Durations as people write them in YAML: ``50ms``, ``30s``, ``15m``, ``2h``, ``90d``, ``1w``.

Also accepted: a number of seconds, an ISO 8601 duration (``P90D``) or a ``timedelta``.
Negative durations are refused everywhere: no window, ttl or deadline can run backwards.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, TypeAdapter

_UNITS = {
    "us": timedelta(microseconds=1),
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
_PATTERN = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d|w)\s*$")
_ISO = TypeAdapter(timedelta)


def parse_duration(value: object) -> timedelta:
    """Parse ``value`` into a non-negative ``timedelta``.

    >>> parse_duration("90d")
    datetime.timedelta(days=90)

    Raises:
        ValueError: the value is not a duration, or it is negative (pydantic turns this into
            a ConfigError naming the field).
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s' or '90d', got {value!r}")
    elif isinstance(value, (int, float)):
        result = timedelta(seconds=value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            result = float(match.group(1)) * _UNITS[match.group(2)]
        else:
            try:
                result = _ISO.validate_python(value)
            except Exception:
                raise ValueError(
                    f"expected a duration such as '50ms', '30s', '15m', '2h', '90d' or 'P90D', got {value!r}"
                ) from None
    else:
        raise ValueError(f"expected a duration such as '30s' or '90d', got {value!r}")
    if result < timedelta(0):
        raise ValueError(f"duration must not be negative, got {value!r}")
    return result


def format_duration(value: timedelta) -> str:
    """The shortest exact unit form: ``timedelta(days=90)`` -> ``'90d'``."""
    micros = round(value / timedelta(microseconds=1))
    if micros == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s", "ms", "us"):
        size = round(_UNITS[unit] / timedelta(microseconds=1))
        if micros % size == 0:
            return f"{micros // size}{unit}"
    return f"{micros}us"  # unreachable: every value is a whole number of microseconds


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]
