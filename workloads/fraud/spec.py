"""The spec of one fraud training run: what :func:`workloads.fraud.train.train_fraud` takes,
and what its workers read back from their ``train_loop_config``.

    spec = FraudSpec.load({"num_workers": 2, "epochs": 3, "batch_size": 256})
    spec = FraudSpec(use_gpu=True, precision="bf16", model=TransformerConfig(d_model=128))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError

from mlplatform.config import format_validation_error
from mlplatform.errors import ConfigError
from workloads.fraud.model import TransformerConfig
from workloads.fraud.sequences import DATASET

__all__ = ["FraudSpec"]


class FraudSpec(BaseModel):
    """One training run of the fraud transformer (``train:`` in a fraud workload config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(default=DATASET, description="Sequences dataset (see workloads.fraud.sequences).")
    dataset_version: PositiveInt | None = Field(default=None, description="Dataset version; None = latest.")
    num_workers: PositiveInt = Field(default=2, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(default=False, description="One GPU per worker; NCCL instead of gloo.")
    cpus_per_worker: PositiveFloat = Field(default=1.0, description="CPUs each worker holds.")
    epochs: PositiveInt = Field(default=3, description="Passes over the train split.")
    batch_size: PositiveInt = Field(default=256, description="Rows per step on each worker.")
    lr: PositiveFloat = Field(default=1e-3, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    pos_weight: PositiveFloat | None = Field(
        default=None, description="Weight of the positive class in the loss; None = negatives / positives in train."
    )
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16 = autocast the forward pass.")
    model: TransformerConfig = Field(default_factory=TransformerConfig, description="Transformer shape.")
    shuffle_buffer: NonNegativeInt = Field(
        default=16_384, description="Rows in each worker's local shuffle buffer (0 = stored order)."
    )
    materialize: bool = Field(
        default=True, description="Materialise the splits before training (see workloads.fraud.train); False = stream."
    )
    seed: int = Field(default=7, ge=0, description="Seed of the weights' initialisation and the shuffle.")
    max_failures: NonNegativeInt = Field(default=0, description="Worker-group restarts (from the last checkpoint).")
    run_name: str = Field(default="fraud", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Run name prefix.")

    @classmethod
    def load(cls, source: FraudSpec | Mapping[str, Any]) -> FraudSpec:
        """Validate a mapping into a spec (a spec passes through).

        Raises:
            ConfigError: a key is unknown or a value is bad; the message names each field.
        """
        if isinstance(source, cls):
            return source
        if not isinstance(source, Mapping):
            raise ConfigError(f"FraudSpec must be a mapping, got {type(source).__name__}: {source!r}")
        try:
            return cls.model_validate(dict(source))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "FraudSpec")) from None
