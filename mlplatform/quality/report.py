"""A quality report: the checks one validation ran on one view, and its one-line summary.

    report.passed            # no check failed
    report.line()            # 'applicant_history: 12,040 rows, 57 passed, 0 failed, 14 skipped'
    report.failed[0]         # Check(feature='loans_30d', expectation='max_null_rate', observed=0.3, bound=0.05, ...)

A check is ``passed``, ``failed`` or ``skipped`` (it could not be evaluated: no rows, no
non-null values, or no production model to compare drift with; ``detail`` says why).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Check", "QualityReport"]

Status = Literal["passed", "failed", "skipped"]


@dataclass(frozen=True)
class Check:
    """One expectation on one feature (``feature`` is ``""`` for a view-level check)."""

    feature: str
    expectation: str
    status: Status
    observed: Any = None
    bound: Any = None
    detail: str = ""

    @property
    def excess(self) -> float:
        """How far past its bound a failed check is, relative to the bound (for ranking)."""
        if self.status != "failed":
            return 0.0
        try:
            observed, bound = float(self.observed), float(self.bound)
        except (TypeError, ValueError):
            return float("inf")  # a dtype or allowed-values failure: always among the worst
        return abs(observed - bound) / max(abs(bound), 1e-9)

    def describe(self) -> str:
        what = f"feature {self.feature!r} " if self.feature else ""
        if self.status == "skipped":
            return f"{what}{self.expectation} skipped: {self.detail}"
        text = f"{what}{self.expectation}: observed {_fmt(self.observed)}, bound {_fmt(self.bound)}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class QualityReport:
    """What one validation of ``view`` found. ``stage``: backfill, materialize, training_set
    or validate; ``rows``: rows checked; ``uncovered``: training-set rows for which the view
    had no value (every feature null: an entity with no history yet), left out of the checks;
    ``start``/``end``: the range checked (ISO strings, None = unbounded); ``profile_seconds``:
    CPU time the profiling took, summed over the tasks that ran it;
    ``reference``: the training set drift was measured against, if any; ``key``: where the
    report is stored under the storage root (empty until written)."""

    view: str
    stage: str
    policy: str
    rows: int
    created_at: str
    start: str | None
    end: str | None
    checks: list[Check] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    key: str = ""
    uncovered: int = 0
    profile_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[Check]:
        return sorted((c for c in self.checks if c.status == "failed"), key=lambda c: -c.excess)

    def count(self, status: Status) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def line(self) -> str:
        """One line for a person: view, rows, checks passed/failed/skipped, the worst finding."""
        return f"{self.view}: {self.findings()}"

    def findings(self) -> str:
        """``line()`` without the view's name."""
        without = f" (+{self.uncovered:,} without a value)" if self.uncovered else ""
        text = f"{self.rows:,} rows{without}, {self.count('passed')} passed, {self.count('failed')} failed, {self.count('skipped')} skipped"
        if self.failed:
            text += f"; worst: {self.failed[0].describe()} [{self.policy}]"
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QualityReport:
        from dataclasses import fields

        known = {f.name for f in fields(cls)}  # a report written by a newer version may hold more
        checks = [Check(**c) for c in data.get("checks", [])]
        return cls(**{**{k: v for k, v in data.items() if k in known}, "checks": checks})

    def summary(self) -> dict[str, Any]:
        """The compact form kept with a training-set snapshot and shown by the model card."""
        return {
            "view": self.view,
            "policy": self.policy,
            "rows": self.rows,
            "uncovered": self.uncovered,
            "passed": self.count("passed"),
            "failed": [c.describe() for c in self.failed],
            "skipped": self.count("skipped"),
            "report": self.key,
        }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 5:
        return f"{value[:5]!r}…"
    return repr(value) if isinstance(value, str) else str(value)
