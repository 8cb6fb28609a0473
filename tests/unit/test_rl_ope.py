"""Off-policy estimators against the simulator's ground truth (issue 16), numpy and LightGBM
only: on 50k logged decisions IPS, SNIPS and DR land within 5% of three policies' true values
and DR's interval covers them; over many seeds the 95% intervals cover at about their rate;
DR is less variable than IPS; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from mlplatform.errors import DataError
from mlplatform.rl import FixedTierPolicy, OfferSelector, ScoredPolicy, Selection, context_matrix, off_policy_estimates
from mlplatform.rl.reward_model import RewardModelSpec, cross_fitted
from workloads.credit_line.pipeline import Config, logging_policy, simulator
from workloads.credit_line.simulator import FEATURES, legacy_scores

CONFIG = Config()
SIM = simulator(CONFIG)
OFFERS, RULE = CONFIG.offers, CONFIG.reward


def _oracle_softmax():
    """A good policy the log rarely plays greedily: softmax over the true expected rewards."""
    return ScoredPolicy(
        "oracle_softmax",
        FEATURES,
        OFFERS,
        lambda x: SIM.expected_reward({f: x[:, i] for i, f in enumerate(FEATURES)}),
        Selection(kind="softmax", temperature=10.0),
    )


POLICIES = {
    "greedy_rule": ScoredPolicy("greedy_rule", FEATURES, OFFERS, lambda x: legacy_scores(OFFERS, RULE, x)),
    "fixed_line_1000": FixedTierPolicy("line_1000", OFFERS, FEATURES),
    "oracle_softmax": _oracle_softmax(),
}


def _log(n: int, seed: int):
    rng = np.random.default_rng(seed)
    ctx = SIM.contexts(n, rng)
    pd = SIM.pd_score(ctx, rng)
    batch = OfferSelector(logging_policy(CONFIG)).choose([f"s{seed}-{i}" for i in range(n)], ctx, pd)
    rewards = RULE.reward(*SIM.outcomes(ctx, batch.actions, rng))
    return ctx, pd, batch, rewards


@pytest.fixture(scope="module")
def logged_50k():
    ctx, pd, batch, rewards = _log(50_000, seed=11)
    q_hat = cross_fitted(context_matrix(ctx, FEATURES), batch.actions, rewards, len(OFFERS.tiers), RewardModelSpec(num_boost_round=40, num_leaves=7, num_threads=1))
    return ctx, pd, batch, rewards, q_hat


@pytest.mark.parametrize("name", list(POLICIES))
def test_each_estimator_lands_within_5_percent_of_the_true_value_on_50k_decisions(logged_50k, name):
    ctx, pd, batch, rewards, q_hat = logged_50k
    policy = POLICIES[name]
    truth = SIM.true_value(policy, ctx, pd)
    estimates = off_policy_estimates(policy.probabilities(ctx, pd), batch.actions, batch.propensities, rewards, q_hat=q_hat)
    for estimator, estimate in estimates.items():
        assert abs(estimate.value - truth) <= 0.05 * abs(truth), (name, estimator, estimate.value, truth)
    assert estimates["dr"].covers(truth), (name, estimates["dr"], truth)
    # a reward model narrows the interval: DR's standard error is below IPS's
    assert estimates["dr"].stderr < estimates["ips"].stderr


def test_the_logging_policy_evaluated_on_its_own_log_is_its_mean_reward(logged_50k):
    ctx, pd, batch, rewards, _ = logged_50k
    est = off_policy_estimates(logging_policy(CONFIG).probabilities(ctx, pd), batch.actions, batch.propensities, rewards)
    assert est["ips"].value == pytest.approx(rewards.mean()) and est["snips"].value == pytest.approx(rewards.mean())
    assert est["ips"].effective_sample_size == pytest.approx(len(rewards))


def test_intervals_cover_the_true_value_at_about_their_rate_over_seeds():
    """40 logs of 5k decisions: each 95% interval should miss about 2 times in 40; more than
    6 misses (binomial tail < 0.5%) means the intervals are too narrow or the estimator is biased."""
    policy = POLICIES["oracle_softmax"]
    misses = {"ips": 0, "snips": 0, "dr": 0}
    for seed in range(40):
        ctx, pd, batch, rewards = _log(5_000, seed=100 + seed)
        truth = SIM.true_value(policy, ctx, pd)
        # a cheap, misspecified reward model: DR stays unbiased because the propensities are right
        q_hat = legacy_scores(OFFERS, RULE, context_matrix(ctx, FEATURES))
        est = off_policy_estimates(policy.probabilities(ctx, pd), batch.actions, batch.propensities, rewards, q_hat=q_hat)
        for name, e in est.items():
            misses[name] += not e.covers(truth)
    assert all(m <= 6 for m in misses.values()), misses


def test_bad_logged_data_is_refused_naming_the_problem():
    target = np.full((3, 2), 0.5)
    with pytest.raises(DataError, match=r"propensities must be in \(0, 1\], got 0.0 at row 1"):
        off_policy_estimates(target, np.array([0, 1, 0]), np.array([0.5, 0.0, 0.5]), np.ones(3))
    with pytest.raises(DataError, match=r"actions must be integers in \[0, 2\)"):
        off_policy_estimates(target, np.array([0, 2, 0]), np.full(3, 0.5), np.ones(3))
    with pytest.raises(DataError, match="no logged decisions"):
        off_policy_estimates(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0), np.zeros(0))
    with pytest.raises(DataError, match="q_hat must have the target's shape"):
        off_policy_estimates(target, np.array([0, 1, 0]), np.full(3, 0.5), np.ones(3), q_hat=np.ones((3, 3)))
