"""The feature registry: every applied definition, versioned by content, under the storage root.

    result = registry.apply([applicant, history, underwriting_v1])
    print(result)          # + feature_view applicant_history (new, version c94a010cdbd5) ...
    registry.get("feature_view", "applicant_history")

The registry's state is one JSON document per revision (``registry/features/revisions/N.json``),
created with an exclusive write, so concurrent ``apply`` calls serialize: the loser re-diffs
against the winner and retries. Each object's version is the hash of its spec; applying the
same definitions again changes nothing and writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlplatform.errors import ConflictError, DefinitionError, NotFoundError
from mlplatform.features.definitions import (
    KINDS,
    Definition,
    FeatureView,
    OnDemandFeatureView,
    load_udf,
    parse_ref,
)
from mlplatform.storage import Storage

__all__ = ["ApplyResult", "Change", "FeatureRegistry"]

_PREFIX = "registry/features/revisions"
_ORDER = ["entity", "source", "stream_source", "request_source", "feature_view", "on_demand_feature_view", "feature_service"]


@dataclass(frozen=True)
class Change:
    """One object's change in an ``apply``: added, changed or unchanged."""

    kind: str
    name: str
    action: str
    old_version: str | None
    new_version: str
    details: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.action == "added":
            return f"+ {self.kind} {self.name} (new, version {self.new_version})"
        if self.action == "changed":
            detail = "; ".join(self.details)
            return f"~ {self.kind} {self.name} {self.old_version} -> {self.new_version}" + (f": {detail}" if detail else "")
        return f"= {self.kind} {self.name} (unchanged, version {self.new_version})"


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did: the new revision (None for a dry run or a no-op) and every change."""

    revision: int | None
    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False

    @property
    def changed(self) -> list[Change]:
        return [c for c in self.changes if c.action != "unchanged"]

    def __str__(self) -> str:
        if not self.changed:
            return f"no changes ({len(self.changes)} definitions up to date)"
        head = "would apply" if self.dry_run else f"applied revision {self.revision}"
        lines = [str(c) for c in self.changed]
        unchanged = len(self.changes) - len(self.changed)
        return "\n".join([f"{head}:", *lines] + ([f"({unchanged} unchanged)"] if unchanged else []))


class FeatureRegistry:
    """Definitions stored under ``registry/features`` of the storage root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._cache: tuple[int, dict[str, Any]] | None = None

    # ----------------------------------------------------------------------- reading
    def revision(self) -> int:
        names = self.storage.list(_PREFIX)
        numbers = [int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()]
        return max(numbers, default=0)

    def state(self) -> dict[str, Any]:
        """The latest revision's document: ``{"revision", "applied_at", "objects": {kind: {name: entry}}}``."""
        rev = self.revision()
        if rev == 0:
            return {"revision": 0, "objects": {}}
        if self._cache and self._cache[0] == rev:
            return self._cache[1]
        state = self.storage.read_json(f"{_PREFIX}/{rev:012d}.json")
        self._cache = (rev, state)
        return state

    def list(self, kind: str) -> list[Definition]:
        """Every registered object of ``kind`` (entity, source, feature_view, …), by name."""
        self._check_kind(kind)
        objects = self.state()["objects"].get(kind, {})
        return [self.get(kind, name) for name in sorted(objects)]

    def get(self, kind: str, name: str) -> Definition:
        """Rebuild the registered object ``name`` of ``kind``.

        Raises:
            NotFoundError: nothing of that kind and name has been applied.
        """
        self._check_kind(kind)
        objects = self.state()["objects"]
        entry = objects.get(kind, {}).get(name)
        if entry is None:
            known = sorted(objects.get(kind, {}))
            raise NotFoundError(f"no {kind} named {name!r} is registered; registered: {known or 'none'} (run apply)")
        return self._build(kind, entry["spec"], objects)

    def history(self, kind: str, name: str) -> list[dict[str, Any]]:
        self.get(kind, name)
        return list(self.state()["objects"][kind][name]["history"])

    def resolve_view(self, name: str) -> FeatureView | OnDemandFeatureView:
        objects = self.state()["objects"]
        for kind in ("feature_view", "on_demand_feature_view"):
            if name in objects.get(kind, {}):
                return self.get(kind, name)  # type: ignore[return-value]
        raise NotFoundError(f"no feature view named {name!r} is registered (run apply)")

    # ----------------------------------------------------------------------- writing
    def apply(
        self,
        objects: Iterable[Definition],
        *,
        force: bool = False,
        dry_run: bool = False,
        has_data: Callable[[FeatureView], bool] = lambda view: False,
    ) -> ApplyResult:
        """Validate ``objects`` and record them as the next revision.

        Entities and sources used by a view are registered with it. Nothing that is applied
        but absent from ``objects`` is removed.

        Raises:
            DefinitionError: a definition is invalid: two different objects share a name, a
                reference names an unknown view or feature, or an entity is redefined.
            ConflictError: a view that already has offline data would change how that data is
                computed; pass ``force=True`` to record the new version (then backfill it).
        """
        incoming = _expand(objects)
        for _attempt in range(20):
            base = self.state()
            changes, new_objects = self._diff(base, incoming, force=force, has_data=has_data)
            if dry_run or not any(c.action != "unchanged" for c in changes):
                return ApplyResult(revision=None, changes=changes, dry_run=dry_run)
            revision = base["revision"] + 1
            doc = {"revision": revision, "applied_at": datetime.now(UTC).isoformat(), "objects": new_objects}
            if self.storage.create_json(f"{_PREFIX}/{revision:012d}.json", doc):
                self._cache = (revision, doc)
                return ApplyResult(revision=revision, changes=changes)
            time.sleep(0.02)  # another apply won this revision: diff again against it
        raise ConflictError("could not apply definitions: other applies kept winning; retry")

    # ---------------------------------------------------------------------- internals
    def _diff(
        self,
        base: dict[str, Any],
        incoming: dict[tuple[str, str], Definition],
        *,
        force: bool,
        has_data: Callable[[FeatureView], bool],
    ) -> tuple[list[Change], dict[str, Any]]:
        objects = {kind: dict(entries) for kind, entries in base["objects"].items()}
        _check_names_unique(incoming, objects)
        now = datetime.now(UTC).isoformat()
        changes = []
        for (kind, name), obj in sorted(incoming.items(), key=lambda kv: (_ORDER.index(kv[0][0]), kv[0][1])):
            spec, version = obj.spec(), obj.version
            old = objects.get(kind, {}).get(name)
            if old is not None and old["version"] == version:
                changes.append(Change(kind, name, "unchanged", version, version))
                continue
            if old is None:
                changes.append(Change(kind, name, "added", None, version))
                history = []
            else:
                details = _describe(old["spec"], spec)
                if kind == "feature_view":
                    old_view = self._build(kind, old["spec"], base["objects"])
                    assert isinstance(obj, FeatureView) and isinstance(old_view, FeatureView)
                    if old_view.data_version != obj.data_version and has_data(old_view) and not force:
                        raise ConflictError(
                            f"feature view {name!r} already has offline data and this change alters how it is "
                            f"computed ({'; '.join(details)}); apply with force=True (--force) to record version "
                            f"{version}, then backfill it, or give the view a new name"
                        )
                changes.append(Change(kind, name, "changed", old["version"], version, tuple(details)))
                history = list(old["history"])
            entry = {"version": version, "spec": spec, "applied_at": now}
            if isinstance(obj, FeatureView):
                entry["data_version"] = obj.data_version
            entry["history"] = history + [{"version": version, "applied_at": now}]
            objects.setdefault(kind, {})[name] = entry
        _check_references(objects)
        return changes, objects

    def _build(self, kind: str, spec: dict[str, Any], objects: dict[str, Any]) -> Definition:
        if kind == "on_demand_feature_view":
            sources = []
            for src in spec["sources"]:
                entry = objects.get(src["kind"], {}).get(src["name"])
                if entry is None:
                    raise DefinitionError(f"on-demand view {spec['name']!r} uses unknown {src['kind']} {src['name']!r}")
                sources.append(self._build(src["kind"], entry["spec"], objects))
            udf = load_udf(spec["udf"])
            view = OnDemandFeatureView(
                name=spec["name"], description=spec["description"], sources=tuple(sources), schema=spec["schema"], udf=udf,
                mode=spec.get("mode", "pandas"),
            )
            if view.udf_hash != spec["udf_hash"]:
                raise DefinitionError(
                    f"on-demand view {spec['name']!r}: the code of {spec['udf']} changed since it was applied "
                    f"({spec['udf_hash']} -> {view.udf_hash}); apply the definitions again"
                )
            return view
        return KINDS[kind].model_validate(spec)

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise DefinitionError(f"unknown definition kind {kind!r}; use one of {sorted(KINDS)}")


def _expand(objects: Iterable[Definition]) -> dict[tuple[str, str], Definition]:
    """Key every object by (kind, name), adding the entities and sources views use."""
    found: dict[tuple[str, str], Definition] = {}

    def add(obj: Definition) -> None:
        if not isinstance(obj, tuple(KINDS.values())):
            raise DefinitionError(
                f"cannot apply {obj!r}: expected Entity, ParquetSource, StreamSource, FeatureView, RequestSource, "
                "OnDemandFeatureView or FeatureService"
            )
        key = (obj.kind, obj.name)
        if key in found and found[key].version != obj.version:
            raise DefinitionError(
                f"two different {obj.kind} definitions are both named {obj.name!r}; rename one "
                f"(versions {found[key].version} and {obj.version})"
            )
        found[key] = obj
        if isinstance(obj, FeatureView):
            for entity in obj.entities:
                add(entity)
            add(obj.source)
        if isinstance(obj, OnDemandFeatureView):
            for src in obj.sources:
                add(src)

    for obj in objects:
        add(obj)
    return found


def _check_names_unique(incoming: dict[tuple[str, str], Definition], objects: dict[str, Any]) -> None:
    views = {name for (kind, name) in incoming if kind == "feature_view"}
    odfvs = {name for (kind, name) in incoming if kind == "on_demand_feature_view"}
    views |= set(objects.get("feature_view", {}))
    odfvs |= set(objects.get("on_demand_feature_view", {}))
    both = sorted(views & odfvs)
    if both:
        raise DefinitionError(f"names {both} are used by both a feature view and an on-demand view; refs must be unique")


def _check_references(objects: dict[str, Any]) -> None:
    features: dict[str, set[str]] = {}
    for kind in ("feature_view", "on_demand_feature_view"):
        for name, entry in objects.get(kind, {}).items():
            spec = entry["spec"]
            names = {f["name"] for f in spec["schema"]}
            if kind == "feature_view" and spec["aggregations"]:
                names = {FeatureView.model_validate(spec).features[i].name for i in range(len(spec["aggregations"]))}
            features[name] = names
    for name, entry in objects.get("feature_view", {}).items():
        for ent in entry["spec"]["entities"]:
            registered = objects.get("entity", {}).get(ent["name"])
            if registered and registered["spec"]["join_keys"] != ent["join_keys"]:
                raise DefinitionError(
                    f"feature view {name!r} uses entity {ent['name']!r} with join keys {ent['join_keys']}, but the "
                    f"registered entity has {registered['spec']['join_keys']}"
                )
    for name, entry in objects.get("on_demand_feature_view", {}).items():
        for src in entry["spec"]["sources"]:
            if src["name"] not in objects.get(src["kind"], {}):
                raise DefinitionError(f"on-demand view {name!r} uses unknown {src['kind']} {src['name']!r}")
    for name, entry in objects.get("feature_service", {}).items():
        for ref in entry["spec"]["features"]:
            view, feature = parse_ref(ref)
            if view not in features:
                raise DefinitionError(
                    f"feature service {name!r}: reference {ref!r} names unknown view {view!r}; known: {sorted(features)}"
                )
            if feature not in features[view]:
                raise DefinitionError(
                    f"feature service {name!r}: view {view!r} has no feature {feature!r}; it has {sorted(features[view])}"
                )


def _describe(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two specs of one object."""
    details = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in ("schema", "aggregations") and isinstance(a, list) and isinstance(b, list):
            def names(items: list[dict[str, Any]]) -> dict[str, Any]:
                return {i.get("name") or f"{i.get('column')}_{i.get('function')}_{i.get('window')}": i for i in items}

            na, nb = names(a), names(b)
            details += [f"+ {key[:-1] if key == 'aggregations' else 'feature'} {n}" for n in sorted(set(nb) - set(na))]
            details += [f"- {key[:-1] if key == 'aggregations' else 'feature'} {n}" for n in sorted(set(na) - set(nb))]
            details += [f"{n} changed" for n in sorted(set(na) & set(nb)) if na[n] != nb[n]]
        elif key == "quality" and isinstance(a, dict) and isinstance(b, dict):
            details += _describe_quality(a, b)
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            details.append(f"{key} changed")
        else:
            details.append(f"{key}: {a!r} -> {b!r}")
    return details


def _describe_quality(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed in a view's expectations: its policy, staleness, default, and each feature's."""
    details = [f"quality {k}: {old.get(k)!r} -> {new.get(k)!r}" for k in ("policy", "max_staleness")
               if old.get(k) != new.get(k)]
    if old.get("default") != new.get("default"):
        details.append("quality default changed")
    a, b = old.get("features") or {}, new.get("features") or {}
    details += [f"quality of {n} changed" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    return details or ["quality changed"]
