"""A credit-line simulator with known true reward curves, so every estimator and learner can
be checked against the truth.

    sim = CreditLineSimulator(offers, rule, SimulatorConfig(seed=7))
    ctx = sim.contexts(50_000, rng)                  # applicant features (dict of arrays)
    pd_score = sim.pd_score(ctx, rng)                # what the PD model says (noisy, line-free)
    sim.expected_reward(ctx)                         # [n, K]: the true mean reward of each tier
    drawn, defaulted = sim.outcomes(ctx, actions, rng)
    sim.true_value(policy, ctx, pd_score)            # a policy's true value per decision

The world, per applicant ``x`` and offered line ``L`` (tier ``k``):

- the applicant draws a share ``U ~ Beta(c u(x), c (1 - u(x)))`` of the line (mean ``u(x)``),
  ``drawn = U L``;
- defaults with probability ``p(x, L) = sigmoid(base(x) + line_risk * L / (1000 * income))``:
  a line large for the applicant's income raises the risk;
- draw and default are independent given ``x`` and ``L``, so the true expected reward is
  exactly ``E[r | x, k] = u(x) L (revenue_rate - loss_given_default p(x, L))`` — revenue
  grows with the line, losses grow faster for thin incomes, and the best tier differs by
  applicant.

The PD model's score is ``sigmoid(base(x) + noise)``: an honest but imperfect estimate that
does not know the line. The library never imports this module (a workload).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlplatform.rl import OfferConfig, Policy, RewardRule

__all__ = ["FEATURES", "CreditLineSimulator", "SimulatorConfig", "legacy_scores"]

FEATURES = ("income", "bureau_score", "utilization", "tenure_months", "prior_delinquencies")


class SimulatorConfig(BaseModel):
    """The simulated world's knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line_risk: float = Field(default=1.2, ge=0.0, description="How much a line large for the income raises the default logit.")
    draw_concentration: float = Field(default=6.0, gt=0.0, description="c of the Beta draw share (larger: less noisy).")
    pd_noise: float = Field(default=0.3, ge=0.0, description="SD of the PD model's logit error.")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class CreditLineSimulator:
    """See the module docstring."""

    def __init__(self, offers: OfferConfig, rule: RewardRule, config: SimulatorConfig | None = None) -> None:
        self.offers = offers
        self.rule = rule
        self.config = config or SimulatorConfig()

    def contexts(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` applicants' features (monthly income in thousands, a standardised bureau score, …)."""
        return {
            "income": np.round(np.exp(rng.normal(1.1, 0.45, n)), 3),
            "bureau_score": np.round(rng.normal(0.0, 1.0, n), 3),
            "utilization": np.round(rng.beta(2.0, 3.0, n), 3),
            "tenure_months": rng.exponential(24.0, n).astype(np.int64).astype(np.float64),
            "prior_delinquencies": rng.poisson(0.3, n).astype(np.float64),
        }

    def base_logit(self, ctx: Mapping[str, np.ndarray]) -> np.ndarray:
        return (
            -4.3
            - 0.8 * ctx["bureau_score"]
            + 1.5 * (ctx["utilization"] - 0.4)
            + 0.5 * ctx["prior_delinquencies"]
            - 0.01 * ctx["tenure_months"]
            - 0.4 * np.log(ctx["income"] / 3.0)
        )

    def pd_score(self, ctx: Mapping[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """The PD model's score: the base default probability seen through a noisy model."""
        n = len(ctx["income"])
        return _sigmoid(self.base_logit(ctx) + 1.2 + rng.normal(0.0, self.config.pd_noise, n))

    def default_probability(self, ctx: Mapping[str, np.ndarray]) -> np.ndarray:
        """True P(default | x, tier), [n, K]."""
        lines = self.offers.amounts[None, :]
        return _sigmoid(self.base_logit(ctx)[:, None] + self.config.line_risk * lines / (1000.0 * ctx["income"][:, None]))

    def draw_share(self, ctx: Mapping[str, np.ndarray]) -> np.ndarray:
        """u(x): the mean share of the line drawn, [n]."""
        return _sigmoid(-0.2 + 1.5 * ctx["utilization"] - 0.15 * np.log(ctx["income"] / 3.0))

    def expected_reward(self, ctx: Mapping[str, np.ndarray]) -> np.ndarray:
        """True E[reward | x, tier], [n, K] (exact, see the module docstring)."""
        drawn = self.draw_share(ctx)[:, None] * self.offers.amounts[None, :]
        return drawn * (self.rule.revenue_rate - self.rule.loss_given_default * self.default_probability(ctx))

    def outcomes(self, ctx: Mapping[str, np.ndarray], actions: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Sampled (drawn, defaulted) for the offered tiers."""
        n = len(actions)
        u = self.draw_share(ctx)
        c = self.config.draw_concentration
        share = rng.beta(c * u, c * (1.0 - u))
        drawn = np.round(share * self.offers.amounts[actions], 2)
        p = self.default_probability(ctx)[np.arange(n), actions]
        return drawn, rng.random(n) < p

    def true_value(self, policy: Policy, ctx: Mapping[str, np.ndarray], pd_score: np.ndarray) -> float:
        """The policy's true expected reward per decision on these applicants."""
        probs = policy.probabilities(ctx, pd_score)
        return float((probs * self.expected_reward(ctx)).sum(axis=1).mean())


def legacy_scores(offers: OfferConfig, rule: RewardRule, x: np.ndarray) -> np.ndarray:
    """The lender's current rule of thumb, a policy's scores [n, K] from the context matrix
    (FEATURES order): every applicant draws 60% of the line and defaults at a rate that
    grows with the line but ignores income — a reasonable, misspecified guess to improve on."""
    bureau = x[:, FEATURES.index("bureau_score")]
    p = _sigmoid(-3.2 - 0.8 * bureau)[:, None] * (1.0 + offers.amounts[None, :] / 5000.0)
    return 0.6 * offers.amounts[None, :] * (rule.revenue_rate - rule.loss_given_default * p)
