"""The feature store: definitions as code, a versioned registry, offline and online data."""

from mlplatform.features.definitions import (
    Aggregation,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    OnDemandFeatureView,
    ParquetSource,
    RequestSource,
    StreamSource,
    on_demand_feature_view,
)

__all__ = [
    "Aggregation",
    "Entity",
    "FeatureService",
    "FeatureView",
    "Field",
    "OnDemandFeatureView",
    "ParquetSource",
    "RequestSource",
    "StreamSource",
    "on_demand_feature_view",
]
