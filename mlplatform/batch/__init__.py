"""Batch scoring: a registered model over many rows on Ray Data (``platform.batch``)."""

from mlplatform.batch.score import BatchScoreResult, BatchScoring, ModelScorer

__all__ = ["BatchScoreResult", "BatchScoring", "ModelScorer"]
