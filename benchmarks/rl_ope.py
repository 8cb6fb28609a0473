"""Off-policy estimators against the credit-line simulator's truth (issue 16).

    python benchmarks/rl_ope.py [--decisions 50000] [--seeds 5]

For each seed: simulate ``--decisions`` offers logged by the workload's acting policy
(softmax with epsilon over the rule of thumb, within the PD cap), then estimate three policies
with IPS, SNIPS and DR (cross-fitted LightGBM reward model, 2 folds) and compare with each
policy's true value in the simulator. Prints the mean and largest absolute error in percent,
DR's interval coverage over the seeds and the mean standard errors. No Ray.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlplatform.rl import FixedTierPolicy, OfferSelector, ScoredPolicy, Selection, context_matrix, off_policy_estimates
from mlplatform.rl.reward_model import RewardModelSpec, cross_fitted
from workloads.credit_line.pipeline import Config, logging_policy, simulator
from workloads.credit_line.simulator import FEATURES, legacy_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    config = Config()
    sim, offers, rule = simulator(config), config.offers, config.reward
    policies = [
        ScoredPolicy("rule_of_thumb_greedy", FEATURES, offers, lambda x: legacy_scores(offers, rule, x)),
        FixedTierPolicy("line_1000", offers, FEATURES),
        ScoredPolicy(
            "oracle_softmax_t10",
            FEATURES,
            offers,
            lambda x: sim.expected_reward({f: x[:, i] for i, f in enumerate(FEATURES)}),
            Selection(kind="softmax", temperature=10.0),
        ),
    ]
    rows: dict[tuple[str, str], list[tuple[float, bool, float]]] = {}
    truths: dict[str, list[float]] = {}
    started = time.monotonic()
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        ctx = sim.contexts(args.decisions, rng)
        pd = sim.pd_score(ctx, rng)
        batch = OfferSelector(logging_policy(config)).choose([f"b{seed}-{i}" for i in range(args.decisions)], ctx, pd)
        rewards = rule.reward(*sim.outcomes(ctx, batch.actions, rng))
        q_hat = cross_fitted(context_matrix(ctx, FEATURES), batch.actions, rewards, len(offers.tiers), RewardModelSpec(num_boost_round=80))
        for policy in policies:
            truth = sim.true_value(policy, ctx, pd)
            truths.setdefault(policy.name, []).append(truth)
            est = off_policy_estimates(policy.probabilities(ctx, pd), batch.actions, batch.propensities, rewards, q_hat=q_hat)
            for name, e in est.items():
                rows.setdefault((policy.name, name), []).append((100 * abs(e.value - truth) / truth, e.covers(truth), e.stderr))
    print(f"{args.decisions:,} decisions x {args.seeds} seeds, {time.monotonic() - started:.1f}s")
    print("| policy | true value (mean) | estimator | mean abs error | max abs error | 95% CI covers | mean SE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (policy, estimator), values in rows.items():
        err = np.array([v[0] for v in values])
        covers = sum(v[1] for v in values)
        se = np.mean([v[2] for v in values])
        print(f"| {policy} | {np.mean(truths[policy]):.1f} | {estimator} | {err.mean():.2f}% | {err.max():.2f}% | {covers}/{len(values)} | {se:.2f} |")


if __name__ == "__main__":
    main()
