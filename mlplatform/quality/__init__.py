"""Data quality: expectations declared with feature views, checked on every backfill,
materialization and training set, and recorded as versioned reports.

    platform.quality.validate("applicant_history")      # -> QualityReport (QualityError under strict)
    platform.quality.reports("applicant_history")       # every recorded report, oldest first
"""

from mlplatform.features.expectations import Expectation, Quality
from mlplatform.quality.report import Check, QualityReport

__all__ = ["Check", "DataQuality", "Expectation", "Quality", "QualityReport"]


def __getattr__(name: str) -> object:
    # DataQuality's modules load numpy and pyarrow: on first use, so that importing
    # mlplatform (which exports the expectations) stays cheap.
    if name == "DataQuality":
        from mlplatform.quality.api import DataQuality

        return DataQuality
    raise AttributeError(name)
