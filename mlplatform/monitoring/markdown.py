"""The Markdown text of a monitoring report (``report.md``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mlplatform.monitoring.drift import WATCH

if TYPE_CHECKING:
    from mlplatform.monitoring.drift import Drift
    from mlplatform.monitoring.report import MonitoringReport

__all__ = ["render_markdown"]

_STATUS = {"shift": "**shift**", "watch": "watch", "stable": "stable", "no_data": "no data"}


def render_markdown(report: MonitoringReport, images: Mapping[str, str]) -> str:
    """The report as Markdown; ``images`` maps a column to the PNG drawn for it (relative name)."""
    ref = report.reference
    lines = [
        f"# Monitoring: {report.model} v{report.version}",
        "",
        f"- **Window**: {report.window_start.isoformat()} → {report.window_end.isoformat()}, "
        f"{report.decisions:,} scored decisions of this version",
        f"- **Reference**: training set `{ref.get('name')}` version {ref.get('version')}, "
        f"split `{ref.get('split')}`, {int(ref.get('rows') or 0):,} rows",
        f"- **Bound**: PSI ≥ {report.bound:g} is a shift; {WATCH:g}–{report.bound:g} is worth watching",
        f"- **Flagged**: {', '.join(f'`{n}`' for n in report.flagged) or 'nothing'}",
        "",
    ]
    if report.decisions == 0:
        lines += ["No scored decisions of this version in the window: nothing to compare.", ""]
    lines += ["## Score", "", *_table([report.score]), ""]
    if report.score.name in images:
        lines += [f"![score distribution]({images[report.score.name]})", ""]
    lines += ["## Features", "", "Most shifted first.", "", *_table(report.features), ""]
    for d in report.features:
        if d.name in images:
            lines += [f"### `{d.name}`", "", f"![{d.name}]({images[d.name]})", ""]
    return "\n".join(lines)


def _table(drifts: list[Drift]) -> list[str]:
    rows = ["| column | PSI | status | missing (training) | missing (live) |", "|---|---:|---|---:|---:|"]
    for d in drifts:
        psi = "–" if d.psi is None else f"{d.psi:.4f}"
        live = "–" if d.current_missing is None else f"{d.current_missing:.1%}"
        rows.append(f"| `{d.name}` | {psi} | {_STATUS[d.status]} | {d.reference_missing:.1%} | {live} |")
    return rows
