"""Offers, selection and rewards (issue 16), without Ray: the risk cap, logged propensities,
the point-in-time reward join and the policy flavor's round trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlplatform.errors import DataError, ModelError
from mlplatform.models.flavors import get_flavor
from mlplatform.rl import (
    FixedTierPolicy,
    OfferConfig,
    OfferSelector,
    OfferTier,
    PolicyModel,
    RewardRule,
    RiskCap,
    ScoredPolicy,
    Selection,
    join_rewards,
    select,
)
from mlplatform.rl.reward_model import RewardModelSpec, fit_reward_models
from workloads.credit_line.simulator import FEATURES, CreditLineSimulator, legacy_scores

OFFERS = OfferConfig(
    tiers=[OfferTier(name=f"line_{a}", amount=a) for a in (500, 1000, 2000, 3500, 5000)],
    risk_caps=[
        RiskCap(pd_below=0.03, max_tier="line_5000"),
        RiskCap(pd_below=0.06, max_tier="line_3500"),
        RiskCap(pd_below=0.12, max_tier="line_2000"),
        RiskCap(pd_below=0.25, max_tier="line_1000"),
    ],
)
RULE = RewardRule(revenue_rate=0.10, loss_given_default=0.6, horizon_days=90)


def test_the_cap_bands_are_exclusive_above_and_the_smallest_tier_is_always_allowed():
    pd = np.array([0.0, 0.0299, 0.03, 0.059, 0.06, 0.2499, 0.25, 1.0])
    assert OFFERS.max_tier_index(pd).tolist() == [4, 4, 3, 3, 2, 1, 0, 0]
    allowed = OFFERS.allowed(pd)
    assert allowed[:, 0].all() and allowed.sum(axis=1).tolist() == [5, 5, 4, 4, 3, 2, 1, 1]
    with pytest.raises(DataError, match=r"probability_of_default must be in \[0, 1\], got 1.5 at row 1"):
        OFFERS.allowed([0.1, 1.5])
    with pytest.raises(DataError, match="got nan"):
        OFFERS.allowed([float("nan")])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"risk_caps": [{"pd_below": 0.1, "max_tier": "line_9"}]}, "unknown tiers"),
        ({"risk_caps": [{"pd_below": 0.2, "max_tier": "line_500"}, {"pd_below": 0.1, "max_tier": "line_500"}]}, "increasing pd_below"),
        ({"tiers": [{"name": "b", "amount": 2}, {"name": "a", "amount": 1}]}, "increasing amount"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_bad_offer_configs_are_refused_naming_the_problem(bad, message):
    base = OFFERS.model_dump(mode="json") | {"risk_caps": [{"pd_below": 0.1, "max_tier": "line_500"}]}
    if "tiers" in bad:
        base["risk_caps"] = [{"pd_below": 0.1, "max_tier": "a"}]
    with pytest.raises(ValidationError, match=message):
        OfferConfig.model_validate(base | bad)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.lists(st.floats(-1e3, 1e3), min_size=5, max_size=5), min_size=1, max_size=20),
    pds=st.lists(st.floats(0.0, 1.0), min_size=20, max_size=20),
    kind=st.sampled_from(["greedy", "softmax"]),
    temperature=st.floats(0.01, 100.0),
    epsilon=st.floats(0.0, 0.9),
)
def test_selection_is_a_distribution_over_the_allowed_tiers(scores, pds, kind, temperature, epsilon):
    s = np.array(scores)
    allowed = OFFERS.allowed(np.array(pds[: len(s)]))
    probs = select(s, allowed, Selection(kind=kind, temperature=temperature, epsilon=epsilon))
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs[~allowed] == 0).all() and (probs >= 0).all()
    if epsilon > 0:  # exploring: every allowed tier keeps at least epsilon / K
        assert (probs[allowed] >= epsilon / 5 - 1e-12).all()


def _logged(n: int = 4000, seed: int = 0):
    sim = CreditLineSimulator(OFFERS, RULE)
    rng = np.random.default_rng(seed)
    ctx = sim.contexts(n, rng)
    pd = sim.pd_score(ctx, rng)
    policy = ScoredPolicy("legacy", FEATURES, OFFERS, lambda x: legacy_scores(OFFERS, RULE, x), Selection(kind="softmax", temperature=40, epsilon=0.3))
    batch = OfferSelector(policy, policy_version=2).choose([f"d-{seed}-{i}" for i in range(n)], ctx, pd)
    return sim, ctx, pd, policy, batch, rng


def test_logged_propensities_are_valid_on_every_decision_and_the_draw_is_replayable():
    sim, ctx, pd, policy, batch, _ = _logged()
    records = batch.records()
    for record, allowed in zip(records, batch.allowed, strict=True):
        probs = np.array(record["probabilities"])
        assert record["propensity"] > 0 and record["tier"] in record["allowed"]
        assert record["allowed"] == [t for t, ok in zip(OFFERS.names, allowed, strict=True) if ok]
        assert probs[allowed].sum() == pytest.approx(1.0) and (probs[~allowed] == 0).all() and (probs[allowed] > 0).all()
        assert record["policy"] == "legacy" and record["policy_version"] == 2 and set(record["context"]) == set(FEATURES)
    # the same decision ids choose the same tiers (replay), other ids draw anew
    again = OfferSelector(policy, policy_version=2).choose(batch.decision_ids, ctx, pd)
    assert (again.actions == batch.actions).all()
    # the draw follows the propensities: each tier's share is its mean probability (±4 SE)
    share = np.bincount(batch.actions, minlength=5) / len(batch.actions)
    expected = batch.probabilities.mean(axis=0)
    assert np.all(np.abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / len(batch.actions)))


def test_a_policy_that_offers_above_the_cap_is_refused():
    class Reckless(FixedTierPolicy):
        def probabilities(self, contexts, probability_of_default):
            probs = np.zeros((len(probability_of_default), 5))
            probs[:, 4] = 1.0
            return probs

    policy = Reckless("line_5000", OFFERS, FEATURES)
    ctx = {f: np.ones(2) for f in FEATURES}
    with pytest.raises(ModelError, match="above the risk cap"):
        OfferSelector(policy).choose(["a", "b"], ctx, [0.01, 0.2])
    with pytest.raises(DataError, match="missing features"):
        OfferSelector(FixedTierPolicy("line_500", OFFERS, FEATURES)).choose(["a"], {"income": [1.0]}, [0.01])


def _t(day: int, hours: float = 0.0) -> datetime:
    return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=day, hours=hours)


def test_rewards_are_joined_point_in_time_never_before_the_horizon():
    rule = RewardRule(revenue_rate=0.1, loss_given_default=0.5, horizon_days=30)
    log = pa.table({"decision_id": ["a", "b", "c", "d"], "decided_at": [_t(0), _t(0), _t(10), _t(0)]})
    outcomes = pa.table(
        {
            "decision_id": ["a", "a", "a", "b", "c"],
            "observed_at": [_t(5), _t(30), _t(31), _t(29), _t(40)],
            "drawn": [100.0, 200.0, 200.0, 50.0, 80.0],
            "defaulted": [False, False, True, True, False],
        }
    )
    # as of day 35: a, b and d are past their horizon (day 30); c's ends on day 40
    table, report = join_rewards(log, outcomes, rule, as_of=_t(35))
    rows = {r["decision_id"]: r for r in table.to_pylist()}
    assert report == {"decisions": 4, "before_horizon": 1, "missing_outcome": 1, "rewarded": 2}
    # a: the record at the horizon (day 30), not the later default on day 31
    assert rows["a"]["reward"] == pytest.approx(200 * 0.1) and rows["a"]["defaulted"] is False
    assert rows["b"]["reward"] == pytest.approx(50 * 0.1 - 50 * 0.5)
    assert "c" not in rows and "d" not in rows
    # a moment before c's horizon it is not rewarded; at the horizon it is
    assert "c" not in {r["decision_id"] for r in join_rewards(log, outcomes, rule, as_of=_t(39, 23))[0].to_pylist()}
    assert "c" in {r["decision_id"] for r in join_rewards(log, outcomes, rule, as_of=_t(40))[0].to_pylist()}
    # naive timestamps are UTC
    naive = pa.table({"decision_id": ["a"], "decided_at": [_t(0).replace(tzinfo=None)]})
    assert join_rewards(naive, outcomes, rule, as_of="2024-02-05")[1]["rewarded"] == 1


def test_bad_reward_input_is_refused():
    log = pa.table({"decision_id": ["a", "a"], "decided_at": [_t(0), _t(0)]})
    out = pa.table({"decision_id": ["a"], "observed_at": [_t(1)], "drawn": [-1.0], "defaulted": [False]})
    with pytest.raises(DataError, match="duplicate decision_id 'a'"):
        join_rewards(log, out, RULE, as_of=_t(200))
    with pytest.raises(DataError, match="'drawn' must be a finite amount"):
        join_rewards(log.slice(0, 1), out, RULE, as_of=_t(200))
    with pytest.raises(DataError, match=r"outcomes is missing columns \['defaulted'\]"):
        join_rewards(log.slice(0, 1), out.drop(["defaulted"]), RULE, as_of=_t(200))


def test_policy_flavor_round_trip_serves_the_same_offers_under_the_cap():
    sim, ctx, pd, _, batch, rng = _logged(n=3000)
    x = np.stack([ctx[f] for f in FEATURES], axis=1)
    rewards = RULE.reward(*sim.outcomes(ctx, batch.actions, rng))
    boosters = fit_reward_models(x, batch.actions, rewards, 5, RewardModelSpec(num_boost_round=20, min_data_in_leaf=20))
    bandit = PolicyModel.from_reward_models("bandit", boosters, FEATURES, OFFERS, Selection(kind="greedy"))
    rng2 = np.random.default_rng(1)
    layers = [(rng2.normal(size=(8, 5)), rng2.normal(size=8)), (rng2.normal(size=(5, 8)), rng2.normal(size=5))]
    mlp = PolicyModel.from_mlp("mlp", layers, x.mean(axis=0), x.std(axis=0), FEATURES, OFFERS)
    flavor = get_flavor("policy")
    for model in (bandit, mlp):
        saved = flavor.save(model)
        assert saved.config["kind"] == model.kind and saved.config["features"] == list(FEATURES)
        predictor = flavor.load(saved.files, saved.config)
        assert [s.name for s in predictor.signature.inputs] == [*FEATURES, "probability_of_default"]
        out = predictor.predict({**ctx, "probability_of_default": pd})
        assert np.array_equal(out["probabilities"], model.probabilities(ctx, pd))
        assert (out["probabilities"][~OFFERS.allowed(pd)] == 0).all()
        assert (out["action"] <= OFFERS.max_tier_index(pd)).all()
        # a loaded policy is a Policy: the selector logs its offers
        assert OfferSelector(predictor).choose(batch.decision_ids, ctx, pd).propensities.min() == 1.0
    with pytest.raises(DataError, match="missing \\['probability_of_default'\\]"):
        predictor.predict(dict(ctx))
    with pytest.raises(DataError, match="must have shape"):
        predictor.predict({**{f: np.ones((2, 2)) for f in FEATURES}, "probability_of_default": np.ones((2, 2))})
    with pytest.raises(ModelError, match="not a policy document"):
        flavor.load({"policy.json": b'{"format": "x"}'}, {})
    with pytest.raises(ModelError, match="does not parse"):
        flavor.load({"policy.json": b"\x80pickle"}, {})
    with pytest.raises(ModelError, match="needs a mlplatform.rl.PolicyModel"):
        flavor.save(object())


def test_an_evaluation_window_needs_both_ends_or_neither():
    from mlplatform.rl.api import window_of

    assert window_of(None, None) is None
    assert window_of("2024-05-01", "2024-06-01") == (datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC))
    with pytest.raises(DataError, match="both ends of the window or neither"):
        window_of("2024-05-01", None)
    with pytest.raises(DataError, match="window end"):
        window_of("2024-05-01", "next tuesday")


def test_logged_offers_are_written_in_rllibs_offline_schema(tmp_path):
    """The episodes MARWIL reads: exactly RLlib's single-agent columns (any other column would
    be carried into the episode as a model output), one terminated step per offer."""
    import pyarrow.parquet as pq
    from ray.rllib.offline.offline_prelearner import SCHEMA

    from mlplatform import Platform
    from mlplatform.rl.offline_rl import write_episodes

    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 3.0, size=(50, 3))
    rewards = rng.normal(100.0, 20.0, 50)
    paths = write_episodes(platform.datasets, "rl/offers/episodes", x, np.arange(50) % 5, rewards, x.mean(0), x.std(0), reward_scale=2.0)
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    assert set(table.column_names) <= set(SCHEMA.values()) and {"obs", "actions", "rewards", "new_obs"} <= set(table.column_names)
    obs = np.array(table["obs"].to_pylist())
    assert obs.shape == (50, 3) and np.allclose(obs.mean(0), 0, atol=1e-5) and np.allclose(obs.std(0), 1, atol=1e-4)
    assert np.allclose(table["rewards"].to_numpy(), 2.0 * (rewards - rewards.mean()) / rewards.std(), atol=1e-4)
    assert table["terminateds"].to_pylist() == [True] * 50 and table["truncateds"].to_pylist() == [False] * 50
    assert table["eps_id"].to_pandas().is_unique
