"""Policy rules over other served models, and the serving.models config: what a rule does
to a decision at each score, and which configs are refused with a message naming the field."""

import pytest

from mlplatform.config import load_config
from mlplatform.decision_policy import DecisionPolicy, ModelRule
from mlplatform.errors import ConfigError

RULE = ModelRule(model="fraud", review_at=0.5, decline_at=0.9, code="fraud_risk", text="We could not verify this purchase")


@pytest.mark.parametrize(
    ("decision", "score", "after", "code"),
    [
        ("approve", 0.2, "approve", None),
        ("approve", 0.5, "review", "fraud_risk"),  # thresholds are inclusive
        ("approve", 0.9, "decline", "fraud_risk"),
        ("review", 0.6, "review", None),  # already a review: no second reason
        ("review", 0.95, "decline", "fraud_risk"),
        ("decline", 0.1, "decline", None),  # a rule never loosens a decision
        ("decline", 0.99, "decline", "fraud_risk"),
        ("approve", None, "approve", None),  # no score, on_unavailable=ignore
    ],
)
def test_a_rule_only_makes_a_decision_stricter(decision, score, after, code):
    got, reason = RULE.apply(decision, score)
    assert got == after
    assert (reason.code if reason else None) == code


def test_without_a_score_review_turns_only_an_approve_into_a_review():
    rule = RULE.model_copy(update={"on_unavailable": "review"})
    assert rule.apply("approve", None) == ("review", rule.apply("approve", None)[1])
    assert rule.apply("approve", None)[1].code == "fraud_risk_unavailable"
    assert rule.apply("decline", None) == ("decline", None)


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ({"model": "fraud"}, "give review_at, decline_at or both"),
        ({"model": "fraud", "review_at": 0.9, "decline_at": 0.5}, "must not exceed"),
        ({"model": "fraud", "review_at": 1.5}, "review_at"),
        ({"model": "../etc", "review_at": 0.5}, "model"),
        ({"model": "fraud", "review_at": 0.5, "on_unavailable": "approve"}, "on_unavailable"),
    ],
)
def test_bad_rules_are_refused(rule, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config({"serving": {"policy": {"model_rules": [rule]}}})
    assert needle in str(err.value)


def test_served_models_config():
    config = load_config({"serving": {"models": [
        {"name": "fraud", "deadline": "30ms", "batching": {"max_batch_size": 64, "max_wait": "2ms"},
         "input_builder": "workloads.fraud.online:serving_inputs", "deployment": {"num_gpus": 1, "autoscaling": {"max_replicas": 3}}},
    ]}})
    (fraud,) = config.serving.models
    assert fraud.alias == "production" and fraud.deadline.total_seconds() == 0.03
    assert fraud.batching.max_wait.total_seconds() == 0.002 and fraud.deployment.num_gpus == 1
    for bad, needle in [
        ({"name": "fraud", "input_builder": "not a path"}, "input_builder"),
        ({"name": "fraud", "batching": {"max_batch_size": 0}}, "max_batch_size"),
        ({"name": "fraud", "gpus": 1}, "gpus"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config({"serving": {"models": [bad]}})
        assert needle in str(err.value)
    with pytest.raises(ConfigError, match="listed more than once"):
        load_config({"serving": {"models": [{"name": "fraud"}, {"name": "fraud"}]}})


def test_a_policy_with_rules_round_trips_as_json():
    policy = DecisionPolicy.model_validate({"model_rules": [RULE.model_dump()]})
    assert DecisionPolicy.model_validate(policy.model_dump(mode="json")) == policy
