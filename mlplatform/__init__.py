"""mlplatform: one Ray cluster as a lender's whole ML platform.

    from mlplatform import Platform
    platform = Platform.from_config("configs/local.yaml")

Importing this package starts nothing and loads no heavy module (Ray, torch, LightGBM);
each part imports what it needs when it is first used.
"""

from mlplatform.config import PlatformConfig, load_config
from mlplatform.errors import (
    ConfigError,
    ConflictError,
    DataError,
    DefinitionError,
    DependencyError,
    IntegrityError,
    JobError,
    ModelError,
    NotFoundError,
    PlatformError,
    PromotionRefused,
    QualityError,
    ServingError,
    StorageError,
    TrainingError,
)
from mlplatform.features import (
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
from mlplatform.platform import Platform
from mlplatform.quality import Expectation, Quality

__version__ = "0.1.0"

__all__ = [
    "Aggregation",
    "ConfigError",
    "ConflictError",
    "DataError",
    "DefinitionError",
    "DependencyError",
    "Entity",
    "Expectation",
    "FeatureService",
    "FeatureView",
    "Field",
    "IntegrityError",
    "JobError",
    "ModelError",
    "NotFoundError",
    "OnDemandFeatureView",
    "ParquetSource",
    "Platform",
    "PlatformConfig",
    "PlatformError",
    "PromotionRefused",
    "Quality",
    "QualityError",
    "RequestSource",
    "ServingError",
    "StorageError",
    "StreamSource",
    "TrainingError",
    "load_config",
    "on_demand_feature_view",
]
