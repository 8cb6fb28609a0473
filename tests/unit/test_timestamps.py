"""``parse_instant``: a plain datetime is converted without pandas, to exactly what the pandas
path gives; everything else (strings, dates, Timestamps, far years, bad values) as before."""

from datetime import UTC, date, datetime, timedelta, timezone

import pandas as pd
import pytest

from mlplatform.errors import DataError
from mlplatform.timestamps import parse_instant


def _by_pandas(value):
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor("us").to_pydatetime()


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 1, 1, 12, 30, 1, 123456),
        datetime(2024, 3, 31, 1, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(1678, 1, 1),
        datetime(2261, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-3))),
        datetime(2026, 12, 5, 10, 0, tzinfo=UTC),
    ],
)
def test_a_plain_datetime_is_what_the_pandas_path_gives(value):
    got = parse_instant(value, "t")
    assert got == _by_pandas(value)
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)
    assert got.isoformat() == _by_pandas(value).isoformat()


def test_other_inputs_keep_their_meaning():
    assert parse_instant("2024-01-01", "t") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_instant(date(2024, 1, 1), "t") == datetime(2024, 1, 1, tzinfo=UTC)
    nanos = pd.Timestamp("2024-01-01T00:00:00.000001999Z")
    assert parse_instant(nanos, "t") == datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=UTC)  # truncated to µs
    assert parse_instant(datetime(3000, 1, 1), "t") == datetime(3000, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", [None, "not a time", "2024-13-45"])
def test_what_is_not_a_point_in_time_is_refused_by_name(bad):
    with pytest.raises(DataError, match="backfill start"):
        parse_instant(bad, "backfill start")
