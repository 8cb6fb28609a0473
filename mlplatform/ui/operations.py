"""The operations page's content, as each part records it: pipeline runs (``RunState``),
data quality reports (``platform.quality``), training/serving consistency reports
(``platform.features.consistency_reports``, each with a page of its own) and monitoring
reports (``monitoring.latest`` and the report it names)."""

from __future__ import annotations

import logging
import re
from typing import Any

from mlplatform.errors import PlatformError
from mlplatform.ui.definitions import definitions

__all__ = ["consistency_detail", "consistency_png", "monitoring_detail", "monitoring_file", "operations"]

log = logging.getLogger(__name__)

MAX_RUNS = 20
MAX_REPORTS = 20
_PNG = re.compile(r"^[\w.-]{1,200}\.png$")


def operations(platform: Any) -> dict[str, Any]:
    return {"pipelines": _pipelines(platform), "quality": _quality(platform), "consistency": _consistency(platform),
            "monitoring": _monitoring(platform)}


def consistency_detail(platform: Any, name: str) -> dict[str, Any]:
    """One consistency report: its figures and its Markdown summary (NotFoundError if none)."""
    from mlplatform.features.consistency_reports import read_info, read_summary

    summary = read_summary(platform.storage, name)  # NotFoundError for an unknown or bad name
    return {"report": read_info(platform.storage, name), "name": name, "summary": summary}


def consistency_png(platform: Any, name: str) -> bytes:
    from mlplatform.features.consistency_reports import report_key

    return platform.storage.read_bytes(report_key(platform.storage, name, "match_rate.png"))


def monitoring_detail(platform: Any, model: str) -> dict[str, Any]:
    """The latest monitoring report of ``model``: its figures and its Markdown (report.md)."""
    from mlplatform.errors import NotFoundError

    found = _monitoring_of(platform, model) if model in platform.models.names() else None
    if found is None:
        raise NotFoundError(f"model {model!r} has no monitoring report")
    key = f"{found['report']}/report.md"
    found["markdown"] = platform.storage.read_bytes(key).decode("utf-8", "replace") if platform.storage.exists(key) else ""
    return found


def monitoring_file(platform: Any, model: str, file: str) -> bytes:
    """A PNG of the latest monitoring report of ``model`` (a plain ``*.png`` name in its folder)."""
    from mlplatform.errors import NotFoundError
    from mlplatform.monitoring.latest import latest_psi

    record = latest_psi(platform.storage, model) if model in platform.models.names() else None
    folder = (record or {}).get("report") or ""
    if not folder or not _PNG.match(file) or not platform.storage.exists(f"{folder}/{file}"):
        raise NotFoundError(f"model {model!r} has no monitoring plot {file!r}")
    return platform.storage.read_bytes(f"{folder}/{file}")


def _consistency(platform: Any) -> list[Any]:
    try:
        return platform.features.consistency_reports(limit=MAX_REPORTS)
    except PlatformError as exc:
        log.info("operations: consistency reports unavailable: %s", exc)
        return []


def _pipelines(platform: Any) -> list[dict[str, Any]]:
    from mlplatform.pipelines.state import PREFIX, RunState

    out = []
    for name in platform.storage.list(PREFIX):
        state = RunState(platform.storage, name)
        runs = []
        for ds in list(reversed(state.runs()))[:MAX_RUNS]:
            record = state.run(ds) or {}
            runs.append({"ds": ds.isoformat(), "status": record.get("status", "running"), "steps": record.get("steps") or {},
                         "started": record.get("started_at"), "finished": record.get("finished_at")})
        out.append({"name": name, "runs": runs})
    return out


def _quality(platform: Any) -> list[dict[str, Any]]:
    out = []
    for view in definitions(platform).views:
        try:
            reports = platform.quality.reports(view.name)
        except PlatformError as exc:
            log.info("operations: quality reports of %s unavailable: %s", view.name, exc)
            continue
        for r in reports[-5:][::-1]:
            out.append({"view": r.view, "stage": r.stage, "policy": r.policy, "rows": r.rows, "at": r.created_at,
                        "passed": r.passed, "failed": sum(c.status == "failed" for c in r.checks), "checks": len(r.checks)})
    return out


def _monitoring(platform: Any) -> list[dict[str, Any]]:
    return [m for m in (_monitoring_of(platform, name) for name in platform.models.names()) if m is not None]


def _monitoring_of(platform: Any, name: str) -> dict[str, Any] | None:
    """Model ``name``'s latest monitoring report for the page, or None (none, or unreadable)."""
    from mlplatform.monitoring.latest import latest_psi

    try:
        record = latest_psi(platform.storage, name)
        if not record:
            return None
        folder = record.get("report") or ""
        report = platform.storage.read_json(f"{folder}/report.json") if folder and platform.storage.exists(f"{folder}/report.json") else {}
    except PlatformError as exc:
        log.info("operations: monitoring of %s unavailable: %s", name, exc)
        return None
    bound = report.get("bound")
    psi = sorted(((k, v) for k, v in (record.get("psi") or {}).items()), key=lambda kv: -(kv[1] if kv[1] is not None else -1.0))
    return {"model": name, "version": record.get("version"), "at": record.get("created_at"), "report": folder,
            "decisions": report.get("decisions"), "reference": report.get("reference") or {}, "bound": bound,
            "window": report.get("window") or {}, "flagged": report.get("flagged") or [],
            "psi": [{"column": k, "psi": v, "shift": bound is not None and v is not None and v >= bound} for k, v in psi]}
