"""Cron schedules and logical dates (``ds``): which days a pipeline runs for, and when each
run is due.

    schedule = Schedule.parse("0 2 * * *")        # daily, at 02:00 UTC
    schedule.due(date(2025, 1, 1))                # 2025-01-02 02:00 UTC: after the day has ended
    list(schedule.days(date(2025, 1, 1), date(2025, 1, 3)))   # [Jan 1, Jan 2, Jan 3]

A pipeline processes whole UTC days. Its ``ds`` is the day whose data a run handles (as
Airflow's ``ds``); the run for ``ds`` becomes due at the cron's hour and minute on the day
*after* ``ds``, once that day's data is complete. The day fields (day of month, month, day of
week) select which days have a run: ``0 2 * * 1`` runs for Mondays only. Minute and hour are
single numbers: a pipeline runs at most once per day.

Fields: ``*``, numbers, ``a-b`` ranges, ``*/n`` and ``a-b/n`` steps, and comma lists. Day of
week is 0-6 from Sunday (7 is Sunday too). As in cron, when both day of month and day of week
are restricted, a day matching either one runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from mlplatform.errors import ConfigError

__all__ = ["Schedule", "parse_ds"]

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_ALIASES = {"@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}


def parse_ds(value: str | date) -> date:
    """A logical date from ``YYYY-MM-DD`` (or a ``date``).

    Raises:
        ConfigError: not a date in that form.
    """
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ConfigError(f"bad ds {value!r}: give a day as YYYY-MM-DD, e.g. 2025-01-31") from None


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                first, last = low, high
            elif "-" in body:
                first, last = (int(x) for x in body.split("-", 1))
            else:
                first = last = int(body)
        except ValueError:
            raise ConfigError(f"cron {name} field {text!r}: use numbers, '*', ranges a-b, steps /n or lists") from None
        if step < 1 or not (low <= first <= last <= high):
            raise ConfigError(f"cron {name} field {text!r} is out of range {low}-{high}")
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    """A parsed daily cron expression (see the module docstring)."""

    expression: str
    minute: int
    hour: int
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]
    dom_restricted: bool
    dow_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> Schedule:
        """Raises: ConfigError: not five fields, a field out of range, or more than one run a day."""
        text = _ALIASES.get(expression.strip(), expression.strip())
        parts = text.split()
        if len(parts) != 5:
            raise ConfigError(f"schedule {expression!r}: a cron expression has 5 fields (minute hour dom month dow)")
        fields = [_field(p, name, low, high) for p, (name, low, high) in zip(parts, _FIELDS, strict=True)]
        if len(fields[0]) != 1 or len(fields[1]) != 1:
            raise ConfigError(
                f"schedule {expression!r}: minute and hour must be single numbers (a pipeline runs at most once a day)"
            )
        dow = frozenset(d % 7 for d in fields[4])
        return cls(
            expression=expression,
            minute=next(iter(fields[0])),
            hour=next(iter(fields[1])),
            days_of_month=fields[2],
            months=fields[3],
            days_of_week=dow,
            dom_restricted=parts[2] != "*",
            dow_restricted=parts[4] != "*",
        )

    @classmethod
    def parse_days(cls, expression: str) -> Schedule:
        """Only the day fields: ``dom month dow`` (``* * 1``: Mondays) or a whole cron
        expression whose minute and hour are ignored (``* * * * 1``).

        Raises: ConfigError: not 3 or 5 fields, or a field out of range."""
        parts = expression.split()
        if len(parts) not in (3, 5):
            raise ConfigError(f"days {expression!r}: give 'dom month dow' (e.g. '* * 1' for Mondays) or 5 cron fields")
        return cls.parse("0 0 " + " ".join(parts[-3:]))

    def matches(self, day: date) -> bool:
        """Whether ``day`` has a run (its ``ds`` is scheduled)."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = (day.isoweekday() % 7) in self.days_of_week
        if self.dom_restricted and self.dow_restricted:
            return dom or dow
        return dom and dow

    def due(self, ds: date) -> datetime:
        """When the run for ``ds`` is due: the cron's time on the next day (UTC)."""
        return datetime.combine(ds + timedelta(days=1), time(self.hour, self.minute), tzinfo=UTC)

    def days(self, start: date, end: date) -> Iterator[date]:
        """Scheduled days from ``start`` to ``end``, both inclusive, in order."""
        day = start
        while day <= end:
            if self.matches(day):
                yield day
            day += timedelta(days=1)

    def due_days(self, start: date, now: datetime) -> list[date]:
        """Scheduled days from ``start`` whose run is due at ``now`` (catch-up included)."""
        last = (now.astimezone(UTC) - timedelta(hours=self.hour, minutes=self.minute)).date() - timedelta(days=1)
        return [d for d in self.days(start, last) if self.due(d) <= now]
