"""The written consistency reports, listed with their summary figures.

    for info in consistency_reports(platform.storage):     # or platform.features.consistency_reports()
        info.name, info.feature_service, info.decisions, info.flagged, info.min_exact_match_rate
    info = read_info(platform.storage, name)               # one report's figures
    text = read_summary(platform.storage, info.name)      # the report's summary.md

``mlp consistency`` writes each report (``ConsistencyReport.write``) to its own folder
``reports/consistency/<UTC time>/``: ``per_feature.parquet``, ``rows.parquet``, ``summary.md``,
``match_rate.png`` and, since the listing exists, ``report.json`` (service and decision count).
A folder without ``report.json`` (written before it) is listed from ``per_feature.parquet``
alone, with ``feature_service`` and ``decisions`` None. A folder with neither is skipped.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlplatform.errors import NotFoundError, PlatformError

if TYPE_CHECKING:
    from mlplatform.storage import Storage

__all__ = ["PREFIX", "ConsistencyReportInfo", "consistency_reports", "read_info", "read_summary", "report_key"]

#: Where ``mlp consistency`` writes its reports, one folder each, under the storage root.
PREFIX = "reports/consistency"
_NAME = re.compile(r"^[\w.:-]{1,100}$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsistencyReportInfo:
    """One written report: ``name`` is its folder under ``reports/consistency/`` (its UTC time);
    ``features`` how many features were compared, ``flagged`` those whose served values were not
    all equal to the offline ones, ``min_exact_match_rate`` the lowest rate (None: nothing compared)."""

    name: str
    feature_service: str | None
    decisions: int | None
    features: int
    flagged: list[str]
    min_exact_match_rate: float | None
    files: list[str]


def consistency_reports(storage: Storage, *, limit: int | None = None) -> list[ConsistencyReportInfo]:
    """The reports under ``reports/consistency/``, newest first (at most ``limit``).

    A report that cannot be read (a folder being written, a damaged file) is left out and
    logged at WARNING; the others are still listed.
    """
    names = sorted(storage.list(PREFIX), reverse=True)
    out = []
    for name in names:
        if limit is not None and len(out) >= limit:
            break
        try:
            info = _info(storage, name)
        except (PlatformError, OSError, ValueError) as exc:
            log.warning("consistency report %s could not be read: %s", name, exc)
            continue
        if info is not None:
            out.append(info)
    return out


def read_info(storage: Storage, name: str) -> ConsistencyReportInfo:
    """The figures of report ``name`` alone (without listing the others).

    Raises:
        NotFoundError: no readable report of that name.
    """
    report_key(storage, name, "summary.md")  # checks the name
    info = _info(storage, name)
    if info is None:
        raise NotFoundError(f"consistency report {name!r} has no per_feature.parquet")
    return info


def read_summary(storage: Storage, name: str) -> str:
    """The Markdown summary of report ``name`` (a name from ``consistency_reports``).

    Raises:
        NotFoundError: no report of that name (or the name is not a plain folder name).
    """
    return storage.read_bytes(report_key(storage, name, "summary.md")).decode("utf-8", "replace")


def report_key(storage: Storage, name: str, file: str) -> str:
    """The storage key of ``file`` in report ``name``, once both are known to exist.

    Raises:
        NotFoundError: no report of that name (or the name is not a plain folder name), or
            the report has no such file.
    """
    if not _NAME.match(name) or name in (".", "..") or not storage.exists(f"{PREFIX}/{name}/summary.md"):
        raise NotFoundError(f"no consistency report named {name!r} under {PREFIX}/")
    key = f"{PREFIX}/{name}/{file}"
    if file != "summary.md" and (not _NAME.match(file) or not storage.exists(key)):
        raise NotFoundError(f"consistency report {name!r} has no {file}")
    return key


def _info(storage: Storage, name: str) -> ConsistencyReportInfo | None:
    import pyarrow.parquet as pq

    files = storage.list(f"{PREFIX}/{name}")
    if "per_feature.parquet" not in files:
        return None
    header = storage.read_json(f"{PREFIX}/{name}/report.json") if "report.json" in files else {}
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{PREFIX}/{name}/per_feature.parquet")),
                          columns=["ref", "exact_match_rate"])
    refs = table.column("ref").to_pylist()
    rates = table.column("exact_match_rate").to_pylist()
    decisions = header.get("decisions")
    return ConsistencyReportInfo(
        name=name,
        feature_service=header.get("feature_service"),
        decisions=int(decisions) if decisions is not None else None,
        features=len(refs),
        flagged=[r for r, rate in zip(refs, rates, strict=True) if rate is not None and rate < 1.0],
        min_exact_match_rate=min((r for r in rates if r is not None), default=None),
        files=files,
    )
