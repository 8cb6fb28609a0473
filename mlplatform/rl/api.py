"""``platform.rl``: rewards, off-policy evaluation, training and registration of offer policies.

    rl = platform.rl
    rl.join_rewards(rule, as_of="2024-10-01")                       # offer log + outcomes -> rewards
    result = rl.evaluate("credit_line_bandit", ("2024-01-01", "2024-07-01"), alias="shadow")
    result.estimates["dr"].value, result.estimates["dr"].low
    model, info = rl.train_bandit(features, offers)                 # LightGBM reward model per tier
    model, info = rl.train_offline(features, offers)                # RLlib MARWIL
    rl.register("credit_line_bandit", model, metrics=...)           # flavor "policy"

Datasets under the storage root (``RLDatasets``): the offer log (one row per logged offer:
``decision_id``, ``decided_at``, the context features, ``probability_of_default``,
``action``, ``tier``, ``propensity``, ``allowed``, ``probabilities``, ``policy``,
``policy_version`` — ``OfferBatch.columns`` plus ``decided_at``), the outcomes
(``decision_id``, ``observed_at``, ``drawn``, ``defaulted``) and the rewards (the offer log's
rows whose horizon passed, with ``reward``; ``rewards.join_rewards``). Evaluation and training
read the rewards dataset; the log itself is never rewritten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from mlplatform.errors import DataError, ModelError
from mlplatform.rl.offers import OfferConfig
from mlplatform.rl.ope import Estimate, off_policy_estimates
from mlplatform.rl.policies import Policy, Selection, context_matrix
from mlplatform.rl.policy_model import PolicyModel
from mlplatform.rl.reward_model import RewardModelSpec, cross_fitted, fit_reward_models
from mlplatform.rl.rewards import RewardRule, join_rewards
from mlplatform.timestamps import parse_instant

if TYPE_CHECKING:
    from mlplatform.rl.offline_rl import MarwilSpec
    from mlplatform.storage import DatasetStore

__all__ = ["RL", "Evaluation", "RLDatasets"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLDatasets:
    """Where the offer log, outcomes, rewards and RLlib episodes live under the storage root."""

    offers: str = "rl/offers/log"
    outcomes: str = "rl/offers/outcomes"
    rewards: str = "rl/offers/rewards"
    episodes: str = "rl/offers/episodes"


@dataclass(frozen=True)
class Evaluation:
    """A policy's off-policy estimates on a window of logged decisions."""

    policy: str
    window: tuple[datetime, datetime]
    decisions: int
    estimates: dict[str, Estimate]
    logged_value: float  # the mean reward the logging policy earned in the window
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "window": [t.isoformat() for t in self.window],
            "decisions": self.decisions,
            "logged_value": self.logged_value,
            "estimates": {k: e.to_json() for k, e in self.estimates.items()},
            **self.extra,
        }


class RL:
    """Offer policies: rewards, evaluation, training, registration (see the module docstring)."""

    def __init__(
        self,
        datasets: DatasetStore,
        models: Any,  # the ModelRegistry (not imported: the models part imports this one for the policy flavor)
        *,
        connect_ray: Callable[[], Any],
        names: RLDatasets | None = None,
    ) -> None:
        self.datasets = datasets
        self.models = models
        self.connect_ray = connect_ray
        self.names = names or RLDatasets()

    # ------------------------------------------------------------------ rewards
    def join_rewards(self, rule: RewardRule, as_of: datetime | str) -> tuple[Any, dict[str, int]]:
        """Join the offer log with the outcomes known at ``as_of`` and publish the rewards
        dataset (``rewards.join_rewards`` states the point-in-time rule); returns
        (the dataset version, the counts)."""
        offer_log = self.datasets.read_table(self.names.offers)
        outcomes = self.datasets.read_table(self.names.outcomes)
        table, report = join_rewards(offer_log, outcomes, rule, as_of)
        meta = dict(self.datasets.get(self.names.offers).metadata) | {
            "as_of": parse_instant(as_of, "as_of").isoformat(),
            "rule": rule.model_dump(mode="json"),
            "report": report,
        }
        version = self.datasets.publish(self.names.rewards, table, metadata=meta)
        log.info("rewards: %d of %d decisions rewarded as of %s", report["rewarded"], report["decisions"], meta["as_of"])
        return version, report

    def rewarded(self, window: tuple[Any, Any] | None = None) -> Any:
        """The rewards dataset as pandas, in ``window`` = [start, end) of ``decided_at`` when given.

        Raises:
            DataError: the window is empty or inverted, or no decision falls in it.
        """
        frame = self.datasets.read_table(self.names.rewards).to_pandas()
        if window is not None:
            start, end = (parse_instant(window[0], "window start"), parse_instant(window[1], "window end"))
            if end <= start:
                raise DataError(f"window end {end.isoformat()} must be after its start {start.isoformat()}")
            decided = frame["decided_at"]
            frame = frame[(decided >= start) & (decided < end)]
            if frame.empty:
                raise DataError(f"no rewarded decisions in [{start.isoformat()}, {end.isoformat()})")
        return frame.reset_index(drop=True)

    # ---------------------------------------------------------------- evaluation
    def resolve(self, policy: Policy | str, *, version: int | None = None, alias: str | None = None) -> tuple[Policy, Any]:
        """A ``Policy``: itself, or the registered policy model of that name (flavor ``policy``)."""
        if not isinstance(policy, str):
            return policy, None
        mv, predictor = self.models.load_predictor(policy, version=version, alias=alias)
        if mv.flavor != "policy":
            raise ModelError(f"model {policy!r} v{mv.version} has flavor {mv.flavor!r}, not 'policy': it is not an offer policy")
        return predictor, mv

    def evaluate(
        self,
        policy: Policy | str,
        window: tuple[Any, Any] | None = None,
        *,
        version: int | None = None,
        alias: str | None = None,
        level: float = 0.95,
        reward_model: RewardModelSpec | None = None,
        q_hat: np.ndarray | None = None,
    ) -> Evaluation:
        """IPS, SNIPS and doubly robust estimates of ``policy``'s value per decision on the
        rewarded decisions in ``window`` ([start, end) of ``decided_at``; all when None).

        ``policy`` is a ``Policy`` or a registered policy model's name (with ``version`` or
        ``alias``). DR's reward model is LightGBM per tier, cross-fitted on the window (2
        folds) unless ``q_hat`` [n, K] is given.

        Raises:
            DataError: no decisions in the window, the log's tiers differ from the policy's,
                a context feature the policy reads is not in the log.
            NotFoundError: no rewards dataset, or no such model.
        """
        chosen, mv = self.resolve(policy, version=version, alias=alias)
        frame = self.rewarded(window)
        tiers = self.datasets.get(self.names.rewards).metadata.get("tiers")
        if tiers is not None and list(tiers) != list(chosen.offers.names):
            raise DataError(f"the log's tiers {tiers} differ from the policy's {chosen.offers.names}")
        contexts = {f: frame[f].to_numpy(np.float64) for f in chosen.features if f in frame}
        pd = frame["probability_of_default"].to_numpy(np.float64)
        target = chosen.probabilities(contexts, pd)
        actions = frame["action"].to_numpy(np.int64)
        rewards = frame["reward"].to_numpy(np.float64)
        if q_hat is None:
            features = self.datasets.get(self.names.rewards).metadata.get("features") or list(chosen.features)
            x = context_matrix({f: frame[f].to_numpy(np.float64) for f in features}, features)
            q_hat = cross_fitted(x, actions, rewards, target.shape[1], reward_model or RewardModelSpec())
        estimates = off_policy_estimates(target, actions, frame["propensity"].to_numpy(np.float64), rewards, q_hat=q_hat, level=level)
        decided = frame["decided_at"]
        span = (decided.min().to_pydatetime(), decided.max().to_pydatetime())
        if window is not None:
            span = (parse_instant(window[0], "window start"), parse_instant(window[1], "window end"))
        name = f"{mv.name} v{mv.version}" if mv is not None else getattr(chosen, "name", type(chosen).__name__)
        return Evaluation(name, span, len(frame), estimates, float(rewards.mean()))

    # ------------------------------------------------------------------ training
    def _training_rows(self, features: Sequence[str], window: tuple[Any, Any] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frame = self.rewarded(window)
        x = context_matrix({f: frame[f].to_numpy(np.float64) for f in features if f in frame}, features)
        return x, frame["action"].to_numpy(np.int64), frame["reward"].to_numpy(np.float64)

    def train_bandit(
        self,
        features: Sequence[str],
        offers: OfferConfig,
        *,
        spec: RewardModelSpec | None = None,
        selection: Selection | None = None,
        window: tuple[Any, Any] | None = None,
        name: str = "bandit",
    ) -> tuple[PolicyModel, dict[str, Any]]:
        """The contextual-bandit baseline: a LightGBM reward model per tier on the rewarded
        log, with ``selection`` (greedy by default) over the allowed tiers."""
        x, actions, rewards = self._training_rows(features, window)
        boosters = fit_reward_models(x, actions, rewards, len(offers.tiers), spec or RewardModelSpec(), list(features))
        model = PolicyModel.from_reward_models(name, boosters, features, offers, selection or Selection(kind="greedy"))
        return model, {"rows": len(x)}

    def train_offline(
        self,
        features: Sequence[str],
        offers: OfferConfig,
        *,
        spec: MarwilSpec | None = None,
        window: tuple[Any, Any] | None = None,
        name: str = "marwil",
    ) -> tuple[PolicyModel, dict[str, Any]]:
        """Offline RL with RLlib MARWIL on the rewarded log (``offline_rl`` has the details):
        the rows are written as RLlib episodes (dataset ``names.episodes``) and read back by RLlib."""
        from mlplatform.rl.offline_rl import MarwilSpec, train_marwil, write_episodes

        x, actions, rewards = self._training_rows(features, window)
        mean, std = x.mean(axis=0), x.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        spec = spec or MarwilSpec()
        paths = write_episodes(self.datasets, self.names.episodes, x, actions, rewards, mean, std, spec.reward_scale)
        model, metrics = train_marwil(
            paths,
            self.datasets.storage.arrow_fs,
            features,
            offers,
            spec,
            mean,
            std,
            connect_ray=self.connect_ray,
            name=name,
            check_contexts=x,
        )
        return model, {"rows": len(x), **metrics}

    # -------------------------------------------------------------- registration
    def register(
        self,
        name: str,
        model: PolicyModel,
        *,
        metrics: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> Any:
        """Register ``model`` as the next version of ``name`` (flavor ``policy``); the rewards
        dataset version it learnt from is recorded in its lineage."""
        rewards = self.datasets.get(self.names.rewards)
        return self.models.register(
            name,
            flavor="policy",
            model=model,
            lineage={"training_set": {"name": self.names.rewards, "version": rewards.version}, **(lineage or {})},
            metrics=metrics,
            params=dict(params or {}),
            description=description or f"Offer policy ({model.kind}) over tiers {model.offers.names}",
        )


def window_of(start: Any, end: Any) -> tuple[datetime, datetime] | None:
    """A [start, end) window from two instants, or None (every decision) when neither is given.

    Raises:
        DataError: only one of them is given, or one is not a point in time.
    """
    if start is None and end is None:
        return None
    if start is None or end is None:
        raise DataError(f"give both ends of the window or neither, got start={start!r}, end={end!r}")
    return parse_instant(start, "window start"), parse_instant(end, "window end")
