"""A monitoring report: PSI per feature and for the score, live decisions against the training snapshot.

    report = build_report(model="underwriting", version=3, reference=ref, reference_scores=s,
                          records=decisions, window=(start, end), reference_name={...})
    report.flagged                   # ["income"]: features (or "score") at or above the bound
    key = write_report(storage, report)   # monitoring/underwriting/reports/<stamp>/report.md …

``records`` are decision-log records (``mlplatform.serving.decisions``): only scored
(non-fallback), returned decisions of the model version count; their ``features`` hold the
values exactly as the model saw them (null when missing), their ``probability_of_default`` the
score. The reference is the training snapshot the version was trained on (its lineage), as
columns of feature values, and the version's scores on those rows.

Written under the storage root, the report folder first and ``latest.json`` last (each write
atomic), so a reader of ``latest.json`` (the serving application's ``mlp_psi`` gauges) always
finds a complete report behind it:

    monitoring/<model>/reports/<UTC stamp>/report.md     the report a person reads
    monitoring/<model>/reports/<UTC stamp>/report.json   the same figures, with the bins
    monitoring/<model>/reports/<UTC stamp>/*.png         reference vs live distribution per column
    monitoring/<model>/latest.json                       {"version", "psi": {name: value}, "report"}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.monitoring.drift import DEFAULT_BOUND, Drift, column_drift
from mlplatform.monitoring.latest import LATEST, PREFIX

if TYPE_CHECKING:
    from mlplatform.storage.blobs import Storage

__all__ = ["SCORE", "MonitoringReport", "build_report", "write_report"]

log = logging.getLogger(__name__)

#: The name the score goes by among the report's columns (and the ``feature`` tag of ``mlp_psi``).
SCORE = "score"


@dataclass(frozen=True)
class MonitoringReport:
    model: str
    version: int
    window_start: datetime
    window_end: datetime
    created_at: datetime
    decisions: int  # scored decisions of this version in the window
    reference: dict[str, Any]  # the training snapshot: name, version, split, rows
    bound: float
    features: list[Drift]
    score: Drift
    key: str = field(default="")  # where it was written (set by write_report)

    @property
    def flagged(self) -> list[str]:
        """Columns (features, then ``score``) whose PSI is at or above the bound."""
        return [d.name for d in [*self.features, self.score] if d.status == "shift"]

    def psi(self) -> dict[str, float | None]:
        return {**{d.name: d.psi for d in self.features}, SCORE: self.score.psi}

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "window": {"start": self.window_start.isoformat(), "end": self.window_end.isoformat()},
            "created_at": self.created_at.isoformat(),
            "decisions": self.decisions,
            "reference": self.reference,
            "bound": self.bound,
            "flagged": self.flagged,
            "score": self.score.to_json(),
            "features": [d.to_json() for d in self.features],
        }


def build_report(
    *,
    model: str,
    version: int,
    reference: Mapping[str, Any],
    reference_scores: Any,
    records: Iterable[Mapping[str, Any]],
    window: tuple[datetime, datetime],
    reference_name: Mapping[str, Any] | None = None,
    bound: float = DEFAULT_BOUND,
    now: datetime | None = None,
) -> MonitoringReport:
    """PSI of every reference column and of the score, live (``records``) against ``reference``.

    ``window`` is ``[start, end]`` inclusive on ``created_at``; ``reference`` maps each feature
    the model reads to its training values. A feature a record lacks counts as missing.
    """
    start, end = window
    features: dict[str, list[Any]] = {name: [] for name in reference}
    scores: list[float] = []
    for r in records:
        if r.get("model_name") != model or r.get("model_version") != version:
            continue
        if r.get("fallback") or not r.get("returned", True) or r.get("probability_of_default") is None:
            continue
        created = datetime.fromisoformat(r["created_at"])
        if not (start <= created <= end):
            continue
        values = r["features"]
        values = json.loads(values) if isinstance(values, str) else values
        for name, column in features.items():
            column.append(values.get(name))
        scores.append(float(r["probability_of_default"]))
    drifts = [column_drift(name, reference=reference[name], current=features[name], bound=bound) for name in reference]
    return MonitoringReport(
        model=model,
        version=version,
        window_start=start,
        window_end=end,
        created_at=now or datetime.now(UTC),
        decisions=len(scores),
        reference=dict(reference_name or {}),
        bound=bound,
        features=sorted(drifts, key=lambda d: (-(d.psi or 0.0), d.name)),
        score=column_drift(SCORE, reference=reference_scores, current=scores, bound=bound),
    )


def write_report(storage: Storage, report: MonitoringReport, *, plots: int = 12) -> MonitoringReport:
    """Write the report (Markdown, JSON, the score's and the ``plots`` most-shifted features'
    PNGs) and then ``latest.json``; returns the report with ``key`` set to its folder.

    Raises:
        DependencyError: matplotlib is not installed.
    """
    from dataclasses import replace

    from mlplatform.monitoring.markdown import render_markdown
    from mlplatform.monitoring.plots import distribution_png

    folder = f"{PREFIX}/{report.model}/reports/{report.created_at.strftime('%Y%m%dT%H%M%S%fZ')}"
    report = replace(report, key=folder)
    drawn = [report.score, *[d for d in report.features if d.psi is not None][:plots]]
    images = {f"{_file_name(d.name)}.png": d for d in drawn}
    for name, drift in images.items():
        storage.write_bytes(f"{folder}/{name}", distribution_png(drift, title=f"{report.model} v{report.version}: {drift.name}"))
    storage.write_bytes(f"{folder}/report.json", json.dumps(report.to_json(), indent=2, allow_nan=False).encode())
    images_by_column = {d.name: name for name, d in images.items()}
    storage.write_bytes(f"{folder}/report.md", render_markdown(report, images_by_column).encode())
    storage.write_json(
        f"{PREFIX}/{report.model}/{LATEST}",
        {"version": report.version, "psi": report.psi(), "report": folder, "created_at": report.created_at.isoformat()},
    )
    log.info("monitoring report for %s v%d at %s (%d flagged)", report.model, report.version, storage.uri(folder), len(report.flagged))
    return report


def _file_name(column: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in column)[:100] or "column"
