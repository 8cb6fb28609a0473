"""A readable listing of what the feature registry holds (``mlp features``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlplatform._duration import format_duration

if TYPE_CHECKING:
    from mlplatform.features.store import FeatureStore


def describe_registry(store: FeatureStore) -> str:
    """Entities, feature views (with features, ttl and version), on-demand views and services."""
    registry = store.registry
    state = registry.state()
    objects = state["objects"]
    lines = [f"feature registry revision {state['revision']} at {store.storage.uri('registry/features')}"]
    lines.append("entities:")
    for entity in store.list_entities():
        lines.append(f"  {entity.name:<22} keys={','.join(entity.join_keys)}  v{entity.version}")
    lines.append("feature views:")
    for view in store.list_feature_views():
        ttl = format_duration(view.ttl) if view.ttl else "none"
        has_data = "backfilled" if store.has_offline_data(view) else "no data yet"
        lines.append(
            f"  {view.name:<22} entity={','.join(e.name for e in view.entities)}  ttl={ttl}  "
            f"features={len(view.features)}  v{view.version}  ({has_data})"
        )
        for f in view.features:
            lines.append(f"      {f.name:<28} {f.dtype:<8} {f.description}")
    lines.append("on-demand feature views:")
    for name in sorted(objects.get("on_demand_feature_view", {})):
        entry = objects["on_demand_feature_view"][name]
        sources = ",".join(s["name"] for s in entry["spec"]["sources"])
        lines.append(f"  {name:<22} sources={sources}  udf={entry['spec']['udf']}  v{entry['version']}")
        for f in entry["spec"]["schema"]:
            lines.append(f"      {f['name']:<28} {f['dtype']:<8} {f['description']}")
    lines.append("feature services:")
    for service in store.list_feature_services():
        lines.append(f"  {service.name:<22} features={len(service.features)}  v{service.version}")
    return "\n".join(lines)
