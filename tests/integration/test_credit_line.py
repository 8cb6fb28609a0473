"""The credit-line workload end to end on a real local Ray (issue 16), small: the offer log's
propensities read back from storage, rewards point in time, MARWIL (RLlib, new API stack, on
CPU) and the LightGBM bandit beating the acting policy in true simulator value without ever
offering above the cap, both registered with flavor ``policy`` behind the ``shadow`` alias
and served by their predictors; ``platform.rl.evaluate`` on a registered policy and a window;
``mlp rl evaluate``'s errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlplatform import Platform
from mlplatform.errors import DataError, ModelError
from mlplatform.jobs import load_workload
from mlplatform.rl.reward_model import RewardModelSpec
from workloads.credit_line.pipeline import logging_policy, simulator
from workloads.credit_line.simulator import FEATURES

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "credit_line.yaml"


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("credit_line"))}})
    workload = load_workload(
        CONFIG,
        {
            "simulation.decisions": 8_000,
            "marwil.iterations": 1,
            "marwil.updates_per_iteration": 30,
            "bandit.num_boost_round": 60,
            "evaluation_model.num_boost_round": 40,
        },
    )
    results = workload.run(platform, force=True)
    return platform, workload.config, results


def test_logged_propensities_are_valid_on_every_decision(run):
    platform, config, _ = run
    log = platform.datasets.read_table(platform.rl.names.offers).to_pandas()
    assert len(log) == 8_000 and log["decision_id"].is_unique
    allowed = np.array(log["allowed"].tolist())
    probs = np.array(log["probabilities"].tolist())
    assert (log["propensity"] > 0).all()
    assert np.allclose((probs * allowed).sum(axis=1), 1.0)
    assert (probs[~allowed] == 0).all() and (probs[allowed] > 0).all()
    assert np.allclose(probs[np.arange(len(log)), log["action"]], log["propensity"])
    assert allowed[np.arange(len(log)), log["action"]].all()
    assert (log["policy"] == "rule_of_thumb").all() and (log["policy_version"] == 1).all()


def test_rewards_wait_for_the_horizon(run):
    platform, config, _ = run
    version, report = platform.rl.join_rewards(config.reward, "2024-06-01")
    assert report["before_horizon"] > 0 and report["rewarded"] + report["before_horizon"] == 8_000
    rewarded = platform.datasets.read_table(platform.rl.names.rewards).to_pandas()
    horizon = pd.Timedelta(days=config.reward.horizon_days)
    assert (rewarded["decided_at"] + horizon <= pd.Timestamp("2024-06-01", tz="UTC")).all()
    platform.rl.join_rewards(config.reward, config.as_of)  # back to every decision for the tests below


def test_learned_policies_beat_the_acting_policy_within_the_cap(run):
    _, _, results = run
    learned = results["evaluate/learned"]
    acting = learned["rule_of_thumb"]["true_value"]
    for name in ("credit_line_bandit", "credit_line_marwil"):
        assert learned[name]["true_value"] > acting, (name, learned[name]["true_value"], acting)
        assert learned[name]["offers_above_cap"] == 0
    reference = results["evaluate/reference"]
    for name, r in reference.items():
        assert r["dr_covers"] or abs(r["errors_pct"]["dr"]) < 5, (name, r)


def test_registered_policies_serve_through_their_predictor(run):
    platform, config, _ = run
    sim = simulator(config)
    rng = np.random.default_rng(5)
    ctx = sim.contexts(500, rng)
    pd_score = sim.pd_score(ctx, rng)
    for name in ("credit_line_bandit", "credit_line_marwil"):
        mv, predictor = platform.models.load_predictor(name, alias="shadow")
        assert mv.flavor == "policy" and mv.flavor_config["features"] == list(FEATURES)
        assert mv.metrics["simulator_true_value"] > mv.metrics["acting_policy_true_value"]
        out = predictor.predict({**ctx, "probability_of_default": pd_score})
        assert (out["action"] <= config.offers.max_tier_index(pd_score)).all()
        assert np.allclose(out["probabilities"].sum(axis=1), 1.0)


def test_evaluate_a_registered_policy_on_a_window(run):
    platform, config, _ = run
    cheap = RewardModelSpec(num_boost_round=20, num_leaves=7)  # DR's cross-fitted model, small for the test
    result = platform.rl.evaluate("credit_line_bandit", ("2024-05-01", "2024-10-01"), alias="shadow", reward_model=cheap)
    assert result.policy.startswith("credit_line_bandit v") and 0 < result.decisions < 8_000
    assert set(result.estimates) == {"ips", "snips", "dr"}
    assert all(e.low <= e.value <= e.high for e in result.estimates.values())
    with pytest.raises(DataError, match="no rewarded decisions in"):
        platform.rl.evaluate("credit_line_bandit", ("2030-01-01", "2030-02-01"))
    with pytest.raises(DataError, match="must be after its start"):
        platform.rl.evaluate("credit_line_bandit", ("2024-05-01", "2024-04-01"))
    platform.models.register("not_a_policy", flavor="lightgbm", model=_tiny_booster(), lineage={}, metrics={}, params={})
    with pytest.raises(ModelError, match="not 'policy'"):
        platform.rl.evaluate("not_a_policy")
    # the acting policy itself, as a Policy object: IPS on its own log is its mean reward
    own = platform.rl.evaluate(logging_policy(config), reward_model=cheap)
    assert own.estimates["ips"].value == pytest.approx(own.logged_value)


def _tiny_booster():
    import lightgbm

    x = np.random.default_rng(0).normal(size=(200, 2))
    return lightgbm.train({"objective": "binary", "verbose": -1}, lightgbm.Dataset(x, (x[:, 0] > 0).astype(int)), num_boost_round=2)
