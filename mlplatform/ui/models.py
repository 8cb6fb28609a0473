"""The models pages' content: each model's versions and aliases, the aliases' history (with
the promotion gate's verdicts), metric trends across versions, and one version's card."""

from __future__ import annotations

import re
from typing import Any

from mlplatform.errors import NotFoundError
from mlplatform.ui.svg import trend_svg

__all__ = ["IMAGE_TYPES", "model_detail", "models_index", "version_detail", "version_file"]

IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}
_CARD = "model_card.md"
_LINKED = re.compile(r"!\[[^\]]*\]\(<?([^)\s>]+)")


def models_index(platform: Any) -> dict[str, Any]:
    registry = platform.models
    out = []
    for name in registry.names():
        versions = registry.list(name)
        latest = versions[-1] if versions else None
        out.append({"name": name, "versions": len(versions), "latest": latest.version if latest else None,
                    "aliases": registry.aliases(name), "flavor": latest.flavor if latest else None,
                    "created_at": latest.created_at if latest else None,
                    "service": latest.lineage.get("feature_service") if latest else None,
                    "description": latest.description if latest else ""})
    return {"models": out}


def model_detail(platform: Any, name: str) -> dict[str, Any]:
    registry = platform.models
    if name not in registry.names():
        raise NotFoundError(f"no model named {name!r} is registered")
    versions = registry.list(name)
    numeric = sorted({k for v in versions for k, x in v.metrics.items() if _number(x)})
    series = {m: [(v.version, float(v.metrics[m])) for v in versions if _number(v.metrics.get(m))] for m in numeric}
    history = registry.alias_history(name)
    return {
        "name": name,
        "aliases": registry.aliases(name),
        "versions": [
            {"version": v.version, "flavor": v.flavor, "created_at": v.created_at, "aliases": v.aliases,
             "description": v.description, "metrics": {k: v.metrics[k] for k in numeric if k in v.metrics},
             "service": v.lineage.get("feature_service"), "pipeline_run": v.lineage.get("pipeline_run"),
             "training_set": _snapshot_label(v.lineage.get("training_set")),
             "has_card": _CARD in v.artifacts}
            for v in reversed(versions)
        ],
        "metric_names": numeric,
        "trend": trend_svg(series),
        "history": [
            {"alias": e.alias, "version": e.version, "previous": e.previous, "outcome": e.outcome, "at": e.at, "by": e.by,
             "reason": e.reason, "checks": (e.decision or {}).get("checks") or []}
            for e in reversed(history)
        ],
    }


def version_detail(platform: Any, name: str, version: int) -> dict[str, Any]:
    mv = platform.models.get(name, version=version)
    card = None
    if _CARD in mv.artifacts:
        card = platform.storage.read_artifact(f"{mv.artifact_prefix}/{_CARD}", mv.artifacts[_CARD]).decode("utf-8", "replace")
    lineage = dict(mv.lineage)
    training_set = lineage.pop("training_set", None)
    images = sorted(f for f in mv.artifacts if any(f.endswith(ext) for ext in IMAGE_TYPES))
    linked = set(_LINKED.findall(card or ""))
    return {
        "name": name, "version": mv.version, "flavor": mv.flavor, "created_at": mv.created_at, "aliases": mv.aliases,
        "description": mv.description, "metrics": mv.metrics, "params": mv.params,
        "lineage": {k: v for k, v in lineage.items() if k not in ("libraries", "artifacts")}, "libraries": lineage.get("libraries") or {},
        "training_set": training_set,
        "card": card,
        "images": images,
        # plots the card does not show itself (a card links its plots as ![..](roc.png))
        "gallery": [f for f in images if f not in linked],
        "files": sorted(mv.artifacts),
    }


def version_file(platform: Any, name: str, version: int, file: str) -> tuple[bytes, str]:
    """An image file of a version (checksum verified) and its media type."""
    mv = platform.models.get(name, version=version)
    kind = next((t for ext, t in IMAGE_TYPES.items() if file.endswith(ext)), None)
    if kind is None or file not in mv.artifacts:
        raise NotFoundError(f"model {name!r} version {version} has no image {file!r}")
    return platform.storage.read_artifact(f"{mv.artifact_prefix}/{file}", mv.artifacts[file]), kind


def _snapshot_label(ts: Any) -> str | None:
    if not isinstance(ts, dict) or not ts.get("name"):
        return None
    return f"{ts['name']} v{ts['version']}" if ts.get("version") is not None else str(ts["name"])


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
