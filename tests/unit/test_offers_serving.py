"""Offers in the checkout decision, without Ray: the acting policy (a registered policy model
followed by alias, or the logging policy) picks a tier under the risk cap with a valid
propensity, the shadow policy's choice is logged beside it, the record carries it, and replay
recomputes it from the log alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlplatform import ConfigError, DataError, ModelError, Platform
from mlplatform.config import load_config
from mlplatform.rl.policy_model import PolicyModel
from mlplatform.rl.policies import Selection
from mlplatform.serving.decisions.offer_replay import replay_offer
from mlplatform.serving.decisions.records import validate_record
from mlplatform.served_offers import ServingOffers
from mlplatform.serving.offers import DecisionOffers, load_policy, response_offer
from mlplatform.serving.scoring import ModelWatcher

OFFERS = {
    "tiers": [{"name": "line_500", "amount": 500}, {"name": "line_1000", "amount": 1000}, {"name": "line_2000", "amount": 2000, "installments": 6}],
    "risk_caps": [{"pd_below": 0.03, "max_tier": "line_2000"}, {"pd_below": 0.08, "max_tier": "line_1000"}],
}
FEATURES = ("amount", "income")


def policy_model(name: str, offers: ServingOffers, seed: int, selection: Selection | None = None) -> PolicyModel:
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(len(offers.tiers), len(FEATURES))), rng.normal(size=len(offers.tiers)))]
    return PolicyModel.from_mlp(name, layers, np.array([300.0, 3000.0]), np.array([200.0, 800.0]), FEATURES,
                                offers.offer_config(), selection or Selection(kind="softmax", epsilon=0.1))


@pytest.fixture
def platform(tmp_path):
    return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})


def register(platform, model: PolicyModel) -> int:
    return platform.models.register("offer_policy", flavor="policy", model=model, lineage={"code_version": "test"},
                                    metrics={}, params={}).version


def watcher(platform, config: ServingOffers) -> ModelWatcher:
    w = ModelWatcher(platform.models, "offer_policy", aliases=(config.alias, *filter(None, [config.shadow_alias])),
                     load=lambda v: load_policy(platform.models, "offer_policy", v, config.offer_config()))
    w.poll()
    return w


def batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"d{seed}-{i}" for i in range(n)]
    rows = [{"income": float(v), "loans_90d": 1.0} for v in rng.normal(3000, 800, n)]
    requests = [{"amount": float(a), "term": 4, "currency": "USD"} for a in rng.uniform(20, 800, n)]
    pds = [float(p) for p in rng.uniform(0.0, 0.12, n)]
    return ids, rows, requests, pds


def check_valid(offer: dict, pd: float, config: ServingOffers) -> None:
    cap = int(config.offer_config().max_tier_index([pd])[0])
    names = [t.name for t in config.tiers]
    assert offer["allowed"] == names[: cap + 1]
    assert offer["action"] <= cap and offer["tier"] == names[offer["action"]]
    probs = np.array(offer["probabilities"])
    assert abs(probs.sum() - 1) < 1e-9 and (probs[cap + 1:] == 0).all()
    assert offer["propensity"] == probs[offer["action"]] > 0
    assert offer["probability_of_default"] == pd


def test_the_logging_policy_explores_under_the_cap_and_only_approved_rows_get_offers():
    config = ServingOffers.model_validate({**OFFERS, "exploration": 0.2})
    ids, rows, requests, pds = batch(400)
    approved = [i for i in range(400) if i % 3]
    offers = DecisionOffers(config).choose(ids, rows, requests, pds, approved)
    assert sorted(offers) == approved
    for i, offer in offers.items():
        check_valid(offer, pds[i], config)
        allowed = len(offer["allowed"])
        top = 0.8 + 0.2 / allowed  # the largest allowed tier, plus its share of the exploration
        assert offer["probabilities"][allowed - 1] == pytest.approx(top)
        assert offer["policy"] == "logging_eps_0.2" and offer["policy_model"] is None and "fallback_reason" not in offer
    # every allowed tier is offered sometimes (exploration), the largest most often
    assert {o["tier"] for o in offers.values()} == {"line_500", "line_1000", "line_2000"}
    assert response_offer(offers[1], config) == {"tier": offers[1]["tier"], "amount": config.tiers[offers[1]["action"]].amount,
                                                 "installments": config.tiers[offers[1]["action"]].installments}
    assert DecisionOffers(config).choose(ids, rows, requests, pds, []) == {}


def test_the_acting_policy_model_and_the_shadow_are_logged_with_their_versions(platform):
    config = ServingOffers.model_validate({**OFFERS, "policy_model": "offer_policy", "shadow_alias": "shadow"})
    v1 = register(platform, policy_model("bandit", config, 1))
    v2 = register(platform, policy_model("marwil", config, 2, Selection(kind="greedy")))
    platform.models.set_alias("offer_policy", "production", v1)
    platform.models.set_alias("offer_policy", "shadow", v2)
    offers = DecisionOffers(config, watcher(platform, config))
    ids, rows, requests, pds = batch(200, seed=3)
    chosen = offers.choose(ids, rows, requests, pds, list(range(200)))
    for i, offer in chosen.items():
        check_valid(offer, pds[i], config)
        assert (offer["policy"], offer["policy_version"], offer["policy_model"]) == ("bandit", v1, "offer_policy")
        assert offer["context"] == {"amount": requests[i]["amount"], "income": rows[i]["income"]}
        shadow = offer["shadow"]
        assert shadow["shadow"] is True and shadow["alias"] == "shadow" and shadow["policy"] == "marwil"
        assert shadow["policy_version"] == v2 and shadow["propensity"] == 1.0  # greedy
        assert shadow["action"] <= len(offer["allowed"]) - 1
    # the same decision ids draw the same tiers (replicas agree, replay agrees)
    assert offers.choose(ids, rows, requests, pds, list(range(200))) == chosen


def test_a_row_the_policy_cannot_read_gets_the_logging_policy_and_says_why(platform):
    config = ServingOffers.model_validate({**OFFERS, "policy_model": "offer_policy"})
    offers = DecisionOffers(config, watcher(platform, config))
    ids, rows, requests, pds = batch(4)
    # no version under the alias yet: the logging policy, marked
    assert {o["fallback_reason"] for o in offers.choose(ids, rows, requests, pds, [0, 1]).values()} == {"policy_model_unavailable"}
    platform.models.set_alias("offer_policy", "production", register(platform, policy_model("bandit", config, 1)))
    offers.watcher.poll()
    rows[2] = {**rows[2], "income": None}  # missing at serving time
    chosen = offers.choose(ids, rows, requests, pds, [0, 2, 3])
    assert chosen[2]["fallback_reason"] == "policy_failed" and chosen[2]["policy"].startswith("logging")
    assert chosen[0]["policy"] == chosen[3]["policy"] == "bandit" and "fallback_reason" not in chosen[0]
    check_valid(chosen[2], pds[2], config)


def test_a_policy_model_for_other_tiers_is_refused_when_loaded(platform):
    config = ServingOffers.model_validate({**OFFERS, "policy_model": "offer_policy"})
    other = ServingOffers.model_validate({**OFFERS, "risk_caps": [{"pd_below": 0.2, "max_tier": "line_2000"}]})
    platform.models.set_alias("offer_policy", "production", register(platform, policy_model("loose", other, 1)))
    with pytest.raises(ModelError, match="not the configured serving.offers"):
        load_policy(platform.models, "offer_policy", 1, config.offer_config())
    w = watcher(platform, config)
    assert w.current("production") is None and 1 in w.failed()


def test_the_record_carries_the_offer_and_refuses_a_bad_one():
    record = {
        "decision_id": "d1", "application_id": "a1", "request": "{}", "decision": "approve", "probability_of_default": 0.01,
        "reasons": "[]", "model_name": "pd", "model_version": 1, "model_sha256": "x", "feature_names": "[]", "features": "{}",
        "feature_event_timestamps": "{}", "fallback": False, "fallback_reason": None, "latency_ms": 1.0,
        "created_at": "2025-01-31T09:00:00+00:00", "shadow": None,
    }
    assert validate_record(record)["offer"] is None  # records written before offers existed
    assert json.loads(validate_record({**record, "offer": '{"tier": "line_500"}'})["offer"]) == {"tier": "line_500"}
    with pytest.raises(DataError, match="offer"):
        validate_record({**record, "offer": '["line_500"]'})


def test_replay_recomputes_the_logged_offer(platform):
    config = ServingOffers.model_validate({**OFFERS, "policy_model": "offer_policy"})
    platform.models.set_alias("offer_policy", "production", register(platform, policy_model("bandit", config, 1)))
    ids, rows, requests, pds = batch(30, seed=5)
    acting = DecisionOffers(config, watcher(platform, config)).choose(ids, rows, requests, pds, list(range(30)))
    # the alias moves on: replay still uses the logged version
    platform.models.set_alias("offer_policy", "production", register(platform, policy_model("bandit", config, 9)))
    logging = DecisionOffers(ServingOffers.model_validate(OFFERS)).choose(ids, rows, requests, pds, list(range(30)))
    for i in range(30):
        for offer in (acting[i], logging[i]):
            logged = json.loads(json.dumps(offer))  # as read back from the log
            result = replay_offer(platform.models, ids[i], logged, ServingOffers.model_validate(OFFERS))
            assert result.identical and result.within_cap and result.replayed_tier == offer["tier"], result
        tampered = {**json.loads(json.dumps(acting[i])), "propensity": acting[i]["propensity"] / 2}
        assert not replay_offer(platform.models, ids[i], tampered).identical
    unknown = replay_offer(platform.models, ids[0], logging[0])  # the logging policy needs the config in force
    assert not unknown.replayable and "serving.offers" in unknown.note
    changed = replay_offer(platform.models, ids[0], logging[0], ServingOffers.model_validate({**OFFERS, "exploration": 0.3}))
    assert not changed.replayable and "logging_eps_0.3" in changed.note
    over = {**json.loads(json.dumps(logging[0])), "probability_of_default": 0.5, "action": 2, "tier": "line_2000"}
    assert replay_offer(platform.models, ids[0], over, ServingOffers.model_validate(OFFERS)).within_cap is False


@pytest.mark.parametrize(
    ("offers", "needle"),
    [
        ({**OFFERS, "shadow_alias": "shadow"}, "needs a policy_model"),
        ({**OFFERS, "policy_model": "p", "shadow_alias": "production"}, "must differ"),
        ({**OFFERS, "risk_caps": [{"pd_below": 0.05, "max_tier": "line_9000"}]}, "line_9000"),
        ({**OFFERS, "exploration": 1.0}, "exploration"),
        ({**OFFERS, "epsilon": 0.1}, "epsilon"),
        ({"tiers": OFFERS["tiers"][:1], "risk_caps": OFFERS["risk_caps"][:1]}, "tiers"),
    ],
)
def test_bad_offer_configs_are_refused_naming_the_field(offers, needle):
    with pytest.raises(ConfigError) as err:
        load_config({"serving": {"offers": offers}})
    assert needle in str(err.value)


def test_offers_are_off_by_default():
    assert load_config({}).serving.offers is None
    config = load_config({"serving": {"offers": {**OFFERS, "policy_model": "offer_policy"}}}).serving.offers
    assert config.alias == "production" and config.exploration == 0.1 and config.shadow_alias is None
