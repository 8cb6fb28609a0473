"""``Platform``: the front door. It holds the config and the storage root and hands off to
the parts, each in its own module.

    platform = Platform.from_config("configs/local.yaml")
    platform.features.apply(definitions)
    training_set = platform.features.get_historical_features(entities, "underwriting_v1")

Creating a Platform starts nothing: Ray is connected on first use (``platform.ray()``), so a
Platform is cheap to make in a notebook, a job driver or a test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from mlplatform.config import PlatformConfig, load_config
from mlplatform.storage import DatasetStore, Storage

if TYPE_CHECKING:
    from mlplatform.batch.score import BatchScoring
    from mlplatform.features.store import FeatureStore
    from mlplatform.jobs.submit import Jobs
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.rl.api import RL
    from mlplatform.quality.api import DataQuality
    from mlplatform.monitoring import Monitoring
    from mlplatform.serving.api import Serving, ServingParts
    from mlplatform.streams import EventBus
    from mlplatform.training.api import Training


class Platform:
    """One object for the whole platform; parts are attributes that load on first use.

    Args:
        config: a validated ``PlatformConfig``.
    """

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.storage = Storage(config.storage)
        self.datasets = DatasetStore(self.storage)
        self._started_ray = False

    @classmethod
    def from_config(cls, source: str | os.PathLike[str] | Mapping[str, Any] | PlatformConfig | None = None) -> Platform:
        """Build a Platform from a YAML path, a mapping, a ``PlatformConfig`` or nothing (embedded defaults).

        Raises:
            ConfigError: the config is invalid; the message names the field and the value.
        """
        return cls(load_config(source))

    def __repr__(self) -> str:
        return f"Platform(project={self.config.project!r}, root={self.storage.root!r})"

    # --------------------------------------------------------------------------- parts
    @cached_property
    def features(self) -> FeatureStore:
        """Feature definitions, backfills, training sets, materialization, online lookup."""
        from mlplatform.features.store import FeatureStore
        from mlplatform.online import open_online_store

        return FeatureStore(
            self.config.features,
            self.storage,
            self.datasets,
            online_store=open_online_store(self.config, self.storage),
            ray=self.ray,
            bus=self.bus,
            streams=self.config.streams,
            decisions=lambda since: self.serving.decisions(since),
            quality=lambda: self.quality,
        )

    @cached_property
    def quality(self) -> DataQuality:
        """Data quality: each view's expectations checked on backfill, materialization and
        training sets (strict views refuse bad data), with a report per run."""
        from mlplatform.quality.api import DataQuality

        return DataQuality(
            self.storage,
            self.datasets,
            models=lambda: self.models,
            connect_ray=self.ray,
            resolve_view=lambda name: self.features.resolve_view(name),
        )

    @cached_property
    def bus(self) -> EventBus:
        """The event bus real-time events travel on (SQLite or Redis Streams, per ``streams``)."""
        from mlplatform.streams import open_event_bus

        return open_event_bus(self.config.streams, self.storage, project=self.config.project)

    @cached_property
    def models(self) -> ModelRegistry:
        """The model registry: versions, aliases, lineage, checksummed artifacts."""
        from mlplatform.evaluation.promotion import PromotionEvaluator
        from mlplatform.models.registry import ModelRegistry

        evaluate = PromotionEvaluator(self.datasets, self.config.models.promotion_gate)
        return ModelRegistry(self.storage, evaluate_promotion=evaluate)

    @cached_property
    def training(self) -> Training:
        """Distributed training and tuning on Ray Train / Ray Tune."""
        from mlplatform.training.api import Training

        return Training(self.storage, self.datasets, self.features, connect_ray=self.ray)

    @cached_property
    def serving(self) -> Serving:
        """The online application on Ray Serve: feature server, decisions, decision log, replay."""
        from mlplatform.serving.api import Serving

        return Serving(
            self.config,
            storage=self.storage,
            features=self.features,
            models=self.models,
            connect_ray=self.ray,
            replica_parts=serving_parts,
        )

    @cached_property
    def batch(self) -> BatchScoring:
        """Batch scoring on Ray Data: a registered model over many applications."""
        from mlplatform.batch.score import BatchScoring

        return BatchScoring(
            storage=self.storage, datasets=self.datasets, features=self.features, models=self.models, connect_ray=self.ray
        )

    @cached_property
    def monitoring(self) -> Monitoring:
        """Monitoring reports: PSI per feature and score, live decisions against the training snapshot."""
        from mlplatform.monitoring import Monitoring

        return Monitoring(self.storage, self.datasets, self.models, decisions=lambda since: self.serving.decisions(since))

    @cached_property
    def rl(self) -> RL:
        """Offer policies: rewards from outcomes, off-policy evaluation, bandit and offline RL training."""
        from mlplatform.rl.api import RL

        return RL(self.datasets, self.models, connect_ray=self.ray)

    @cached_property
    def jobs(self) -> Jobs:
        """Ray jobs on the cluster: submit, follow, status."""
        from mlplatform.jobs.submit import Jobs

        return Jobs(self)

    # ----------------------------------------------------------------------------- Ray
    def ray(self) -> Any:
        """Connect to Ray (see ``mlplatform._ray.connect``) and return the ``ray`` module."""
        import ray

        from mlplatform import _ray

        if _ray.connect(self.config.ray):
            self._started_ray = True
        return ray

    @property
    def owns_ray(self) -> bool:
        """Whether this Platform started the local Ray it uses (then ``close`` stops it)."""
        return self._started_ray

    def close(self) -> None:
        """Shut down the local Ray this Platform started (never a cluster it joined), after
        the stream processors it deployed logged what they applied."""
        if self._started_ray:
            import ray

            if "serving" in self.__dict__:  # built (a cached_property): it may have processors running
                self.serving.stop_stream_processors()

            ray.shutdown()
            self._started_ray = False
            from mlplatform.serving.ingress import cleanup

            cleanup()  # the private HAProxy directory (admin socket) of the Serve that just stopped

    def __enter__(self) -> Platform:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serving_parts(config: Mapping[str, Any]) -> ServingParts:
    """What a serving replica works with, wired from the config it was deployed with (called in
    each replica; ``Platform`` stays the one place that knows how the parts fit together)."""
    from mlplatform.serving.api import ServingParts

    platform = Platform.from_config(config)
    from mlplatform.ui import build_app

    return ServingParts(config=platform.config, storage=platform.storage, features=platform.features, models=platform.models,
                        ui=lambda keys: build_app(platform, keys))
