"""Reward models for offers: one LightGBM regression per tier, predicting the reward of
offering that tier to a context.

    spec = RewardModelSpec(num_boost_round=150)
    boosters = fit_reward_models(x, actions, rewards, n_actions=5, spec=spec)
    q = predict_rewards(boosters, x)                  # float64 [n, K]
    q_oof = cross_fitted(x, actions, rewards, 5, spec) # each row scored by models that did not see it

The contextual-bandit baseline is these models with greedy or softmax selection
(``policy_model.PolicyModel.from_reward_models``); doubly robust evaluation uses the
cross-fitted predictions, so the reward model is never scored on the rows it learnt from.
Each tier's model learns only from the decisions that offered that tier (what the log
observed), which is why the log must explore.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlplatform.errors import DependencyError, TrainingError

__all__ = ["RewardModelSpec", "cross_fitted", "fit_reward_models", "predict_rewards"]


class RewardModelSpec(BaseModel):
    """LightGBM settings of the per-tier reward models (small and regularised by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_boost_round: int = Field(default=150, ge=1, le=5000, description="Boosting rounds per tier.")
    learning_rate: float = Field(default=0.05, gt=0.0, le=1.0, description="Shrinkage.")
    num_leaves: int = Field(default=15, ge=2, le=1024, description="Leaves per tree.")
    min_data_in_leaf: int = Field(default=100, ge=1, description="Smallest leaf (rewards are noisy: keep it large).")
    num_threads: int = Field(default=2, ge=1, le=256, description="LightGBM threads.")
    seed: int = Field(default=0, description="Seed (bagging, cross-fitting folds).")
    min_rows_per_tier: int = Field(default=30, ge=1, description="Fewer logged offers of a tier than this is an error.")


def _lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError:
        raise DependencyError.missing("lightgbm", "lightgbm>=4.3", "training reward models") from None
    return lightgbm


def fit_reward_models(
    x: np.ndarray, actions: np.ndarray, rewards: np.ndarray, n_actions: int, spec: RewardModelSpec, feature_names: list[str] | None = None
) -> list[Any]:
    """One ``lightgbm.Booster`` per tier, tier ``k``'s trained on the rows with ``actions == k``.

    Raises:
        TrainingError: a tier was offered fewer than ``spec.min_rows_per_tier`` times.
    """
    lgb = _lightgbm()
    x = np.asarray(x, dtype=np.float64)
    actions = np.asarray(actions)
    rewards = np.asarray(rewards, dtype=np.float64)
    params = {
        "objective": "regression",
        "learning_rate": spec.learning_rate,
        "num_leaves": spec.num_leaves,
        "min_data_in_leaf": spec.min_data_in_leaf,
        "num_threads": spec.num_threads,
        "seed": spec.seed,
        "deterministic": True,
        "verbose": -1,
    }
    boosters = []
    for k in range(n_actions):
        rows = actions == k
        if rows.sum() < spec.min_rows_per_tier:
            raise TrainingError(
                f"tier {k} was offered {int(rows.sum())} times in the log, fewer than min_rows_per_tier="
                f"{spec.min_rows_per_tier}: the logging policy must explore every tier"
            )
        data = lgb.Dataset(x[rows], rewards[rows], feature_name=feature_names or "auto", free_raw_data=True)
        boosters.append(lgb.train(params, data, num_boost_round=spec.num_boost_round))
    return boosters


def predict_rewards(boosters: list[Any], x: np.ndarray) -> np.ndarray:
    """Predicted reward of every tier, float64 [n, K]."""
    x = np.asarray(x, dtype=np.float64)
    return np.stack([np.asarray(b.predict(x, num_threads=1), dtype=np.float64) for b in boosters], axis=1)


def cross_fitted(
    x: np.ndarray, actions: np.ndarray, rewards: np.ndarray, n_actions: int, spec: RewardModelSpec, folds: int = 2
) -> np.ndarray:
    """Predicted rewards [n, K] where each row is scored by models fitted on the other folds."""
    if folds < 2:
        raise TrainingError(f"cross-fitting needs at least 2 folds, got {folds}")
    n = len(x)
    fold = np.random.default_rng(spec.seed).permutation(n) % folds
    q = np.empty((n, n_actions))
    for f in range(folds):
        held = fold == f
        boosters = fit_reward_models(x[~held], np.asarray(actions)[~held], np.asarray(rewards)[~held], n_actions, spec)
        q[held] = predict_rewards(boosters, x[held])
    return q
