"""Credit-line offers as a contextual bandit (issue 16): a simulator with known true reward
curves, offers logged with propensities by an exploring policy, rewards joined point in
time, off-policy evaluation, a LightGBM bandit and RLlib MARWIL, registered as ``policy``
models.

    mlp run configs/credit_line.yaml

Modules: ``simulator`` (the world: contexts, PD score, true rewards, outcomes; numpy only),
``pipeline`` (the workload's ``Config`` and ``steps``).
"""

from workloads.credit_line.pipeline import Config, steps

__all__ = ["Config", "steps"]
