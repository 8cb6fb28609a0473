"""Replaying a logged offer: the same policy version, context and PD must draw the same tier
with the same propensity, under the risk cap.

    result = replay_offer(platform.models, "3f2a…", json.loads(record["offer"]), config.serving.offers)
    result.identical        # tier, propensity, allowed tiers and every probability equal, bit for bit
    result.within_cap       # the logged tier is at or below the cap the logged PD sets

What it uses: the offer's policy — a ``policy``-flavor model's logged version (loaded from the
registry, its sha256 verified; never the alias, which may have moved), or the logging policy,
rebuilt from ``offers`` (the ``serving.offers`` in force: its tiers, caps and exploration) —
the logged context and PD, and the decision id, from which ``OfferSelector`` draws
(``mlplatform.rl.selection``). The shadow policy's choice is logged for comparison only and
is not replayed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlplatform.errors import DataError, ModelError
from mlplatform.rl.selection import OfferSelector
from mlplatform.served_offers import ServingOffers
from mlplatform.serving.offers import LoggingPolicy

if TYPE_CHECKING:
    from mlplatform.models.registry import ModelRegistry

__all__ = ["OfferReplay", "replay_offer"]


@dataclass(frozen=True)
class OfferReplay:
    """A logged offer and its recomputation (``replayable`` False: ``note`` says what was missing)."""

    policy: str
    policy_version: int | None
    logged_tier: str
    replayed_tier: str | None
    logged_propensity: float
    replayed_propensity: float | None
    identical: bool
    within_cap: bool | None
    replayable: bool = True
    note: str = ""


def replay_offer(
    models: ModelRegistry, decision_id: str, offer: Mapping[str, Any], offers: ServingOffers | None = None
) -> OfferReplay:
    """Recompute one decision's logged ``offer`` (the decision record's JSON object).

    Raises:
        NotFoundError: the logged policy version is not in the registry.
        IntegrityError: its artifact does not match its sha256.
        DataError: the logged offer lacks a key replay needs.
    """
    try:
        name, version, pd = offer["policy"], offer.get("policy_version"), float(offer["probability_of_default"])
        logged_tier, logged_propensity, context = offer["tier"], float(offer["propensity"]), dict(offer["context"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"decision {decision_id!r}: the logged offer lacks policy, tier, propensity, context or PD: {offer!r:.200}") from None
    head = dict(policy=name, policy_version=version, logged_tier=logged_tier, logged_propensity=logged_propensity)
    if offer.get("policy_model"):
        if version is None:
            return OfferReplay(**head, replayed_tier=None, replayed_propensity=None, identical=False, within_cap=None,
                               replayable=False, note="the offer names a policy model but no version")
        _, predictor = models.load_predictor(offer["policy_model"], version=int(version), device="cpu", precision="fp32")
        policy = getattr(predictor, "model", None)
        if policy is None or getattr(policy, "name", None) != name:
            raise ModelError(f"decision {decision_id!r}: {offer['policy_model']!r} v{version} is not the logged policy {name!r}")
    else:
        policy = LoggingPolicy(offers.offer_config(), offers.exploration) if offers is not None else None
        if policy is None or policy.name != name:
            note = ("pass the serving.offers that was in force to replay the logging policy" if policy is None
                    else f"the configured logging policy is {policy.name!r}, the offer was made by {name!r}")
            return OfferReplay(**head, replayed_tier=None, replayed_propensity=None, identical=False, within_cap=None,
                               replayable=False, note=note)
    columns = {f: np.array([context.get(f, np.nan)], dtype=np.float64) for f in policy.features}
    replayed = OfferSelector(policy, policy_version=version).choose([decision_id], columns, [pd]).records()[0]
    cap = int(policy.offers.max_tier_index([pd])[0])
    identical = all(replayed[k] == offer.get(k) for k in ("tier", "action", "propensity", "allowed", "probabilities"))
    return OfferReplay(
        **head, replayed_tier=replayed["tier"], replayed_propensity=replayed["propensity"], identical=identical,
        within_cap=int(offer.get("action", -1)) <= cap and policy.offers.names.index(logged_tier) <= cap,
    )
