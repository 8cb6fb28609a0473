"""The registered definitions as the pages read them, built once per registry revision.

Building a definition validates it (pydantic), which for a registry of 1,000 features costs
hundreds of milliseconds; the registry only changes by ``apply``, which writes a new revision,
so the built lists are kept until the revision number moves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["Definitions", "definitions"]


@dataclass(frozen=True)
class Definitions:
    revision: int
    entities: list[Any]
    sources: list[Any]
    stream_sources: list[Any]
    views: list[Any]
    on_demand: list[Any]
    services: list[Any]

    def view(self, name: str) -> Any | None:
        return next((v for v in self.views if v.name == name), None)


_lock = threading.Lock()
_built: dict[int, Definitions] = {}


def definitions(platform: Any) -> Definitions:
    """The definitions registered under ``platform``'s root, at the registry's latest revision."""
    features = platform.features
    revision = features.registry.revision()
    key = id(features)
    found = _built.get(key)
    if found is not None and found.revision == revision:
        return found
    with _lock:
        built = Definitions(
            revision, features.list_entities(), features.list_sources(), features.list_stream_sources(),
            features.list_feature_views(), features.list_on_demand_feature_views(), features.list_feature_services(),
        )
        _built[key] = built
        return built
