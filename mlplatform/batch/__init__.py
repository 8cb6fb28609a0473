"""Batch scoring: a registered model over many rows on Ray Data (``platform.batch``)."""

from mlplatform.batch.score import BatchScoreResult, BatchScoring
from mlplatform.batch.scorer import ModelScorer

__all__ = ["BatchScoreResult", "BatchScoring", "ModelScorer"]
