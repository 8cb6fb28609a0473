"""Choosing the offer for approved applications: the acting policy's probabilities under the
risk cap, one tier drawn per decision, and the record the decision log keeps.

    selector = OfferSelector(policy, policy_version=3)
    batch = selector.choose(decision_ids, contexts, probability_of_default)
    batch.tiers, batch.propensities          # the tier offered and its probability
    batch.records()[0]                       # {"tier": "line_1000", "propensity": 0.7, "allowed": [...], ...}

This is what a checkout decision calls once the application is approved; the serving engine
adds ``records()[i]`` to the decision record as its ``offer``, and the simulator uses it to
log its decisions, so both log the same shape.

The draw is a function of the decision id (a uniform from the SHA-256 of the policy's name
and the id, then the inverse of the cumulative probabilities in tier order), so replaying a
decision chooses the same tier, and two replicas deciding the same id agree. Propensities
are checked on every decision: each allowed tier's probability is ``> 0`` only if the
policy explores; the chosen tier's is always ``> 0``, tiers above the cap get exactly 0 and
the row sums to 1. A policy that breaks this is refused (``ModelError``), never served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlplatform.errors import DataError, ModelError
from mlplatform.rl.policies import Policy, context_matrix

__all__ = ["OfferBatch", "OfferSelector", "uniform_draws"]

_TOLERANCE = 1e-9


def uniform_draws(keys: Sequence[str], salt: str) -> np.ndarray:
    """One uniform in [0, 1) per key, a function of ``salt`` and the key only."""
    out = np.empty(len(keys))
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
        out[i] = int.from_bytes(digest[:7], "big") / 2.0**56
    return out


@dataclass(frozen=True)
class OfferBatch:
    """Offers chosen for a batch of decisions (arrays over the batch, in the order given)."""

    decision_ids: tuple[str, ...]
    features: tuple[str, ...]
    contexts: np.ndarray  # float64 [n, d], columns in ``features`` order
    probability_of_default: np.ndarray  # float64 [n]
    tier_names: tuple[str, ...]
    allowed: np.ndarray  # bool [n, K]
    probabilities: np.ndarray  # float64 [n, K]
    actions: np.ndarray  # int64 [n], tier index
    policy: str
    policy_version: int | None

    @property
    def propensities(self) -> np.ndarray:
        return self.probabilities[np.arange(len(self.actions)), self.actions]

    @property
    def tiers(self) -> list[str]:
        return [self.tier_names[a] for a in self.actions]

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able ``offer`` per decision: the tier, its index, its propensity, the allowed
        tiers, every tier's probability, the policy and its version, the context and the PD."""
        out = []
        for i, decision_id in enumerate(self.decision_ids):
            out.append(
                {
                    "decision_id": decision_id,
                    "tier": self.tier_names[int(self.actions[i])],
                    "action": int(self.actions[i]),
                    "propensity": float(self.probabilities[i, self.actions[i]]),
                    "allowed": [n for n, ok in zip(self.tier_names, self.allowed[i], strict=True) if ok],
                    "probabilities": [float(p) for p in self.probabilities[i]],
                    "policy": self.policy,
                    "policy_version": self.policy_version,
                    "context": {f: float(v) for f, v in zip(self.features, self.contexts[i], strict=True)},
                    "probability_of_default": float(self.probability_of_default[i]),
                }
            )
        return out

    def columns(self) -> dict[str, Any]:
        """The batch as columns of the offer log (see ``mlplatform.rl.log``)."""
        cols: dict[str, Any] = {"decision_id": list(self.decision_ids)}
        for j, name in enumerate(self.features):
            cols[name] = self.contexts[:, j]
        cols |= {
            "probability_of_default": self.probability_of_default,
            "action": self.actions,
            "tier": self.tiers,
            "propensity": self.propensities,
            "allowed": [row.tolist() for row in self.allowed],
            "probabilities": [row.tolist() for row in self.probabilities],
            "policy": [self.policy] * len(self.actions),
            "policy_version": [self.policy_version] * len(self.actions),
        }
        return cols


class OfferSelector:
    """Chooses offers with an acting policy; see the module docstring."""

    def __init__(self, policy: Policy, *, policy_version: int | None = None) -> None:
        self.policy = policy
        self.policy_version = policy_version

    def choose(
        self,
        decision_ids: Sequence[str],
        contexts: Mapping[str, np.ndarray],
        probability_of_default: Sequence[float] | np.ndarray,
    ) -> OfferBatch:
        """The offer for each decision (all approved applications).

        Raises:
            DataError: a context feature or a PD is missing or invalid, or the ids are not unique strings.
            ModelError: the policy's probabilities break the rules above.
        """
        ids = tuple(decision_ids)
        if not all(isinstance(i, str) and i for i in ids):
            raise DataError("decision ids must be non-empty strings")
        x = context_matrix(contexts, self.policy.features)
        pd = np.asarray(probability_of_default, dtype=np.float64).reshape(-1)
        allowed = self.policy.offers.allowed(pd)
        if len(ids) != len(pd) or (self.policy.features and len(x) != len(pd)):
            raise DataError(f"{len(ids)} decision ids, {len(x)} contexts and {len(pd)} probabilities of default differ")
        probs = np.asarray(self.policy.probabilities(contexts, pd), dtype=np.float64)
        check_probabilities(probs, allowed, self.policy.name)
        cumulative = np.cumsum(probs, axis=1)
        u = uniform_draws(ids, self.policy.name) * cumulative[:, -1]
        actions = (u[:, None] >= cumulative).sum(axis=1)
        # A draw past a tier's end lands on the next tier with positive probability, never on a zero one.
        actions = np.minimum(actions, probs.shape[1] - 1)
        zero = probs[np.arange(len(actions)), actions] <= 0
        if zero.any():  # only from rounding at the very top of a row: take the last tier with mass
            last = probs.shape[1] - 1 - np.argmax((probs > 0)[:, ::-1], axis=1)
            actions = np.where(zero, last, actions)
        return OfferBatch(
            decision_ids=ids,
            features=tuple(self.policy.features),
            contexts=x if self.policy.features else np.zeros((len(ids), 0)),
            probability_of_default=pd,
            tier_names=tuple(self.policy.offers.names),
            allowed=allowed,
            probabilities=probs,
            actions=actions.astype(np.int64),
            policy=self.policy.name,
            policy_version=self.policy_version,
        )


def check_probabilities(probs: np.ndarray, allowed: np.ndarray, policy: str) -> None:
    """Refuse probabilities that are not a distribution over the allowed tiers.

    Raises:
        ModelError: shape differs, a value is negative or not finite, a tier above the cap
            has probability, or a row does not sum to 1.
    """
    if probs.shape != allowed.shape:
        raise ModelError(f"policy {policy!r} gave probabilities of shape {probs.shape}, expected {allowed.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ModelError(f"policy {policy!r} gave a negative or non-finite probability")
    above = (probs > 0) & ~allowed
    if above.any():
        row = int(np.flatnonzero(above.any(axis=1))[0])
        raise ModelError(f"policy {policy!r} put probability on a tier above the risk cap (row {row}): refused")
    sums = probs.sum(axis=1)
    if (np.abs(sums - 1.0) > 1e-6).any():
        row = int(np.flatnonzero(np.abs(sums - 1.0) > 1e-6)[0])
        raise ModelError(f"policy {policy!r} probabilities sum to {sums[row]!r} at row {row}, not 1")
