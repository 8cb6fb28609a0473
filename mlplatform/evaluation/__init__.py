"""Evaluation of default scores (``metrics``) and the model card that presents it (``card``)."""

from mlplatform.evaluation.card import write_model_card
from mlplatform.evaluation.metrics import Evaluation, evaluate

__all__ = ["Evaluation", "evaluate", "write_model_card"]
