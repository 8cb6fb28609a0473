"""The catalog page's content: every registered definition with what a person asks of it —
who owns it, what it means (descriptions, decline-reason texts), its versions, how far its
offline data reaches, what is online and how fresh, and its latest quality result."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from mlplatform.errors import PlatformError
from mlplatform.ui.definitions import definitions

__all__ = ["catalog", "view_detail"]

log = logging.getLogger(__name__)


def catalog(platform: Any) -> dict[str, Any]:
    """Entities, sources, feature views (with their state), on-demand views and services."""
    defs = definitions(platform)
    return {
        "entities": [{"name": e.name, "description": e.description, "join_keys": ", ".join(e.join_keys)} for e in defs.entities],
        "sources": [
            {"name": s.name, "kind": kind, "description": s.description, "dataset": s.dataset}
            for kind, items in (("batch", defs.sources), ("stream", defs.stream_sources))
            for s in items
        ],
        "views": [_view_summary(platform, v) for v in defs.views],
        "on_demand": [
            {"name": v.name, "description": v.description, "features": [_field(f) for f in v.schema_],
             "sources": [s.name for s in v.sources]}
            for v in defs.on_demand
        ],
        "services": [
            {"name": s.name, "description": s.description, "owner": s.owner, "features": list(s.features)}
            for s in defs.services
        ],
    }


def view_detail(platform: Any, name: str) -> dict[str, Any]:
    """One view: its summary, its definition and its version history (newest first)."""
    view = definitions(platform).view(name) or platform.features.get_feature_view(name)  # NotFoundError
    summary = _view_summary(platform, view, deep=True)
    history = platform.features.registry.history("feature_view", name)
    summary["history"] = list(reversed(history))
    summary["definition"] = view.model_dump(mode="json", by_alias=True)
    return summary


def _view_summary(platform: Any, view: Any, *, deep: bool = False) -> dict[str, Any]:
    from mlplatform.features.store import offline_dataset

    fields = [_field(f) for f in view.schema_] + [
        {"name": a.name or f"{a.function}_{a.column}", "dtype": f"{a.function}({a.column})" + (f" over {_window(a.window)}" if a.window else ""),
         "description": a.description, "reason": a.reason or ""}
        for a in view.aggregations
    ]
    out: dict[str, Any] = {
        "name": view.name, "description": view.description, "owner": view.owner, "tags": view.tags,
        "entities": [e.name for e in view.entities], "source": view.source.name, "features": fields,
        "policy": view.quality.policy if view.quality else None, "offline": None, "online": None, "quality": None,
    }
    dataset = offline_dataset(view.name)
    errors = []
    try:
        if platform.datasets.exists(dataset):
            version = platform.datasets.get(dataset)
            parts = version.partitions
            out["offline"] = {"rows": version.rows, "version": version.version, "from": _partition(parts[0]) if parts else None,
                              "to": _partition(parts[-1]) if parts else None}
    except PlatformError as exc:
        errors.append(f"offline data: {exc}")
    if view.is_realtime:
        out["online"] = {"realtime": True}
    else:
        try:
            # The online store's own list: the rollback records (event windows) are read on the view's page.
            generations = platform.features.generations(view.name) if deep else platform.features.online_store.generations(view.name)
            current = next((g for g in generations if g.state == "current"), None)
            if current is not None:
                age = (datetime.now(UTC) - current.published_at).total_seconds() if current.published_at else None
                out["online"] = {"generation": current.generation, "rows": current.rows, "end": getattr(current, "end", None),
                                 "published_at": current.published_at, "age": _age(age), "kept": len(generations)}
        except PlatformError as exc:  # e.g. the online store is down: said on the page
            errors.append(f"online state: {exc}")
    try:
        report = platform.quality.latest(view.name)
        if report is not None:
            failed = [c for c in report.checks if c.status == "failed"]
            out["quality"] = {"passed": report.passed, "stage": report.stage, "rows": report.rows, "at": report.created_at,
                              "checks": len(report.checks), "failed": len(failed),
                              "details": _by_feature(report.checks) if deep else None}
    except PlatformError as exc:
        errors.append(f"quality: {exc}")
    for error in errors:
        log.info("catalog: view %s: %s", view.name, error)
    out["error"] = "; ".join(errors)
    return out


def _field(f: Any) -> dict[str, Any]:
    return {"name": f.name, "dtype": f.dtype, "description": f.description, "reason": f.reason or ""}


def _window(window: Any) -> str:
    from mlplatform._duration import format_duration

    return format_duration(window) if isinstance(window, timedelta) else str(window)


def _by_feature(checks: list[Any]) -> dict[str, Any]:
    """A report's checks as one row per feature and one column per expectation (failed rows first)."""
    names: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for c in checks:
        if c.expectation not in names:
            names.append(c.expectation)
        row = rows.setdefault(c.feature or "(view)", {"feature": c.feature or "(view)", "failed": False, "checks": {}})
        row["checks"][c.expectation] = {"status": c.status, "observed": c.observed, "bound": c.bound}
        row["failed"] = row["failed"] or c.status == "failed"
    return {"expectations": names, "rows": sorted(rows.values(), key=lambda r: not r["failed"])}


def _partition(part: str) -> str:
    return part.split("=", 1)[-1]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
