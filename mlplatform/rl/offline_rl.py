"""Offline RL for offers with RLlib (new API stack): MARWIL over the discrete tiers, trained
from the logged decisions written in RLlib's offline Parquet schema.

    spec = MarwilSpec(beta=1.0, iterations=2)
    paths = write_episodes(datasets, "rl/offers/episodes", x, actions, rewards, mean, std)
    model = train_marwil(paths, datasets.storage.arrow_fs, features, offers, spec, mean, std, connect_ray=platform.ray)

Each logged offer is a one-step episode in RLlib's single-agent schema (the columns of
``ray.rllib.offline.offline_prelearner.SCHEMA``): ``eps_id``, ``obs`` (the standardised
context, float32 list), ``actions`` (the tier), ``rewards`` (standardised), ``new_obs`` (= ``obs``; the episode
ends), ``terminateds`` (true) and ``truncateds`` (false) — nothing else, since RLlib carries
any other column into the episode as a model output. MARWIL (``beta > 0``; ``beta = 0`` is
behaviour cloning) weights each logged action by ``exp(beta * advantage)``, the advantage
being the reward minus its learned value of the context, so it moves the logging policy
toward the tiers that earned more.

After training, the policy network (encoder and ``pi`` head, ``tanh`` between layers) is
copied out as plain arrays into a ``PolicyModel`` of kind ``mlp`` and checked against the
RLModule's own ``forward_inference`` logits on the training contexts (``TrainingError`` if
they differ by more than 1e-4), so the served policy is the trained one and serving needs
neither RLlib nor torch. Selection is greedy over the allowed tiers: the cap is applied to
the logits, never learned.
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlplatform.errors import DependencyError, TrainingError
from mlplatform.rl.offers import OfferConfig
from mlplatform.rl.policy_model import PolicyModel

__all__ = ["MarwilSpec", "train_marwil", "write_episodes"]

log = logging.getLogger(__name__)


class MarwilSpec(BaseModel):
    """A small MARWIL run (sized for a laptop; raise iterations and width on a cluster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(default=1.0, ge=0.0, le=1.0, description="Advantage weighting (RLlib allows [0, 1]); 0 is behaviour cloning.")
    reward_scale: float = Field(
        default=1.0, gt=0.0, le=100.0, description="Standardised rewards are multiplied by this: above 1 acts as a beta above 1."
    )
    lr: float = Field(default=1e-3, gt=0.0, description="Adam learning rate.")
    hidden: tuple[int, ...] = Field(default=(32, 32), min_length=1, description="Hidden layer widths (tanh).")
    batch_size: int = Field(default=512, ge=8, description="Rows per learner update.")
    updates_per_iteration: int = Field(default=60, ge=1, description="Learner updates per training iteration.")
    iterations: int = Field(default=2, ge=1, description="Training iterations (each reads the data anew).")
    seed: int = Field(default=0, description="Seed of the RLModule's initialisation.")


def write_episodes(
    datasets: Any,
    name: str,
    x: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    reward_scale: float = 1.0,
) -> list[str]:
    """Publish the logged offers as RLlib one-step episodes (dataset ``name``); returns the
    Parquet file paths (for ``datasets.storage.arrow_fs``)."""
    import pyarrow as pa

    obs = ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
    rewards = np.asarray(rewards, np.float64)
    # Standardised: MARWIL's exp(beta * advantage) and its value loss assume rewards of order 1
    # (a greedy policy does not change when rewards are shifted and scaled).
    rewards = reward_scale * (rewards - rewards.mean()) / (rewards.std() or 1.0)
    n, d = obs.shape
    obs_col = pa.FixedSizeListArray.from_arrays(pa.array(obs.reshape(-1)), d)
    table = pa.table(
        {
            "eps_id": pa.array([f"offer-{i}" for i in range(n)]),
            "obs": obs_col,
            "actions": pa.array(np.asarray(actions, np.int64)),
            "rewards": pa.array(np.asarray(rewards, np.float32)),
            "new_obs": obs_col,
            "terminateds": pa.array(np.ones(n, bool)),
            "truncateds": pa.array(np.zeros(n, bool)),
        }
    )
    version = datasets.publish(name, table, metadata={"format": "rllib single-agent episodes, one step each"})
    return datasets.file_paths(version)


def train_marwil(
    paths: Sequence[str],
    filesystem: Any,
    features: Sequence[str],
    offers: OfferConfig,
    spec: MarwilSpec,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    connect_ray: Callable[[], Any],
    name: str = "marwil",
    check_contexts: np.ndarray | None = None,
) -> tuple[PolicyModel, dict[str, float]]:
    """Train MARWIL on the episodes at ``paths``; returns the policy and the last learner metrics.

    Raises:
        DependencyError: RLlib is not installed.
        TrainingError: the run failed or the extracted network does not reproduce RLlib's logits.
    """
    connect_ray()
    try:
        import gymnasium as gym
        from ray.rllib.algorithms.marwil import MARWILConfig
    except ImportError:
        raise DependencyError.missing("ray.rllib", "ray[rllib]==2.60.*", "offline RL (MARWIL)") from None

    d, k = len(features), len(offers.tiers)
    config = (
        MARWILConfig()
        .environment(observation_space=gym.spaces.Box(-np.inf, np.inf, (d,), np.float32), action_space=gym.spaces.Discrete(k))
        .training(
            beta=spec.beta,
            lr=spec.lr,
            gamma=0.0,
            train_batch_size_per_learner=spec.batch_size,
            # rewards are standardised (write_episodes), so advantages are of order 1 from the start
            moving_average_sqd_adv_norm_start=1.0,
        )
        .offline_data(
            input_=list(paths),
            input_read_method_kwargs={"filesystem": filesystem, "override_num_blocks": 1},
            dataset_num_iters_per_learner=spec.updates_per_iteration,
            map_batches_kwargs={"concurrency": 1, "num_cpus": 0.5},
            iter_batches_kwargs={"prefetch_batches": 1},
        )
        .learners(num_learners=0)
        .env_runners(num_env_runners=0)
        .reporting(min_time_s_per_iteration=0, min_train_timesteps_per_iteration=0)
        .debugging(seed=spec.seed)
        .rl_module(
            model_config={"fcnet_hiddens": list(spec.hidden), "fcnet_activation": "tanh", "head_fcnet_hiddens": [], "vf_share_layers": False}
        )
    )
    try:
        algo = config.build_algo()
    except Exception as exc:  # RLlib raises plain exceptions for bad configs and data
        raise TrainingError(f"MARWIL could not be built: {type(exc).__name__}: {exc}") from exc
    try:
        metrics: dict[str, float] = {}
        for i in range(spec.iterations):
            result = algo.train()
            learner = result.get("learners", {}).get("default_policy", {})
            metrics = {key: float(v) for key, v in learner.items() if isinstance(v, int | float)}
            log.info("MARWIL iteration %d: policy loss %.4f, value loss %.4f", i + 1, metrics.get("policy_loss", float("nan")), metrics.get("vf_loss", float("nan")))
        weights = algo.learner_group.get_weights()["default_policy"]
        layers = _pi_layers(weights)
        model = PolicyModel.from_mlp(name, layers, mean, std, features, offers)
        if check_contexts is not None and len(check_contexts):
            _check_logits(algo, model, np.asarray(check_contexts[:256], np.float64))
    finally:
        algo.stop()
        # RLlib's Ray Data iterator is a generator held by the algorithm: closed now, while Ray
        # is up, rather than at interpreter exit (where it prints a traceback about Ray being down).
        del algo
        gc.collect()
    return model, metrics


def _pi_layers(weights: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The encoder's and the pi head's dense layers in order, from an RLModule state dict."""
    layers = []
    for prefix in ("encoder.actor_encoder.net.mlp", "encoder.encoder.net.mlp", "pi.net.mlp"):
        found = sorted(
            {int(m.group(1)) for key in weights if (m := re.fullmatch(re.escape(prefix) + r"\.(\d+)\.weight", key))}
        )
        layers += [(np.asarray(weights[f"{prefix}.{i}.weight"], np.float64), np.asarray(weights[f"{prefix}.{i}.bias"], np.float64)) for i in found]
    if not layers:
        raise TrainingError(f"no policy layers in the RLModule's weights: {sorted(weights)[:8]}…")
    return layers


def _check_logits(algo: Any, model: PolicyModel, x: np.ndarray) -> None:
    import torch

    module = algo.learner_group._learner.module["default_policy"]  # local learner (num_learners=0)
    obs = torch.tensor(((x - model.mean) / model.std).astype(np.float32))
    with torch.no_grad():
        expected = module.forward_inference({"obs": obs})["action_dist_inputs"].numpy().astype(np.float64)
    got = model.scores(x.astype(np.float32).astype(np.float64))
    gap = float(np.abs(got - expected).max())
    if gap > 1e-4:
        raise TrainingError(f"the extracted policy network differs from RLlib's by {gap:.3g} in the logits")
