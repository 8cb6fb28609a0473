"""The feature planner: which views a list of feature references reads, and what the entity
rows must carry. One plan for training sets (``retrieval``), online lookup (``online_lookup``)
and so for serving, which looks features up through it: offline and online read the same
columns for the same references.

    plan = plan_features(store, ["applicant_history:loans_30d", "checkout_features:order_amount"])
    plan.views              # {"applicant_history": (FeatureView, ["loans_30d", ...every feature])}
    plan.on_demand          # {"checkout_features": (OnDemandFeatureView, ["order_amount"])}
    plan.entity_columns()   # {"applicant_id": "join key of view 'applicant_history'", "amount": ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mlplatform.features.definitions import FeatureView, OnDemandFeatureView, RequestSource, parse_ref

__all__ = ["FeaturePlan", "ViewResolver", "plan_features"]


class ViewResolver(Protocol):
    """What the planner asks for a view by name: the ``FeatureStore``, or serving's cached
    ``FeatureCatalog``."""

    def resolve_view(self, name: str) -> FeatureView | OnDemandFeatureView: ...


@dataclass(frozen=True)
class FeaturePlan:
    """The views a request reads, each with its feature names in first-requested order.

    ``views``: stored views by name, in the order first needed: the requested ones, then the
    sources of on-demand views. Each lists the features to read: those requested and, for a
    source of an on-demand view, every feature of it (the on-demand function gets them all).
    ``on_demand``: on-demand views by name, each with the features requested of it.
    """

    views: dict[str, tuple[FeatureView, list[str]]]
    on_demand: dict[str, tuple[OnDemandFeatureView, list[str]]]

    def entity_columns(self) -> dict[str, str]:
        """The columns each entity row must hold, each with why: the join keys of every view
        read (in ``views`` order), then the request fields of the on-demand views."""
        needed: dict[str, str] = {}
        for view, _ in self.views.values():
            for key in view.join_keys:
                needed.setdefault(key, f"join key of view {view.name!r}")
        for odfv, _ in self.on_demand.values():
            for source in odfv.sources:
                if isinstance(source, RequestSource):
                    for f in source.schema_:
                        needed.setdefault(f.name, f"request field of on-demand view {odfv.name!r}")
        return needed


def plan_features(resolver: ViewResolver, refs: Sequence[str]) -> FeaturePlan:
    """Plan reading ``refs`` (``"view:feature"``, already checked): the views to read and the
    features of each, including every feature of the views on-demand views are computed from.

        plan_features(store, ["applicant_history:loans_30d"]).views["applicant_history"][1]
        # ["loans_30d"]

    Raises:
        DefinitionError / NotFoundError: a reference is malformed or names an unknown view.
    """
    views: dict[str, tuple[FeatureView, list[str]]] = {}
    on_demand: dict[str, tuple[OnDemandFeatureView, list[str]]] = {}
    for ref in refs:
        view_name, feature = parse_ref(ref)
        view = resolver.resolve_view(view_name)
        if isinstance(view, FeatureView):
            wanted = views.setdefault(view.name, (view, []))[1]
        else:
            wanted = on_demand.setdefault(view.name, (view, []))[1]
        if feature not in wanted:
            wanted.append(feature)
    for odfv, _ in list(on_demand.values()):
        for source in odfv.sources:
            if isinstance(source, FeatureView):
                wanted = views.setdefault(source.name, (source, []))[1]
                for f in source.features:
                    if f.name not in wanted:
                        wanted.append(f.name)
    return FeaturePlan(views, on_demand)
