"""Data quality: expectations declared with feature views, checked on every backfill,
materialization and training set, and recorded as versioned reports.

    platform.quality.validate("applicant_history")      # -> QualityReport (QualityError under strict)
    platform.quality.reports("applicant_history")       # every recorded report, oldest first
"""

from mlplatform.quality.expectations import Expectation, Quality
from mlplatform.quality.report import Check, QualityReport

__all__ = ["Check", "DataQuality", "Expectation", "Quality", "QualityReport"]


def __getattr__(name: str) -> object:
    # DataQuality reaches the feature store and Ray; loading it on first use keeps
    # ``mlplatform.features.definitions`` (which imports the expectations) free of cycles.
    if name == "DataQuality":
        from mlplatform.quality.api import DataQuality

        return DataQuality
    raise AttributeError(name)
