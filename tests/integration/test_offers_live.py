"""Offers in the live checkout decision, against the session's Serve application (``OFFERS``
in ``_serving_app``: policy model ``offer_policy`` v1 acting, v2 in shadow): an approved
decision shows its offer, the log keeps the context, the action, its propensity, the allowed
tiers and the policy version beside the shadow's choice, declines carry none, the cap holds,
and replay recomputes the offer."""

from __future__ import annotations

import json

import numpy as np
from _serving_app import OFFERS, SAFE, application, post

from mlplatform.offer_tiers import OfferConfig

CAPS = OfferConfig(tiers=OFFERS["tiers"], risk_caps=OFFERS["risk_caps"])
NAMES = [t["name"] for t in OFFERS["tiers"]]


def test_an_approved_decision_shows_its_offer_and_logs_its_propensity(served):
    platform, deployed, _ = served
    asked = [(40.0 + 37.0 * i, (4, 6, 12)[i % 3]) for i in range(24)]
    answers = [post(f"{deployed.url}/v1/decisions", application(SAFE, amount=a, term=t)).json() for a, t in asked]
    assert all(a["offer"] is None for a in answers if a["decision"] != "approve")
    approved = [(a, asked[i]) for i, a in enumerate(answers) if a["decision"] == "approve"]
    assert len(approved) >= 12, [a["decision"] for a in answers]
    declined = post(f"{deployed.url}/v1/decisions", application(SAFE, amount=2500.0)).json()  # above max_amount
    assert declined["decision"] == "decline" and declined["offer"] is None
    assert platform.serving.decision(declined["decision_id"])["offer"] is None

    for answer, (amount, term) in approved:
        record = platform.serving.decision(answer["decision_id"])
        offer = json.loads(record["offer"])
        tier = OFFERS["tiers"][offer["action"]]
        assert answer["offer"] == {"tier": tier["name"], "amount": tier["amount"], "installments": tier.get("installments", 4)}
        # the context, the PD that set the cap, the allowed tiers, every probability, the policy version
        assert offer["context"] == {"amount": amount, "term": term}
        assert offer["probability_of_default"] == answer["probability_of_default"] == record["probability_of_default"]
        cap = int(CAPS.max_tier_index([answer["probability_of_default"]])[0])
        assert offer["allowed"] == NAMES[: cap + 1] and offer["action"] <= cap
        probs = np.array(offer["probabilities"])
        assert abs(probs.sum() - 1) < 1e-9 and (probs[cap + 1:] == 0).all() and (probs[: cap + 1] > 0).all()  # softmax + epsilon
        assert offer["propensity"] == probs[offer["action"]] > 0
        assert (offer["policy"], offer["policy_version"], offer["policy_model"]) == ("offers_softmax", 1, "offer_policy")
        shadow = offer["shadow"]
        assert shadow["shadow"] is True and shadow["alias"] == "shadow" and shadow["policy_version"] == 2
        assert shadow["policy"] == "offers_greedy" and shadow["propensity"] == 1.0 and shadow["action"] <= cap

    for answer, _ in approved[:6]:
        result = platform.serving.replay(answer["decision_id"])
        assert result.identical and result.offer is not None and result.offer.identical, result
        assert result.offer.replayed_tier == answer["offer"]["tier"] and result.offer.within_cap
