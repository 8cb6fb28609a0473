"""The credit-line workload as steps (``mlp run configs/credit_line.yaml``):

    log → reward → evaluate (reference policies) → train (bandit, MARWIL) → evaluate (learned) → register

``log`` simulates approved checkouts over ``simulation.days`` and chooses each offer with the
acting (logging) policy through ``OfferSelector`` — a softmax with ε over the lender's rule of
thumb, within the PD risk cap — publishing the offer log (context, action, propensity,
allowed tiers, policy version) and the outcomes (a mid-horizon record and the final one at
the horizon). ``reward`` joins them point in time as of ``as_of`` (decisions whose horizon has
not passed are left out). ``evaluate`` estimates reference policies with IPS, SNIPS and DR
and compares them with their true value in the simulator; ``train`` fits the LightGBM
bandit and RLlib MARWIL; the second ``evaluate`` does the same for the learned policies;
``register`` stores both with flavor ``policy`` and points their ``shadow`` alias at the new
versions (logged beside the acting policy first; promotion is moving the serving alias).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlplatform.jobs.steps import Done, Step
from mlplatform.rl import FixedTierPolicy, OfferConfig, OfferSelector, OfferTier, RewardRule, RiskCap, ScoredPolicy, Selection
from mlplatform.rl.offline_rl import MarwilSpec
from mlplatform.rl.reward_model import RewardModelSpec
from workloads.credit_line.simulator import FEATURES, CreditLineSimulator, SimulatorConfig, legacy_scores

if TYPE_CHECKING:
    from mlplatform.platform import Platform

DEFAULT_OFFERS = OfferConfig(
    tiers=[OfferTier(name=f"line_{a}", amount=a, installments=4 if a <= 1000 else 6) for a in (500, 1000, 2000, 3500, 5000)],
    risk_caps=[
        RiskCap(pd_below=0.03, max_tier="line_5000"),
        RiskCap(pd_below=0.06, max_tier="line_3500"),
        RiskCap(pd_below=0.12, max_tier="line_2000"),
        RiskCap(pd_below=0.25, max_tier="line_1000"),
    ],
)


class Simulation(BaseModel):
    """How many decisions to simulate, when, and how the acting policy explores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decisions: int = Field(default=50_000, ge=100, le=10_000_000, description="Approved checkouts to simulate.")
    start: datetime = Field(default=datetime(2024, 1, 1, tzinfo=UTC), description="First decision time (UTC).")
    days: int = Field(default=180, ge=1, description="Decisions are spread uniformly over this many days.")
    seed: int = Field(default=7, description="Seed of the simulated world and outcomes.")
    logging: Selection = Field(
        default_factory=lambda: Selection(kind="softmax", temperature=40.0, epsilon=0.3),
        description="The acting policy's exploration over the rule-of-thumb scores.",
    )
    policy_version: int = Field(default=1, ge=1, description="The acting policy's version, logged with each offer.")
    world: SimulatorConfig = Field(default_factory=SimulatorConfig, description="The simulated world's knobs.")


class ModelNames(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bandit: str = Field(default="credit_line_bandit", pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    offline: str = Field(default="credit_line_marwil", pattern=r"^[a-z][a-z0-9_-]{0,63}$")


class Config(BaseModel):
    """The credit-line workload file's sections (configs/credit_line.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    simulation: Simulation = Field(default_factory=Simulation, description="The simulated decisions.")
    offers: OfferConfig = Field(default=DEFAULT_OFFERS, description="Offer tiers and the PD risk cap.")
    reward: RewardRule = Field(
        default_factory=lambda: RewardRule(revenue_rate=0.10, loss_given_default=0.6, horizon_days=90),
        description="Revenue minus loss given default over the horizon.",
    )
    as_of: datetime = Field(default=datetime(2024, 10, 1, tzinfo=UTC), description="When rewards are joined: outcomes known by then.")
    train_until: datetime = Field(
        default=datetime(2024, 5, 1, tzinfo=UTC),
        description="Learners train on decisions before this and are evaluated on those after it (held out).",
    )
    bandit: RewardModelSpec = Field(default_factory=RewardModelSpec, description="The bandit's reward models.")
    evaluation_model: RewardModelSpec = Field(
        default_factory=lambda: RewardModelSpec(num_boost_round=80), description="DR's cross-fitted reward model."
    )
    marwil: MarwilSpec = Field(default_factory=lambda: MarwilSpec(reward_scale=4.0), description="The RLlib MARWIL run.")
    model_names: ModelNames = Field(default_factory=ModelNames, description="Registered model names.")
    shadow_alias: str = Field(default="shadow", pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="Alias set on new versions.")

    @model_validator(mode="after")
    def _check_dates(self) -> Config:
        start, end = self.simulation.start, self.simulation.start + timedelta(days=self.simulation.days)
        if not start < self.train_until < min(end, self.as_of):
            raise ValueError(
                f"train_until {self.train_until.isoformat()} must fall inside the simulated decisions "
                f"({start.isoformat()} to {end.isoformat()}) and before as_of {self.as_of.isoformat()}"
            )
        return self


def simulator(config: Config) -> CreditLineSimulator:
    return CreditLineSimulator(config.offers, config.reward, config.simulation.world)


def logging_policy(config: Config) -> ScoredPolicy:
    """The acting policy: the rule of thumb with softmax and ε exploration."""
    return ScoredPolicy(
        "rule_of_thumb", FEATURES, config.offers, lambda x: legacy_scores(config.offers, config.reward, x), config.simulation.logging
    )


def reference_policies(config: Config) -> list[Any]:
    """Policies to check the estimators on: the acting policy, its greedy twin, a fixed tier."""
    greedy = ScoredPolicy("rule_of_thumb_greedy", FEATURES, config.offers, lambda x: legacy_scores(config.offers, config.reward, x))
    return [logging_policy(config), greedy, FixedTierPolicy("line_1000", config.offers, FEATURES)]


def simulate_log(platform: Platform, config: Config) -> dict[str, Any]:
    """Simulate the decisions with the acting policy and publish the offer log and outcomes."""
    import pyarrow as pa

    sim, sim_cfg = simulator(config), config.simulation
    rng = np.random.default_rng(sim_cfg.seed)
    n = sim_cfg.decisions
    ctx = sim.contexts(n, rng)
    pd_score = sim.pd_score(ctx, rng)
    seconds = np.sort(rng.uniform(0, sim_cfg.days * 86400.0, n))
    decided = pd_at(sim_cfg.start, seconds)
    ids = [f"cl-{sim_cfg.seed}-{i:08d}" for i in range(n)]
    batch = OfferSelector(logging_policy(config), policy_version=sim_cfg.policy_version).choose(ids, ctx, pd_score)
    columns = batch.columns() | {"decided_at": decided}
    meta = {"features": list(FEATURES), "tiers": config.offers.names, "offers": config.offers.model_dump(mode="json")}
    names = platform.rl.names
    offers_v = platform.datasets.publish(names.offers, pa.table(columns), metadata=meta)

    drawn, defaulted = sim.outcomes(ctx, batch.actions, rng)
    horizon = timedelta(days=config.reward.horizon_days)
    # the outcome as known a month in (no default yet, part of the draw), then final at the horizon
    outcomes = pa.table(
        {
            "decision_id": ids + ids,
            "observed_at": [t + timedelta(days=30) for t in decided] + [t + horizon for t in decided],
            "drawn": np.concatenate([np.round(drawn * 0.5, 2), drawn]),
            "defaulted": np.concatenate([np.zeros(n, bool), defaulted]),
        }
    )
    out_v = platform.datasets.publish(names.outcomes, outcomes)
    return {"offers_version": offers_v.version, "outcomes_version": out_v.version, "rows": n, "min_propensity": float(batch.propensities.min())}


def pd_at(start: datetime, seconds: np.ndarray) -> list[datetime]:
    start = start if start.tzinfo else start.replace(tzinfo=UTC)
    return [start + timedelta(seconds=float(s)) for s in seconds]


def steps(platform: Platform, config: Config):
    """The workload's steps (see the module docstring); each hands the next what it made."""
    from mlplatform.rl.reward_model import cross_fitted

    state: dict[str, Any] = {}
    sim = simulator(config)

    def log_step() -> Done:
        out = simulate_log(platform, config)
        return Done(
            summary=f"{out['rows']:,} offers by the acting policy, smallest propensity {out['min_propensity']:.3f}",
            rows=out["rows"],
            where=platform.storage.uri(platform.rl.names.offers),
            output=out,
            value=out,
        )

    yield Step("log", log_step)

    def reward_step() -> Done:
        version, report = platform.rl.join_rewards(config.reward, config.as_of)
        return Done(
            summary=(
                f"{report['rewarded']:,} of {report['decisions']:,} decisions rewarded as of {config.as_of:%Y-%m-%d} "
                f"({report['before_horizon']:,} before their horizon)"
            ),
            rows=report["rewarded"],
            where=platform.storage.uri(platform.rl.names.rewards),
            output={"version": version.version, **report},
            value=report,
        )

    yield Step("reward", reward_step)

    def evaluated(policies: list[Any], window: tuple[datetime, datetime]) -> dict[str, Any]:
        frame = platform.rl.rewarded(window)
        # one cross-fitted reward model for DR per window, shared by the policies evaluated on it
        x = np.stack([frame[f].to_numpy(np.float64) for f in FEATURES], axis=1)
        q_hat = cross_fitted(x, frame["action"].to_numpy(), frame["reward"].to_numpy(), len(config.offers.tiers), config.evaluation_model)
        ctx = {f: frame[f].to_numpy(np.float64) for f in FEATURES}
        pd_score = frame["probability_of_default"].to_numpy(np.float64)
        results = {}
        for policy in policies:
            evaluation = platform.rl.evaluate(policy, window, q_hat=q_hat)
            truth = sim.true_value(policy, ctx, pd_score)
            probs = policy.probabilities(ctx, pd_score)
            above = int(((probs > 0) & ~config.offers.allowed(pd_score)).sum())
            results[policy.name] = {
                "true_value": truth,
                "estimates": {k: e.to_json() for k, e in evaluation.estimates.items()},
                "errors_pct": {k: 100.0 * (e.value - truth) / truth for k, e in evaluation.estimates.items()},
                "dr_covers": evaluation.estimates["dr"].covers(truth),
                "offers_above_cap": above,
                "decisions": evaluation.decisions,
            }
        return results

    def summary(results: dict[str, Any]) -> str:
        return "; ".join(
            f"{name} true {r['true_value']:.1f}, DR {r['estimates']['dr']['value']:.1f} "
            f"[{r['estimates']['dr']['low']:.1f}, {r['estimates']['dr']['high']:.1f}]"
            for name, r in results.items()
        )

    def evaluate_reference() -> Done:
        results = evaluated(reference_policies(config), (config.simulation.start, config.as_of))
        state["reference"] = results
        return Done(summary=summary(results), output=results, value=results)

    yield Step("evaluate", evaluate_reference, target="reference")

    def train_step() -> Done:
        window = (config.simulation.start, config.train_until)
        bandit, info_b = platform.rl.train_bandit(FEATURES, config.offers, spec=config.bandit, window=window, name=config.model_names.bandit)
        marwil, info_m = platform.rl.train_offline(FEATURES, config.offers, spec=config.marwil, window=window, name=config.model_names.offline)
        state["learned"] = {"bandit": bandit, "marwil": marwil}
        state["train_info"] = {"bandit": info_b, "marwil": info_m}
        return Done(
            summary=f"LightGBM bandit on {info_b['rows']:,} rewards; MARWIL policy loss {info_m.get('policy_loss', float('nan')):.4f}",
            rows=info_b["rows"],
            output=state["train_info"],
            value=state["learned"],
        )

    yield Step("train", train_step)

    def evaluate_learned() -> Done:
        # held out: the decisions after train_until, which the learners never saw
        window = (config.train_until, config.as_of)
        results = evaluated([logging_policy(config), *state["learned"].values()], window)
        state["learned_results"] = results
        return Done(summary=f"held out from {config.train_until:%Y-%m-%d}: " + summary(results), output=results, value=results)

    yield Step("evaluate", evaluate_learned, target="learned")

    def register_step() -> Done:
        versions = {}
        logged_truth = state["learned_results"][logging_policy(config).name]["true_value"]
        for kind, model in state["learned"].items():
            r = state["learned_results"][model.name]
            metrics = {
                **{f"{k}_value": e["value"] for k, e in r["estimates"].items()},
                **{f"{k}_low": e["low"] for k, e in r["estimates"].items()},
                **{f"{k}_high": e["high"] for k, e in r["estimates"].items()},
                "simulator_true_value": r["true_value"],
                "acting_policy_true_value": logged_truth,  # on the same held-out decisions
                "offers_above_cap": r["offers_above_cap"],
            }
            spec = config.bandit if kind == "bandit" else config.marwil
            mv = platform.rl.register(model.name, model, metrics=metrics, params=spec.model_dump(mode="json"))
            platform.models.set_alias(model.name, config.shadow_alias, mv.version)
            versions[model.name] = mv.version
        return Done(
            summary=", ".join(f"{n} v{v} (alias {config.shadow_alias})" for n, v in versions.items()) + ", flavor policy",
            output=versions,
            value=versions,
        )

    yield Step("register", register_step)
