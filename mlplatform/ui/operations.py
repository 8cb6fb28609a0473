"""The operations page's content, as each part records it: pipeline runs (``RunState``),
data quality reports (``platform.quality``), monitoring (``monitoring.latest``), and the
online generations kept for rollback (``platform.features.generations``)."""

from __future__ import annotations

import logging

from typing import Any

from mlplatform.errors import PlatformError
from mlplatform.ui.definitions import definitions

__all__ = ["operations"]

log = logging.getLogger(__name__)

MAX_RUNS = 20


def operations(platform: Any) -> dict[str, Any]:
    return {"pipelines": _pipelines(platform), "quality": _quality(platform), "monitoring": _monitoring(platform)}


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
    from mlplatform.monitoring.latest import latest_psi

    out = []
    for name in platform.models.names():
        record = latest_psi(platform.storage, name)
        if record:
            out.append({"model": name, "record": {k: v for k, v in record.items() if not isinstance(v, (dict, list))},
                        "details": {k: v for k, v in record.items() if isinstance(v, dict)}})
    return out


