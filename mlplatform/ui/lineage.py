"""The lineage graph: source → feature view → feature service → training-set snapshot → model
version → alias → deployment, read from the feature registry, the model registry and the
serving config; every node links to the page that describes it."""

from __future__ import annotations

from typing import Any

from mlplatform.ui.definitions import definitions
from mlplatform.ui.svg import Node, lineage_svg

__all__ = ["COLUMNS", "lineage"]

COLUMNS = ("sources", "feature views", "services", "training sets", "model versions", "aliases", "deployments")
#: Versions drawn per model: those an alias points at, then the newest up to this many.
MAX_VERSIONS = 8


def lineage(platform: Any, base: str) -> dict[str, Any]:
    registry = platform.models
    nodes: dict[str, Node] = {}
    edges: list[tuple[str, str]] = []

    def add(key: str, label: str, column: int, href: str, missing: bool = False) -> str:
        nodes.setdefault(key, Node(key, label, column, href, missing))
        return key

    catalog = f"{base}/catalog"
    defs = definitions(platform)
    views = defs.views + defs.on_demand
    for view in views:
        v = add(f"view:{view.name}", view.name, 1, f"{catalog}/views/{view.name}" if hasattr(view, "source") else f"{catalog}#{view.name}")
        for source in ([view.source] if hasattr(view, "source") else [s for s in view.sources if not hasattr(s, "entities")]):
            edges.append((add(f"source:{source.name}", source.name, 0, f"{catalog}#source-{source.name}"), v))
        for parent in getattr(view, "sources", ()):
            if hasattr(parent, "entities"):
                edges.append((f"view:{parent.name}", v))
    for service in defs.services:
        s = add(f"service:{service.name}", service.name, 2, f"{catalog}#service-{service.name}")
        for view in sorted({ref.split(":", 1)[0] for ref in service.features}):
            edges.append((f"view:{view}", s))
    serving = platform.config.serving
    for name in registry.names():
        versions = registry.list(name)
        aliases = registry.aliases(name)
        keep = set(aliases.values()) | {mv.version for mv in versions[-MAX_VERSIONS:]}
        for mv in versions:
            if mv.version not in keep:
                continue
            m = add(f"model:{name}:{mv.version}", f"{name} v{mv.version}", 4, f"{base}/models/{name}/{mv.version}")
            ts = mv.lineage.get("training_set")
            service = mv.lineage.get("feature_service") or ((ts or {}).get("metadata") or {}).get("feature_service")
            if isinstance(ts, dict) and ts.get("name"):
                # a snapshot (save_training_set's TrainingSetSnapshot) or a dataset a pipeline trained on
                version = ts.get("version")
                label = f"snapshot {ts['name']}" + (f" v{version}" if version is not None else "")
                t = add(f"ts:{ts['name']}:{version}", label, 3, f"{base}/models/{name}/{mv.version}#training-set")
                if service:
                    edges.append((f"service:{service}", t))
                edges.append((t, m))
            elif service:  # trained on data no snapshot records: said in the snapshot column, not skipped over
                t = add(f"ts:none:{service}", "no snapshot recorded", 3, f"{base}/models/{name}/{mv.version}", missing=True)
                edges += [(f"service:{service}", t), (t, m)]
        for alias, version in sorted(aliases.items()):
            a = add(f"alias:{name}:{alias}", f"{name}@{alias}", 5, f"{base}/models/{name}#alias-{alias}")
            edges.append((f"model:{name}:{version}", a))
            for key, label, href in _deployments(serving, name, alias):
                edges.append((a, add(key, label, 6, f"{base}{href}")))
        for served in serving.models:
            if served.name == name and served.alias in aliases:
                edges.append((f"alias:{name}:{served.alias}",
                              add(f"deploy:v2:{name}", f"/v2/models/{name}", 6, f"{base}/models/{name}")))
    ordered = sorted(nodes.values(), key=lambda n: (n.column, n.label))
    return {"svg": lineage_svg(ordered, edges, COLUMNS), "nodes": ordered}


def _deployments(serving: Any, name: str, alias: str) -> list[tuple[str, str, str]]:
    """Where the Serve application uses ``name@alias``: (node key, label, UI path) each.

    The checkout decision model is the one ``deploy`` was given, which the config does not
    name; every model the config names for another use (a rule model, a policy, a model served
    on /v2 only) is placed by that use, and any other model's ``production`` alias is taken as
    the decision model's."""
    out = []
    offers = getattr(serving, "offers", None)
    rules = {r.model for r in serving.policy.model_rules}
    policy = offers.policy_model if offers is not None else None
    if name == policy:
        if alias == offers.alias:
            out.append(("deploy:offers", "checkout offers", "/decisions"))
        if alias == offers.shadow_alias:
            out.append(("deploy:offers-shadow", "offers shadow", "/decisions"))
        return out
    only_v2 = name in {m.name for m in serving.models} and name not in rules
    if alias == "production" and not only_v2:
        out.append(("deploy:checkout", "checkout decisions", "/decisions"))
    if alias == (serving.policy.shadow_alias or "") and name not in rules and not only_v2:
        out.append(("deploy:checkout-shadow", "checkout shadow", "/decisions"))
    return out
