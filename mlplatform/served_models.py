"""Which models the serving application serves, and how (``serving.models`` in the config).

Its own module, like ``decision_policy``: the platform config holds it, and the config must
not import the serving package.

.. code-block:: yaml

    serving:
      models:
        - name: underwriting                 # the registered model
          alias: production                  # follows this alias: a new version rolls out live
        - name: fraud
          input_builder: workloads.fraud.online:model_inputs   # online events → its tensors
          batching: {max_batch_size: 64, max_wait: 2ms}
          deadline: 30ms
          deployment: {num_gpus: 1}          # its own replicas on a GPU node (bf16 there)

Every model listed is reachable at the Open Inference Protocol routes (``/v2/models/{name}``…)
and at ``POST /v1/models/{name}/predict`` (entity keys in, online features looked up). The
decision model given to ``deploy`` is served there too, even when not listed. A model runs
inside the ingress replicas unless it has a ``deployment``: then it is a deployment of its
own (its replicas, CPUs, GPUs), called from the ingress, so a GPU model does not need a GPU
under every ingress replica.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlplatform._duration import Duration

__all__ = ["AutoscalingConfig", "BatchingConfig", "ModelDeploymentConfig", "ServedModelConfig", "unique_models"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class BatchingConfig(_Model):
    """Dynamic batching of one model's calls: requests that arrive together are scored as one batch."""

    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(default=32, description="Most requests scored in one call.")
    max_wait: Duration = Field(
        default="0ms",
        description="How long a batch waits for company after its first request; 0 takes whatever queued meanwhile.",
    )


class AutoscalingConfig(_Model):
    """Serve's autoscaling of a model deployment on ongoing requests per replica."""

    min_replicas: Annotated[int, Field(ge=0, le=1000)] = Field(default=1, description="Fewest replicas.")
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = Field(default=4, description="Most replicas.")
    target_ongoing_requests: Annotated[float, Field(gt=0, le=10_000)] = Field(
        default=8.0, description="Ongoing requests per replica Serve aims for."
    )


class ModelDeploymentConfig(_Model):
    """A model served by a deployment of its own rather than inside the ingress replicas."""

    num_replicas: Annotated[int, Field(ge=1, le=1000)] = Field(default=1, description="Replicas (ignored with autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Scale replicas on load instead of a fixed count.")
    num_cpus: Annotated[float, Field(ge=0, le=256)] = Field(default=1.0, description="CPUs Ray reserves per replica.")
    num_gpus: Annotated[float, Field(ge=0, le=16)] = Field(default=0.0, description="GPUs per replica (torch models run there).")


class ServedModelConfig(_Model):
    """One model the application serves."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="The registered model's name (its route name too).")
    alias: str = Field(default="production", pattern=r"^[a-z][a-z0-9_-]{0,62}$", description="The alias followed live.")
    shadow_alias: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="In decisions, also score with the version under this alias (e.g. candidate) and log it beside the served one.",
    )
    feature_service: str | None = Field(
        default=None,
        description="Features looked up by /v1/models/{name}/predict; default the version's lineage feature_service.",
    )
    input_builder: str | None = Field(
        default=None,
        description=(
            "'package.module:function' building the model's input tensors from the online store, for models "
            "whose input is not a feature service's row (e.g. a behaviour sequence); default the version's own."
        ),
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="Torch models: auto = bf16 on a GPU, fp32 on CPU."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching of this model's calls.")
    deadline: Duration | None = Field(
        default=None, description="This model's budget within a request; default serving.deadline."
    )
    deployment: ModelDeploymentConfig | None = Field(
        default=None, description="Its own deployment (replicas, CPUs, GPUs); None = inside the ingress replicas."
    )

    @field_validator("input_builder")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not _IMPORT_PATH.match(value):
            raise ValueError(f"input_builder must be 'package.module:function', got {value!r}")
        return value


def unique_models(models: tuple[ServedModelConfig, ...]) -> tuple[ServedModelConfig, ...]:
    """``models`` if every name is listed once (raises ValueError naming the repeats)."""
    names = [m.name for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each model is listed once; listed more than once: {repeated}")
    return models
