"""A model in a Serve deployment of its own: for a model that needs resources the ingress
replicas do not have (a GPU), or replicas that scale apart from them.

    ModelDeployment.options(name="model-fraud", num_replicas=1, ray_actor_options={"num_gpus": 1}).bind(settings)

Each replica follows the model's alias, batches the calls that arrive together (the model's
``batching``) and answers ``describe``, ``infer`` and ``predict`` for the ingress, which
calls it through a deployment handle. An error meant for the client (bad input, no version)
comes back as a value, so the ingress answers it as it would a local model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from mlplatform.errors import PlatformError

__all__ = ["ModelDeployment", "ModelReplica", "ModelSettings", "deployment_options"]


@dataclass(frozen=True)
class ModelSettings:
    """What a model replica needs: the platform config (as JSON), how to build its parts, and
    the model's entry of ``serving.models`` (as JSON)."""

    config: dict[str, Any]
    parts: Callable[[dict[str, Any]], Any]
    model: dict[str, Any]
    alias_poll_s: float = 1.0


class ModelReplica:
    """One replica of a model deployment (see the module docstring): a ``ModelServer`` of one
    local model whose client errors travel back as values."""

    def __init__(self, settings: ModelSettings) -> None:
        from mlplatform.served_models import ServedModelConfig
        from mlplatform.serving.catalog import FeatureCatalog
        from mlplatform.serving.model_server.served import ModelServer

        parts = settings.parts(settings.config)
        config = ServedModelConfig.model_validate(settings.model)
        self.name = config.name
        self.server = ModelServer.build(
            [config.model_copy(update={"deployment": None})],
            models=parts.models,
            catalog=FeatureCatalog(parts.features),
            handles={},
            default_services={},
            poll_s=settings.alias_poll_s,
        )

    async def describe(self) -> dict[str, Any] | None:
        return await self.server.describe(self.name)

    async def infer(self, inputs: dict[str, np.ndarray]) -> Any:
        try:
            return await self.server.infer(self.name, inputs)
        except PlatformError as exc:
            return exc

    async def predict(self, entities: Mapping[str, Sequence[Any]]) -> Any:
        try:
            return await self.server.predict(self.name, entities)
        except PlatformError as exc:
            return exc

    def score_rows(self, entities: Mapping[str, Sequence[Any]], output: str) -> Any:
        """A decision's call (see ``ServedModel.score_rows``); runs on the replica's thread pool."""
        try:
            return self.server.local[self.name].score_rows(entities, output)
        except PlatformError as exc:
            return exc

    def __del__(self) -> None:
        if hasattr(self, "server"):
            self.server.stop()


ModelDeployment = serve.deployment(name="model", max_ongoing_requests=64, graceful_shutdown_timeout_s=10)(ModelReplica)


def deployment_options(model: Any) -> dict[str, Any]:
    """``.options()`` of a model's deployment from its ``ServedModelConfig.deployment``."""
    spec = model.deployment
    options: dict[str, Any] = {
        "name": f"model-{model.name}",
        "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus},
        "logging_config": {"enable_access_log": False},
    }
    if spec.autoscaling is not None:
        options["autoscaling_config"] = spec.autoscaling.model_dump()
    else:
        options["num_replicas"] = spec.num_replicas
    return options
