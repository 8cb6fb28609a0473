"""Feature definitions resolved once, for the request path.

    catalog = FeatureCatalog(platform.features)
    get_online_features(catalog, "underwriting_v1", entities)   # same semantics, no registry reads

``mlplatform.features.online_lookup.get_online_features`` takes a feature store and asks its registry
for every view on every call; the registry re-reads its revision from storage and rebuilds
each definition (hashing the on-demand function's source) each time: milliseconds per call.
A ``FeatureCatalog`` stands in for the store there: it answers ``resolve_features``,
``registry.resolve_view`` and ``online_store`` from definitions resolved once, and
``refresh()`` (called in the background, not per request) drops them when the registry's
revision moves, so an ``apply`` reaches running replicas within the refresh interval.

The cached views are copies whose ``features`` tuple is computed once: a view defined by
aggregations otherwise rebuilds its ``Field`` objects (pydantic validation) on every
``.features`` access, which lookup does per call, per view. The copies are the registry's
definitions field for field; only that derived tuple is stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mlplatform.errors import DefinitionError
from mlplatform.features.definitions import FeatureService, parse_ref

if TYPE_CHECKING:
    from mlplatform.features.definitions import FeatureView, OnDemandFeatureView
    from mlplatform.features.store import FeatureStore
    from mlplatform.online import OnlineStore

__all__ = ["MAX_CHECKED", "FeatureCatalog"]

#: How many distinct checked feature lists a catalog remembers.
MAX_CHECKED = 256


class FeatureCatalog:
    """A read-through cache of the feature registry with the store interface lookup needs."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store
        self.online_store: OnlineStore = store.online_store
        self._lock = threading.Lock()
        self._revision = store.registry.revision()
        self._views: dict[str, FeatureView | OnDemandFeatureView] = {}
        self._services: dict[str, list[str]] = {}
        # Checked ref lists, most recently used last: bounded, since callers choose the lists.
        self._checked: OrderedDict[tuple[str, ...], None] = OrderedDict()

    @property
    def registry(self) -> FeatureCatalog:
        """Lookup calls ``store.registry.resolve_view``: the catalog answers for the registry."""
        return self

    def resolve_view(self, name: str) -> FeatureView | OnDemandFeatureView:
        view = self._views.get(name)
        if view is None:
            with self._lock:
                view = self._views.get(name)
                if view is None:
                    view = _with_fixed_features(self._store.registry.resolve_view(name))
                    self._views = {**self._views, name: view}
        return view

    def service_refs(self, name: str) -> list[str]:
        """The checked ``view:feature`` refs of feature service ``name``."""
        refs = self._services.get(name)
        if refs is None:
            refs = self._check(list(self._store.get_feature_service(name).features))
            self._services = {**self._services, name: refs}
        return refs

    def resolve_features(self, features: FeatureService | str | Iterable[str]) -> list[str]:
        """As ``FeatureStore.resolve_features``, from the cache."""
        if isinstance(features, FeatureService):
            return self._check(list(features.features))
        if isinstance(features, str):
            return self._check([features]) if ":" in features else self.service_refs(features)
        refs = list(features)
        if not refs:
            raise DefinitionError("no features requested: pass a FeatureService or a list of 'view:feature' refs")
        return self._check(refs)

    def _check(self, refs: list[str]) -> list[str]:
        """``refs`` once each names a registered view's feature; a list is remembered (at most
        ``MAX_CHECKED`` of them, the oldest dropped first) only after it passed."""
        key = tuple(refs)
        if key in self._checked:
            return refs
        for ref in refs:
            view, feature = parse_ref(ref)
            self.resolve_view(view).feature(feature)
        with self._lock:
            self._checked[key] = None
            while len(self._checked) > MAX_CHECKED:
                self._checked.popitem(last=False)
        return refs

    def refresh(self) -> bool:
        """Forget the cache if the registry has a new revision; True if it had."""
        revision = self._store.registry.revision()
        if revision == self._revision:
            return False
        with self._lock:
            self._revision, self._views, self._services, self._checked = revision, {}, {}, OrderedDict()
        return True


def _with_fixed_features(view: FeatureView | OnDemandFeatureView) -> FeatureView | OnDemandFeatureView:
    """A copy of ``view`` (and of an on-demand view's source views) whose ``features`` is a
    stored tuple: ``FeatureView.features`` returns ``schema_`` when it is set."""
    from mlplatform.features.definitions import FeatureView

    if isinstance(view, FeatureView):
        return view if view.schema_ else view.model_copy(update={"schema_": view.features})
    sources = tuple(_with_fixed_features(s) if isinstance(s, FeatureView) else s for s in view.sources)
    return view.model_copy(update={"sources": sources})
