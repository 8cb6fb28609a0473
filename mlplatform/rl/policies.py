"""Offer policies: from an applicant's context and probability of default to a probability
for every offer tier, never above the risk cap.

    policy = ScoredPolicy("greedy_ev", features, offers, score=reward_model.predict,
                          selection=Selection(kind="greedy"))
    probs = policy.probabilities(contexts, probability_of_default)   # float64 [n, K]

Every policy answers the same question — ``probabilities(contexts, pd)`` — so one
off-policy estimator, one offer selector and one model server handle them all: the logging
policy that explores, a reward-model bandit, a policy learned offline with RLlib, or a fixed
rule. Rows sum to 1 and tiers above the cap (``OfferConfig.allowed``) get probability 0.

Selection rules over per-tier scores (expected rewards, logits):

- ``greedy``: probability 1 on the highest-scoring allowed tier (ties: the smaller tier);
- ``softmax``: ``exp(score / temperature)`` over the allowed tiers;
- either, with ``epsilon > 0``: mixed with the uniform over the allowed tiers,
  ``(1 - epsilon) * rule + epsilon / |allowed|``, so every allowed tier keeps a propensity of
  at least ``epsilon / K`` — what exploration and off-policy evaluation need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlplatform.errors import DataError
from mlplatform.rl.offers import OfferConfig

__all__ = ["FixedTierPolicy", "Policy", "ScoredPolicy", "Selection", "context_matrix", "select"]


class Selection(BaseModel):
    """How per-tier scores become probabilities (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["greedy", "softmax"] = Field(default="greedy", description="greedy or softmax over the allowed tiers.")
    temperature: float = Field(default=1.0, gt=0.0, description="Softmax temperature, in the scores' units.")
    epsilon: float = Field(default=0.0, ge=0.0, lt=1.0, description="Share of probability spread uniformly over the allowed tiers.")


@runtime_checkable
class Policy(Protocol):
    """What every offer policy provides."""

    name: str
    features: tuple[str, ...]
    offers: OfferConfig

    def probabilities(self, contexts: Mapping[str, np.ndarray], probability_of_default: np.ndarray) -> np.ndarray:
        """float64 [n, K]: each row sums to 1, tiers above the applicant's cap are 0."""
        ...


def context_matrix(contexts: Mapping[str, np.ndarray], features: Sequence[str]) -> np.ndarray:
    """The context features as a float64 matrix [n, len(features)], columns in ``features`` order.

    Raises:
        DataError: a feature is missing, not numeric, not finite, or the columns differ in length.
    """
    if not isinstance(contexts, Mapping):
        raise DataError(f"contexts must be a mapping of feature name to values, got {type(contexts).__name__}")
    missing = [f for f in features if f not in contexts]
    if missing:
        raise DataError(f"context is missing features {missing}; the policy reads {list(features)}")
    columns = []
    for name in features:
        try:
            column = np.asarray(contexts[name], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"context feature {name!r} must be numeric, got {contexts[name]!r:.80}") from None
        if not np.isfinite(column).all():
            raise DataError(f"context feature {name!r} has a missing or infinite value at row {int(np.flatnonzero(~np.isfinite(column))[0])}")
        columns.append(column)
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise DataError(f"context features differ in length: {dict(zip(features, map(len, columns), strict=True))}")
    return np.stack(columns, axis=1) if columns else np.zeros((0, 0))


def select(scores: np.ndarray, allowed: np.ndarray, selection: Selection) -> np.ndarray:
    """Probabilities [n, K] from per-tier ``scores`` [n, K] under ``allowed`` [n, K] (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    allowed = np.asarray(allowed, dtype=bool)
    if scores.shape != allowed.shape:
        raise DataError(f"scores {scores.shape} and allowed {allowed.shape} differ in shape")
    if not allowed.any(axis=1).all():
        raise DataError("every row must allow at least one tier")
    masked = np.where(allowed, scores, -np.inf)
    if selection.kind == "greedy":
        probs = np.zeros_like(scores)
        probs[np.arange(len(scores)), np.argmax(masked, axis=1)] = 1.0  # argmax: first (smallest) tier on ties
    else:
        z = (masked - masked.max(axis=1, keepdims=True)) / selection.temperature
        e = np.where(allowed, np.exp(z), 0.0)
        probs = e / e.sum(axis=1, keepdims=True)
    if selection.epsilon > 0:
        uniform = allowed / allowed.sum(axis=1, keepdims=True)
        probs = (1.0 - selection.epsilon) * probs + selection.epsilon * uniform
    return probs


class ScoredPolicy:
    """A policy that scores every tier with ``score(X) -> [n, K]`` (X: ``context_matrix``) and
    selects by ``selection``; e.g. a reward model per tier with greedy selection."""

    def __init__(
        self,
        name: str,
        features: Sequence[str],
        offers: OfferConfig,
        score: Callable[[np.ndarray], np.ndarray],
        selection: Selection | None = None,
    ) -> None:
        self.name = name
        self.features = tuple(features)
        self.offers = offers
        self.score = score
        self.selection = selection or Selection()

    def __repr__(self) -> str:
        return f"ScoredPolicy({self.name!r}, {self.selection.kind}, epsilon={self.selection.epsilon})"

    def probabilities(self, contexts: Mapping[str, np.ndarray], probability_of_default: np.ndarray) -> np.ndarray:
        x = context_matrix(contexts, self.features)
        allowed = self.offers.allowed(probability_of_default)
        if len(allowed) != len(x):
            raise DataError(f"{len(x)} contexts but {len(allowed)} probabilities of default")
        scores = np.asarray(self.score(x), dtype=np.float64)
        if scores.shape != allowed.shape:
            raise DataError(f"policy {self.name!r} scored shape {scores.shape}, expected {allowed.shape}")
        return select(scores, allowed, self.selection)


class FixedTierPolicy:
    """Always the named tier, or the applicant's cap when the tier is above it (a reference rule)."""

    def __init__(self, tier: str, offers: OfferConfig, features: Sequence[str] = ()) -> None:
        if tier not in offers.names:
            raise DataError(f"unknown tier {tier!r}; the tiers are {offers.names}")
        self.name = f"fixed_{tier}"
        self.tier = offers.names.index(tier)
        self.features = tuple(features)
        self.offers = offers

    def probabilities(self, contexts: Mapping[str, np.ndarray], probability_of_default: np.ndarray) -> np.ndarray:
        top = self.offers.max_tier_index(probability_of_default)
        probs = np.zeros((len(top), len(self.offers.tiers)))
        probs[np.arange(len(top)), np.minimum(top, self.tier)] = 1.0
        return probs
