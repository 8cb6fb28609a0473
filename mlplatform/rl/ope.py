"""Off-policy evaluation: what a candidate policy would have earned on logged decisions.

    estimates = off_policy_estimates(target, actions, propensities, rewards, q_hat=q_hat)
    estimates["dr"].value, estimates["dr"].low, estimates["dr"].high

From decisions logged by another (exploring) policy — each with the action taken, its
propensity ``mu_i`` under the logging policy and its reward — and the candidate's
probabilities ``pi(a | x_i)`` for every action:

- ``ips`` (inverse propensity scoring): mean of ``w_i * r_i``, ``w_i = pi(a_i | x_i) / mu_i``.
  Unbiased when every action the candidate takes had ``mu > 0``; its variance grows with the
  weights.
- ``snips`` (self-normalised IPS): ``sum(w_i r_i) / sum(w_i)``. Slightly biased, usually far
  less variable, and invariant to a constant added to the rewards.
- ``dr`` (doubly robust): ``mean( sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) )`` with
  a reward model ``q``. Unbiased if either the propensities or ``q`` are right, and its
  variance is that of the model's residuals, so a decent ``q`` narrows the interval. ``q``
  should not have seen the rows it scores (``mlplatform.rl.reward_model.cross_fitted``).

Intervals are normal (Wald) intervals at ``level`` on the per-decision terms, the delta
method for SNIPS; each estimate reports the effective sample size
``(sum w)^2 / sum w^2`` of its weights, which says how much of the log the candidate can
actually use (a small one means a wide, unreliable interval).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from mlplatform.errors import DataError

__all__ = ["ESTIMATORS", "Estimate", "off_policy_estimates"]

ESTIMATORS = ("ips", "snips", "dr")


@dataclass(frozen=True)
class Estimate:
    """One estimator's value of a policy, with its standard error and interval."""

    estimator: str
    value: float
    stderr: float
    low: float
    high: float
    n: int
    effective_sample_size: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def off_policy_estimates(
    target: np.ndarray,
    actions: np.ndarray,
    propensities: np.ndarray,
    rewards: np.ndarray,
    *,
    q_hat: np.ndarray | None = None,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """IPS, SNIPS and (with ``q_hat``) DR estimates of the policy whose probabilities are ``target``.

    Args:
        target: float [n, K], the candidate's probability of each action for each logged context.
        actions: int [n], the logged action (index into K).
        propensities: float [n], the logging policy's probability of that action (> 0).
        rewards: float [n], the observed rewards.
        q_hat: float [n, K], a reward model's prediction for every action (for ``dr``).
        level: the intervals' coverage, e.g. 0.95.

    Returns:
        ``{"ips": Estimate, "snips": Estimate, "dr": Estimate}`` (``dr`` only with ``q_hat``).

    Raises:
        DataError: shapes differ, no rows, a propensity not in (0, 1], a non-finite value.
    """
    target, actions, mu, r = _checked(target, actions, propensities, rewards, q_hat, level)
    n = len(r)
    rows = np.arange(n)
    w = target[rows, actions] / mu
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    ess = float(w.sum() ** 2 / np.square(w).sum()) if np.square(w).sum() > 0 else 0.0

    def estimate(name: str, value: float, terms: np.ndarray) -> Estimate:
        se = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
        return Estimate(name, float(value), se, float(value - z * se), float(value + z * se), n, ess)

    ips_terms = w * r
    out = {"ips": estimate("ips", ips_terms.mean(), ips_terms)}
    mean_w = w.mean()
    if mean_w > 0:
        snips = float(ips_terms.sum() / w.sum())
        out["snips"] = estimate("snips", snips, w * (r - snips) / mean_w)
    else:  # the candidate never agrees with the log: nothing to normalise by
        out["snips"] = Estimate("snips", float("nan"), float("inf"), float("-inf"), float("inf"), n, 0.0)
    if q_hat is not None:
        q = np.asarray(q_hat, dtype=np.float64)
        dr_terms = (target * q).sum(axis=1) + w * (r - q[rows, actions])
        out["dr"] = estimate("dr", dr_terms.mean(), dr_terms)
    return out


def _checked(
    target: Any, actions: Any, propensities: Any, rewards: Any, q_hat: Any, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    target = np.asarray(target, dtype=np.float64)
    actions = np.asarray(actions)
    mu = np.asarray(propensities, dtype=np.float64).reshape(-1)
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if target.ndim != 2 or not (len(target) == len(actions) == len(mu) == len(r)):
        raise DataError(
            f"target must be [n, K] with n = len(actions) = len(propensities) = len(rewards); got "
            f"{target.shape}, {actions.shape}, {mu.shape}, {r.shape}"
        )
    if len(r) == 0:
        raise DataError("no logged decisions to evaluate on (an empty window?)")
    if not np.issubdtype(actions.dtype, np.integer) or (actions < 0).any() or (actions >= target.shape[1]).any():
        raise DataError(f"actions must be integers in [0, {target.shape[1]}), got {actions[:5]!r}…")
    if not np.isfinite(mu).all() or (mu <= 0).any() or (mu > 1 + 1e-9).any():
        bad = int(np.flatnonzero(~np.isfinite(mu) | (mu <= 0) | (mu > 1 + 1e-9))[0])
        raise DataError(f"propensities must be in (0, 1], got {float(mu[bad])!r} at row {bad}")
    if not np.isfinite(r).all() or not np.isfinite(target).all():
        raise DataError("rewards and target probabilities must be finite")
    if q_hat is not None and np.shape(q_hat) != target.shape:
        raise DataError(f"q_hat must have the target's shape {target.shape}, got {np.shape(q_hat)}")
    if not 0.0 < level < 1.0:
        raise DataError(f"level must be in (0, 1), got {level!r}")
    return target, actions.astype(np.int64), mu, r
