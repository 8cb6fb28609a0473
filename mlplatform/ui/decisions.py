"""The decisions page's content: find a logged decision by its id or its application id, show
what it was decided on (each feature with its event time, the reasons, every model's version
and score), and replay it: the score recomputed from the logged features by the logged model
version, beside the logged one."""

from __future__ import annotations

import json
from typing import Any

from mlplatform.errors import NotFoundError
from mlplatform.ui.definitions import definitions

__all__ = ["decision_detail", "replay", "search"]

_MAX_QUERY = 200


def search(platform: Any, query: str) -> list[dict[str, Any]]:
    """Decisions whose decision id or application id is ``query`` (newest first). A decision id
    is looked up directly; an application id needs the whole log read (an audit, not a hot path)."""
    query = query.strip()[:_MAX_QUERY]
    if not query:
        return []
    try:
        return [_summary(platform.serving.decision(query))]
    except NotFoundError:
        pass
    found = [r for r in platform.serving.decisions() if r.get("application_id") == query]
    return [_summary(r) for r in reversed(found)]


def decision_detail(platform: Any, decision_id: str) -> dict[str, Any]:
    record = platform.serving.decision(decision_id)
    features = _decoded(record.get("features")) or {}
    stamps = _decoded(record.get("feature_event_timestamps")) or {}
    shadow = _decoded(record.get("shadow"))
    rules = _decoded(record.get("rule_models")) or []
    owners = _feature_views(platform)
    models = [{"role": "decision", "name": record.get("model_name"), "version": record.get("model_version"),
               "score": record.get("probability_of_default")}]
    if isinstance(shadow, dict):
        models.append({"role": "shadow", "name": shadow.get("model_name") or shadow.get("model"),
                       "version": shadow.get("model_version") or shadow.get("version"),
                       "score": shadow.get("probability_of_default", shadow.get("score"))})
    for rule in rules if isinstance(rules, list) else []:
        if isinstance(rule, dict):
            models.append({"role": "rule", "name": rule.get("model") or rule.get("model_name"),
                           "version": rule.get("version") or rule.get("model_version"), "score": rule.get("score")})
    return {
        "summary": _summary(record),
        "features": [{"name": k, "value": v, "view": owners.get(k.split(":")[0].split("__")[-1]),
                      "timestamp": _stamp(stamps, k, owners)} for k, v in features.items()],
        "stamps": stamps if isinstance(stamps, dict) else {},
        "reasons": _decoded(record.get("reasons")) or [],
        "request": _decoded(record.get("request")),
        "offer": _offer(platform, _decoded(record.get("offer"))),
        "models": models,
    }


def replay(platform: Any, decision_id: str) -> dict[str, Any]:
    result = platform.serving.replay(decision_id)
    return {
        "replayable": result.replayable, "identical": result.identical, "logged": result.logged_score,
        "replayed": result.replayed_score, "model": result.model_name, "version": result.model_version,
        "logged_decision": result.logged_decision, "replayed_decision": result.replayed_decision, "note": result.note,
        "rules": [{"name": r.model_name, "version": r.model_version, "status": r.status, "logged": r.logged_score,
                   "replayed": r.replayed_score, "identical": r.identical} for r in result.rule_models],
        "offer": _offer_replay(getattr(result, "offer", None)),
    }


def _offer(platform: Any, offer: Any) -> dict[str, Any] | None:
    """The logged offer for a table: one row per tier (amount, allowed under the cap, the
    policy's probability, which was chosen), the policy, the context it read, the shadow's choice."""
    if not isinstance(offer, dict):
        return None if offer is None else {"raw": offer}
    offers = getattr(platform.config.serving, "offers", None)
    configured = {t.name: t for t in offers.tiers} if offers is not None else {}
    probabilities = offer.get("probabilities") or []
    names = list(configured) if len(configured) == len(probabilities) else [f"tier {i}" for i in range(len(probabilities))]
    allowed = set(offer.get("allowed") or [])
    shadow = offer.get("shadow") if isinstance(offer.get("shadow"), dict) else {}
    tiers = []
    for i, p in enumerate(probabilities):
        tier = configured.get(names[i])
        tiers.append({"name": names[i], "amount": getattr(tier, "amount", None), "installments": getattr(tier, "installments", None),
                      "allowed": names[i] in allowed, "probability": p, "chosen": i == offer.get("action"),
                      "shadow": shadow.get("action") == i})
    known = {"tier", "action", "propensity", "allowed", "probabilities", "policy", "policy_version", "context",
             "probability_of_default", "shadow", "policy_model", "fallback_reason"}
    return {
        "tier": offer.get("tier"), "propensity": offer.get("propensity"), "policy": offer.get("policy"),
        "policy_model": offer.get("policy_model"), "policy_version": offer.get("policy_version"),
        "fallback_reason": offer.get("fallback_reason"), "pd": offer.get("probability_of_default"),
        "tiers": tiers, "context": offer.get("context") if isinstance(offer.get("context"), dict) else {},
        "shadow": shadow, "other": {k: v for k, v in offer.items() if k not in known},
    }


def _offer_replay(offer: Any) -> dict[str, Any] | None:
    if offer is None:
        return None
    return {"policy": offer.policy, "version": offer.policy_version, "logged": offer.logged_tier, "replayed": offer.replayed_tier,
            "logged_propensity": offer.logged_propensity, "replayed_propensity": offer.replayed_propensity,
            "identical": offer.identical, "within_cap": offer.within_cap, "replayable": offer.replayable, "note": offer.note}


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("decision_id", "application_id", "decision", "probability_of_default", "model_name", "model_version",
            "fallback", "fallback_reason", "created_at", "returned", "latency_ms")
    return {k: record.get(k) for k in keys}


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _feature_views(platform: Any) -> dict[str, str]:
    """Each feature name -> the view computing it (to find its logged event time)."""
    out: dict[str, str] = {}
    defs = definitions(platform)
    for view in defs.views:
        for name in [f.name for f in view.schema_] + [a.name or "" for a in view.aggregations]:
            out.setdefault(name, view.name)
    for view in defs.on_demand:
        for f in view.schema_:
            out.setdefault(f.name, view.name)
    return out


def _stamp(stamps: Any, feature: str, owners: dict[str, str]) -> Any:
    if not isinstance(stamps, dict):
        return None
    if feature in stamps:
        return stamps[feature]
    view = feature.split(":", 1)[0] if ":" in feature else owners.get(feature.split("__")[-1])
    return stamps.get(view) if view else None
