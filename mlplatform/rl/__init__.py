"""Reinforcement learning for offers: credit-line offers as a contextual bandit learned from
logged decisions.

    from mlplatform.rl import OfferConfig, OfferSelector, ScoredPolicy, Selection
    batch = OfferSelector(policy, policy_version=3).choose(decision_ids, contexts, pd)  # logged with propensities
    rewarded, report = join_rewards(offer_log, outcomes, rule, as_of)                  # once the horizon passed
    platform.rl.evaluate(policy, ("2024-01-01", "2024-07-01"))                        # IPS, SNIPS, DR with intervals
    model = platform.rl.train_bandit(...)  /  platform.rl.train_offline(...)          # LightGBM per tier / RLlib MARWIL

Modules: ``offers`` (tiers and the risk cap), ``policies`` (the ``Policy`` interface and
selection rules), ``selection`` (choosing and logging the offer), ``rewards`` (rewards from
outcomes, point in time), ``ope`` (off-policy estimators), ``reward_model`` (LightGBM per
tier), ``policy_model`` (a learned policy as data: the ``policy`` model flavor),
``offline_rl`` (RLlib MARWIL from the logged Parquet), ``api`` (``platform.rl``).
Importing this package imports neither Ray nor LightGBM.
"""

from mlplatform.rl.offers import OfferConfig, OfferTier, RiskCap
from mlplatform.rl.ope import Estimate, off_policy_estimates
from mlplatform.rl.policies import FixedTierPolicy, Policy, ScoredPolicy, Selection, context_matrix, select
from mlplatform.rl.policy_model import PolicyModel
from mlplatform.rl.rewards import RewardRule, join_rewards
from mlplatform.rl.selection import OfferBatch, OfferSelector

__all__ = [
    "Estimate",
    "FixedTierPolicy",
    "OfferBatch",
    "OfferConfig",
    "OfferSelector",
    "OfferTier",
    "Policy",
    "PolicyModel",
    "RewardRule",
    "RiskCap",
    "ScoredPolicy",
    "Selection",
    "context_matrix",
    "join_rewards",
    "off_policy_estimates",
    "select",
]
