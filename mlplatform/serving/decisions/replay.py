"""Replay: recompute a logged decision's score from the log alone, with the logged model version.

    result = replay(platform.models, platform.storage, "3f2a…")
    result.identical            # True: the same float, bit for bit
    result.logged_score, result.replayed_score, result.model_version

What a replay uses, all from the decision record (``records``): the model name and
version (never an alias: an alias may have moved since), the model's sha256 (which must equal
the registry's, and the artifact's bytes must match it), the feature names in the model's order
and the feature values as served (null = missing).

The score is ``score_features``: ``booster.predict`` on one row encoded as the online path
encodes it (``mlplatform.models.reasons``: a feature trained as a pandas categorical is coded
by its position in the model's category list, an unknown category or null is missing (NaN)).
The decision service must log exactly this number as ``probability_of_default``. Note that
``Explained.probability`` from ``ReasonCoder.explain_row`` is ``sigmoid(sum of SHAP
contributions)``: mathematically the same, but it differs from ``booster.predict`` in the last
bits for most rows, so it is not the number to log.

Every **rule model** the decision consulted (``rule_models`` in the record, e.g. fraud) is
recomputed too, on CPU in fp32, from its logged input with its logged version (sha256
checked the same way), in a batch of the logged fixed size (``rows``: decisions score rule
models in batches of one shape, so a transformer's score does not depend on its neighbours): ``ReplayResult.rule_models`` holds one ``ModelReplay`` each, and
``identical`` holds only if every one of them is identical as well. A rule model that gave
no score (past its deadline, unavailable) is listed with that status and nothing to compare.

An approved decision's **offer** (``offer`` in the record) is recomputed too
(``offer_replay``): the same policy version, logged context, PD and decision id must draw the
same tier with the same propensity; ``identical`` requires it.

Fallback decisions were not scored by a model. They are replayed only when the caller passes
the decision policy that was in force (``policy.fallback(amount=, currency=, term=)`` on the
logged request); ``identical`` then says whether the fallback decision comes out the same.
Without a policy the result has ``replayable=False``: the policy is not part of the log, and
today's policy may not be the one that decided.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlplatform.errors import DataError, IntegrityError, ModelError
from mlplatform.models.encoding import encode_features
from mlplatform.models.flavors.base import numpy_dtype, predict_in_fixed_batches
from mlplatform.serving.decisions.lookup import find_decision
from mlplatform.serving.decisions.offer_replay import OfferReplay, replay_offer

if TYPE_CHECKING:
    import lightgbm

    from mlplatform.models.registry import ModelRegistry
    from mlplatform.served_offers import ServingOffers
    from mlplatform.storage import Storage

__all__ = ["ModelReplay", "ReplayResult", "replay", "score_features"]


class FallbackPolicy(Protocol):
    def fallback(self, *, amount: float, currency: str, term: int) -> tuple[str, Any]: ...


@dataclass(frozen=True)
class ModelReplay:
    """One rule model's score, logged and recomputed (``status`` other than ``scored``: the
    decision had no score from it, so there is nothing to recompute)."""

    model_name: str
    model_version: int | None
    status: str
    logged_score: float | None = None
    replayed_score: float | None = None
    identical: bool = True


@dataclass(frozen=True)
class ReplayResult:
    """The outcome of one replay.

    ``identical`` is exact equality of the replayed and logged probability of default (for a
    fallback replayed with a policy: of the decision). ``replayable`` is False when the
    record does not determine the answer (a fallback without the policy, or no model version
    logged); then ``identical`` is False and ``note`` says why.
    """

    decision_id: str
    logged_score: float | None
    replayed_score: float | None
    identical: bool
    model_name: str | None
    model_version: int | None
    replayable: bool = True
    fallback: bool = False
    logged_decision: str | None = None
    replayed_decision: str | None = None
    note: str = ""
    rule_models: tuple[ModelReplay, ...] = ()
    offer: OfferReplay | None = None


def replay(
    models: ModelRegistry,
    storage: Storage,
    decision_id: str,
    *,
    spool_dir: str | None = None,
    policy: FallbackPolicy | None = None,
    offers: ServingOffers | None = None,
) -> ReplayResult:
    """Recompute the score of a logged decision with exactly the logged model version.

        result = replay(platform.models, platform.storage, "3f2a…", spool_dir="/var/lib/mlp/decision-spool")
        assert result.identical

    Args:
        decision_id: the decision's id, as returned to the checkout.
        spool_dir: also look in this decision spool (decisions not compacted yet); otherwise
            only the compacted ``decisions/log`` dataset is searched.
        policy: the decision policy that was in force, to replay fallback decisions.
        offers: the ``serving.offers`` that was in force, to replay an offer of the logging
            policy (a policy model's offer is replayed from the registry alone).

    Returns:
        A ``ReplayResult``.

    Raises:
        NotFoundError: no such decision, or the logged model version is not in the registry.
        IntegrityError: the logged ``model_sha256`` is not the registry's hash of that version's
            model file, or the artifact's bytes do not match it (tampered or corrupted).
        DataError: the logged feature names are not the model's features in its order, or
            the logged features are not a JSON object holding each of them.
    """
    record = find_decision(storage, decision_id, spool_dir=spool_dir)
    name, version = record["model_name"], record["model_version"]
    logged = record["probability_of_default"]
    base = dict(
        decision_id=decision_id, logged_score=logged, model_name=name, model_version=version,
        fallback=bool(record["fallback"]), logged_decision=record["decision"],
    )
    if record["fallback"]:
        return _replay_fallback(record, policy, base)
    if version is None or name is None:
        return ReplayResult(
            **base, replayed_score=None, identical=False, replayable=False,
            note="the record names no model version, so the model that scored it is unknown",
        )

    mv = models.get(name, version=version)
    registered = mv.artifacts[mv.model_file]
    if registered != record["model_sha256"]:
        raise IntegrityError(
            f"decision {decision_id!r} was scored by a model file with sha256 {str(record['model_sha256'])[:12]}…, "
            f"but version {version} of model {name!r} in the registry has {registered[:12]}…: the registry record "
            "was changed or the decision was logged with the wrong model; refusing to replay"
        )
    if mv.flavor != "lightgbm":
        raise ModelError(f"replay supports LightGBM models; version {version} of {name!r} is {mv.flavor!r}")
    booster = models.load(name, version=version).model  # verifies every artifact's sha256

    feature_names = json.loads(record["feature_names"])
    if list(feature_names) != list(booster.feature_name()):
        raise DataError(
            f"decision {decision_id!r} logged features {feature_names}, but version {version} of {name!r} "
            f"takes {booster.feature_name()} (in this order)"
        )
    replayed = score_features(booster, json.loads(record["features"]))
    rules = tuple(_replay_rule_model(models, decision_id, doc) for doc in json.loads(record.get("rule_models") or "null") or [])
    offer = replay_offer(models, decision_id, json.loads(record["offer"]), offers) if record.get("offer") else None
    identical = logged is not None and replayed == logged and all(r.identical for r in rules) and (offer is None or offer.identical)
    return ReplayResult(**base, replayed_score=replayed, identical=identical, rule_models=rules, offer=offer)


def _replay_rule_model(models: ModelRegistry, decision_id: str, doc: Mapping[str, Any]) -> ModelReplay:
    """Recompute one logged rule model's score from its logged input (CPU, fp32)."""
    name, status = doc["model_name"], doc.get("status", "scored")
    if status != "scored":
        return ModelReplay(name, None, status)
    version = int(doc["model_version"])
    mv = models.get(name, version=version)
    if mv.artifacts[mv.model_file] != doc.get("model_sha256"):
        raise IntegrityError(
            f"decision {decision_id!r} was scored by {name!r} v{version} with sha256 {str(doc.get('model_sha256'))[:12]}…, "
            f"but the registry has {mv.artifacts[mv.model_file][:12]}…; refusing to replay"
        )
    _, predictor = models.load_predictor(name, version=version, device="cpu", precision="fp32")
    logged_inputs = doc.get("inputs") or {}
    try:
        inputs = {t.name: np.asarray([logged_inputs[t.name]], dtype=numpy_dtype(t.datatype)) for t in predictor.signature.inputs}
    except (KeyError, TypeError, ValueError):
        raise DataError(f"decision {decision_id!r}: the logged input of {name!r} does not fit v{version}'s signature") from None
    rows = doc.get("rows")  # the fixed batch size it was scored in: the same shape gives the same bits
    outputs = predict_in_fixed_batches(predictor, inputs, int(rows)) if isinstance(rows, int) and rows >= 1 else predictor.predict(inputs)
    replayed = float(outputs[doc["output"]][0])
    return ModelReplay(name, version, status, doc["score"], replayed, replayed == doc["score"])


def score_features(booster: lightgbm.Booster, features: Mapping[str, Any]) -> float:
    """The probability of default of one row, as the decision service logs it and replay
    recomputes it: ``booster.predict`` on ``encode_features(booster, features)``.

        p = score_features(booster, {"loans_90d": 2.0, "category": "travel", "income": None})

    Raises:
        DataError: a model feature is not a key of ``features`` (pass None for missing).
    """
    return float(booster.predict(encode_features(booster, features), num_threads=1)[0])


def _replay_fallback(record: Mapping[str, Any], policy: FallbackPolicy | None, base: dict[str, Any]) -> ReplayResult:
    if policy is None:
        return ReplayResult(
            **base, replayed_score=None, identical=False, replayable=False,
            note=f"fallback decision ({record['fallback_reason']}): no model score; pass the policy that was in "
            "force to replay the fallback rule",
        )
    request = json.loads(record["request"])
    try:
        amount, currency, term = request["amount"], request["currency"], request["term"]
    except (KeyError, TypeError):
        return ReplayResult(
            **base, replayed_score=None, identical=False, replayable=False,
            note=f"fallback decision whose logged request lacks amount/currency/term: {_short(request)}",
        )
    decision, _ = policy.fallback(amount=amount, currency=currency, term=term)
    return ReplayResult(
        **base, replayed_score=None, replayed_decision=decision, identical=decision == record["decision"],
        note=f"fallback decision ({record['fallback_reason']}) replayed with the given policy's fallback rule",
    )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "…"
