"""The offer in the checkout decision: for each approved application, a credit-line tier
chosen by the acting policy, never above the risk cap the PD sets, with its propensity.

    serving:
      offers:
        tiers: [{name: line_500, amount: 500}, {name: line_1000, amount: 1000}, {name: line_2000, amount: 2000}]
        risk_caps: [{pd_below: 0.03, max_tier: line_2000}, {pd_below: 0.08, max_tier: line_1000}]
        policy_model: credit_line_policy     # a ``policy``-flavor model; omit for the logging policy
        alias: production
        shadow_alias: shadow                 # also logs the shadow policy's choice, marked shadow
        exploration: 0.1                     # epsilon of the logging policy

    offers = DecisionOffers(config, watcher)         # config: ServingOffers (mlplatform.served_offers), watcher: the policy model's
    by_index = offers.choose(decision_ids, rows, probabilities, approved=[0, 2])
    by_index[0]["tier"], by_index[0]["propensity"]   # the record's ``offer``; ``response_offer`` for the client

The **acting policy** is the ``policy_model``'s version under ``alias``, followed by a
``ModelWatcher`` (hot-swapped like the decision model). Without ``policy_model``, or while
no loadable version is under the alias, or when the policy model fails on a row (a missing
context feature, say), the row gets the **logging policy**: the largest allowed tier with
probability ``1 - exploration``, the rest spread uniformly over the allowed tiers (every
allowed tier keeps a propensity > 0). Such a row's offer says why (``fallback_reason``).
A policy model whose tiers or risk caps differ from the configured ones is refused when
loaded (listed in the watcher's failures), so no policy can offer outside the configured cap.

The **context** a policy reads is the decision model's served feature values and the
request's ``amount`` and ``term``; the record keeps it with the PD, the allowed tiers,
every tier's probability, the chosen tier, its propensity and the policy's name and version,
so ``replay`` recomputes the draw (``mlplatform.rl.selection``: a function of the policy's
name and the decision id). Declined and review decisions get no offer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from mlplatform.errors import ModelError
from mlplatform.rl.offers import OfferConfig
from mlplatform.rl.policies import Selection, select
from mlplatform.rl.selection import OfferSelector
from mlplatform.served_offers import ServingOffers

if TYPE_CHECKING:
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.serving.scoring import ModelWatcher

__all__ = ["DecisionOffers", "LoggingPolicy", "load_policy", "response_offer"]

log = logging.getLogger(__name__)

#: Request fields a policy may read beside the decision model's features.
REQUEST_CONTEXT = ("amount", "term")


class LoggingPolicy:
    """The largest allowed tier, with ``epsilon`` spread over the allowed tiers (reads no context)."""

    features: tuple[str, ...] = ()

    def __init__(self, offers: OfferConfig, epsilon: float) -> None:
        self.offers = offers
        self.epsilon = epsilon
        self.name = f"logging_eps_{epsilon!r}"
        self._selection = Selection(kind="greedy", epsilon=epsilon)

    def probabilities(self, contexts: Mapping[str, np.ndarray], probability_of_default: np.ndarray) -> np.ndarray:
        allowed = self.offers.allowed(probability_of_default)
        scores = np.broadcast_to(np.arange(allowed.shape[1], dtype=np.float64), allowed.shape)
        # greedy takes the first of equal scores; scores rise with the tier, so: the largest allowed.
        return select(scores, allowed, self._selection)


def load_policy(models: ModelRegistry, name: str, version: int, offers: OfferConfig) -> Any:
    """Version ``version`` of policy model ``name`` as a ``PolicyModel`` (artifacts verified).

    Raises:
        ModelError: it is not a ``policy``-flavor model, or its tiers or risk caps differ from ``offers``.
    """
    from mlplatform.rl.policy_model import PolicyModel

    mv = models.get(name, version=version)
    if mv.flavor != "policy":
        raise ModelError(f"offer policy {name!r} v{version} has flavor {mv.flavor!r}, not 'policy'")
    _, predictor = models.load_predictor(name, version=version, device="cpu", precision="fp32")  # sha256 verified
    policy = getattr(predictor, "model", None)
    if not isinstance(policy, PolicyModel):
        raise ModelError(f"offer policy {name!r} v{version} did not load as a PolicyModel")
    if policy.offers != offers:
        raise ModelError(
            f"offer policy {name!r} v{version} was trained for tiers {policy.offers.names} and caps "
            f"{[c.model_dump() for c in policy.offers.risk_caps]}, not the configured serving.offers: refused"
        )
    return policy


def response_offer(offer: Mapping[str, Any], config: ServingOffers) -> dict[str, Any]:
    """What the client sees of a logged offer: the tier, its line and installments."""
    tier = config.tiers[int(offer["action"])]
    return {"tier": tier.name, "amount": tier.amount, "installments": tier.installments}


class DecisionOffers:
    """Chooses the offers of a decision batch (see the module docstring)."""

    def __init__(self, config: ServingOffers, watcher: ModelWatcher[Any] | None = None) -> None:
        self.config = config
        self.offer_config = config.offer_config()
        self.watcher = watcher
        self.logging = OfferSelector(LoggingPolicy(self.offer_config, config.exploration))

    def choose(
        self,
        decision_ids: Sequence[str],
        rows: Sequence[Mapping[str, Any]],
        requests: Sequence[Mapping[str, Any]],
        probabilities: Sequence[float],
        approved: Sequence[int],
    ) -> dict[int, dict[str, Any]]:
        """The ``offer`` record of each approved row index (rows: the decision model's served values)."""
        if not approved:
            return {}
        acting = shadow = None
        if self.watcher is not None:
            acting = self._selector(self.config.alias)
            if self.config.shadow_alias is not None:
                shadow = self._selector(self.config.shadow_alias)
                if shadow is not None and acting is not None and shadow.policy_version == acting.policy_version:
                    shadow = None
        contexts = [_context(rows[i], requests[i]) for i in approved]
        ids = [decision_ids[i] for i in approved]
        pds = [probabilities[i] for i in approved]
        reason = None if acting is not None else ("policy_model_unavailable" if self.watcher is not None else None)
        out = self._choose(acting or self.logging, ids, contexts, pds, reason)
        if shadow is not None:
            for doc, s in zip(out, self._choose(shadow, ids, contexts, pds, None, shadow=True)):
                doc["shadow"] = {"alias": self.config.shadow_alias, "shadow": True,
                                 **{k: s[k] for k in ("tier", "action", "propensity", "policy", "policy_version", "error") if k in s}}
        return dict(zip(approved, out))

    def _selector(self, alias: str) -> OfferSelector | None:
        policy = self.watcher.current(alias)
        return None if policy is None else OfferSelector(policy, policy_version=self.watcher.current_version(alias))

    def _choose(
        self, selector: OfferSelector, ids: list[str], contexts: list[dict[str, float]], pds: list[float],
        reason: str | None, *, shadow: bool = False,
    ) -> list[dict[str, Any]]:
        # One row at a time: a network's matrix product over a batch can differ from one row's in
        # the last bits, and replay recomputes a single row, so serving scores single rows too.
        out = []
        for i, decision_id in enumerate(ids):
            try:
                out.append(self._record(selector.choose([decision_id], _columns(contexts[i:i + 1], selector), pds[i:i + 1]).records()[0], reason))
            except Exception as exc:  # a row the policy cannot take gets the logging policy, marked
                if selector is self.logging:
                    raise
                if shadow:
                    out.append({"error": f"{type(exc).__name__}: {exc}"})
                    continue
                log.warning("offer policy %s failed on decision %s: %s", selector.policy.name, decision_id, exc)
                out.extend(self._choose(self.logging, [decision_id], contexts[i:i + 1], pds[i:i + 1], "policy_failed"))
        return out

    def _record(self, record: dict[str, Any], reason: str | None) -> dict[str, Any]:
        record.pop("decision_id")
        record["policy_model"] = self.config.policy_model if record["policy"] != self.logging.policy.name else None
        if reason is not None:
            record["fallback_reason"] = reason
        return record


def _context(row: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, float]:
    out = {k: request[k] for k in REQUEST_CONTEXT if k in request}
    out.update(row)
    return out


def _columns(contexts: list[dict[str, Any]], selector: OfferSelector) -> dict[str, np.ndarray]:
    """The policy's features as columns; a missing value becomes NaN (the policy refuses it)."""
    return {f: np.array([_number(c.get(f)) for c in contexts], dtype=np.float64) for f in selector.policy.features}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
