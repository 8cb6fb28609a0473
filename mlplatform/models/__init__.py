"""Models: the registry (versions, aliases, lineage, checksummed safe artifacts), the flavors
that turn a version into a predictor (``mlplatform.models.flavors``) and the reason codes
that explain a score (``mlplatform.models.reasons``)."""

from mlplatform.models.registry import LoadedModel, ModelRegistry, ModelVersion

__all__ = ["LoadedModel", "ModelRegistry", "ModelVersion"]
