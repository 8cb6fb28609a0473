"""Every error mlplatform raises on purpose. Anything else escaping the platform is a bug.

    PlatformError
     ├── ConfigError          a config file or mapping is invalid (names the field and value)
     ├── DependencyError      an optional dependency is missing (gives the pip install line)
     ├── StorageError         reading or writing under the storage root failed
     │    ├── NotFoundError   the dataset, artifact or registry object does not exist
     │    ├── ConflictError   another writer committed first / the change is not allowed
     │    └── IntegrityError  stored bytes do not match their recorded sha256
     ├── DefinitionError      a feature definition or feature reference is invalid
     ├── DataError            input data is unusable (missing column, bad timestamp, bad value)
     │    └── QualityError    data failed a strict view's expectations; nothing was published
     ├── TrainingError        a training or tuning run failed
     ├── ModelError           a model version cannot be registered, found or loaded
     ├── PromotionRefused     the promotion gate refused a version (the message lists every figure)
     ├── ServingError         the online path cannot be deployed or answered
     └── JobError             a Ray job could not be submitted or failed

A message says what was wrong, the offending value, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "DataError",
    "DefinitionError",
    "DependencyError",
    "IntegrityError",
    "JobError",
    "ModelError",
    "NotFoundError",
    "PlatformError",
    "PromotionRefused",
    "QualityError",
    "ServingError",
    "StorageError",
    "TrainingError",
]


class PlatformError(Exception):
    """Base class of every error the platform raises deliberately."""


class ConfigError(PlatformError):
    """A configuration is invalid; the message names each bad field and its value."""


class DependencyError(PlatformError):
    """An optional dependency is not installed."""

    @classmethod
    def missing(cls, module: str, package: str, purpose: str) -> DependencyError:
        return cls(f"{purpose} needs the '{module}' module, which is not installed: pip install '{package}'")


class StorageError(PlatformError):
    """Reading or writing under the storage root failed."""


class NotFoundError(StorageError):
    """The requested dataset, artifact, definition or model does not exist."""


class ConflictError(StorageError):
    """A concurrent writer won, or the change would silently break existing data."""


class IntegrityError(StorageError):
    """Stored bytes do not match the sha256 recorded when they were written."""


class DefinitionError(PlatformError):
    """A feature definition, feature service or feature reference is invalid."""


class DataError(PlatformError):
    """Input data cannot be used: a missing column, a bad timestamp, an impossible value."""


class QualityError(DataError):
    """Data failed the expectations of a view whose quality policy is ``strict``; the message
    names the view, feature, expectation, observed value and bound. Nothing was published:
    the previous offline version and online generation stay current."""


class TrainingError(PlatformError):
    """A training or tuning run failed or was misconfigured."""


class ModelError(PlatformError):
    """A model version cannot be registered, found or safely loaded."""


class PromotionRefused(PlatformError):
    """The promotion gate refused to point ``production`` at a version: it compared worse than
    the current production version, or could not be compared. The message shows every figure
    and bound; ``decision`` holds them (a ``mlplatform.models.gate.PromotionDecision``). The
    refusal is recorded in the alias history. Override with ``force=True`` and a reason."""

    def __init__(self, message: str, decision: object = None) -> None:
        super().__init__(message)
        self.decision = decision


class ServingError(PlatformError):
    """The online path (feature server, decision service) cannot be deployed or answered."""


class JobError(PlatformError):
    """A Ray job could not be submitted, or it failed."""
