"""The fraud transformer: a small encoder over an applicant's recent events that gives one
logit (risk of default) for the application being scored.

    config = TransformerConfig(d_model=64, heads=4, layers=2, ff=128, max_events=32)
    model = FraudTransformer(config)
    logits = model(**inputs)                       # inputs: sequences.to_tensors(batch) minus "label"
    data = serialize("torch", model)               # mlplatform.models.artifacts: safetensors
    same = model_from_bytes(config, data)          # no pickle anywhere
    platform.models.register("fraud", flavor="torch", model=model, flavor_config=flavor_config(config), ...)
    mv, predictor = platform.models.load_predictor("fraud")   # probability = sigmoid(logit), float64

Tokens. Each of the ``K`` history positions is ``embed(event_type) + embed(category) +
W·[log_amount / 8, log1p(days_before) / 6, days_past_due / 30]``; the application being scored
is one more token at the end, ``embed(current_application) + embed(app_category) +
W·[app_log_amount / 8, 0, 0]``. A learned position embedding is added (position ``K`` is the
current application, ``K - 1`` the most recent event, as the sequences are right-aligned).
The encoder (pre-norm ``nn.TransformerEncoder``, ``batch_first=True``) ignores padding through
``src_key_padding_mask``; the output is the mean over the real tokens (the current
application always among them, so a first-time applicant is well defined), layer-normed,
through a linear head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from torch import nn

from mlplatform.models.flavors.base import Signature, TensorSpec
from workloads.fraud.sequences import CATEGORIES, CURRENT_APPLICATION, EVENT_TYPES

__all__ = ["INPUT_BUILDER", "MODEL_CLASS", "FraudTransformer", "TransformerConfig", "flavor_config", "flops_per_sample", "model_from_bytes", "signature"]

#: The model class by import path, as the registry's torch flavor imports it.
MODEL_CLASS = "workloads.fraud.model:FraudTransformer"

# Fixed input scales: the numeric features land near [0, 1] for typical values, so one
# initialisation suits them all; they are part of the model, so serving cannot forget them.
_AMOUNT_SCALE, _DAYS_SCALE, _DPD_SCALE = 8.0, 6.0, 30.0


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TransformerConfig:
    """Shape of the fraud transformer (``model:`` in a ``FraudSpec``)."""

    d_model: int = Field(default=64, ge=8, le=4096, description="Token width.")
    heads: int = Field(default=4, ge=1, le=64, description="Attention heads; must divide d_model.")
    layers: int = Field(default=2, ge=1, le=48, description="Encoder layers.")
    ff: int = Field(default=128, ge=1, le=65536, description="Feed-forward width of each layer.")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout in the encoder layers.")
    max_events: int = Field(default=32, ge=1, le=1024, description="K: history positions (the sequences' K).")
    event_types: int = Field(default=len(EVENT_TYPES), ge=len(EVENT_TYPES), description="Event type vocabulary.")
    categories: int = Field(default=len(CATEGORIES), ge=2, description="Merchant category vocabulary.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerConfig:
        if self.d_model % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide d_model ({self.d_model})")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flops_per_sample(config: TransformerConfig, *, training: bool = True) -> float:
    """Matmul FLOPs to process one sequence (``K + 1`` tokens), forward+backward by default.

    With ``L = K + 1`` tokens (padding is computed too: the encoder is dense), ``d = d_model``,
    ``f = ff``, ``n = layers`` and a multiply-add counted as 2 FLOPs::

        per layer  = 2·L·d·3d (Q, K, V) + 2·L·L·d (scores) + 2·L·L·d (weights × V)
                   + 2·L·d·d (output projection) + 2·2·L·d·f (feed-forward)
                   = 8·L·d² + 4·L²·d + 4·L·d·f
        forward    = n · per layer + 2·L·3·d (numeric projection) + 2·d (head)
        training   = 3 · forward   (the backward pass costs about twice the forward)

    Embedding lookups, layer norms, softmax, GELU and the optimizer are not matmuls and are
    left out, as is usual for model-FLOPs utilisation.
    """
    length, d, f = config.max_events + 1, config.d_model, config.ff
    per_layer = 8 * length * d * d + 4 * length * length * d + 4 * length * d * f
    forward = config.layers * per_layer + 2 * length * 3 * d + 2 * d
    return float(3 * forward if training else forward)


class FraudTransformer(nn.Module):
    """Encoder over ``K`` history tokens plus the current application; one logit per row."""

    #: ``forward``'s control flow depends on input shapes only (the ``max_events`` check), not
    #: on values, so the torch flavor may serve it from a recorded graph (``torch_graphs``).
    trace_safe = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FraudTransformer:
        """The model built from ``TransformerConfig.to_json()`` (how the torch flavor builds it).

        Raises:
            pydantic.ValidationError: the config is not a valid ``TransformerConfig``.
        """
        return cls(TransformerConfig(**config))

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.event_type = nn.Embedding(config.event_types, d, padding_idx=0)
        self.category = nn.Embedding(config.categories, d, padding_idx=0)
        self.numeric = nn.Linear(3, d)
        self.position = nn.Embedding(config.max_events + 1, d)
        layer = nn.TransformerEncoderLayer(
            d, config.heads, config.ff, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(
        self,
        event_type: torch.Tensor,
        category: torch.Tensor,
        log_amount: torch.Tensor,
        days_before: torch.Tensor,
        days_past_due: torch.Tensor,
        mask: torch.Tensor,
        app_category: torch.Tensor,
        app_log_amount: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[B]`` from ``[B, L]`` histories (``L <= K``, right-aligned) and ``[B]``
        current-application features; shapes and dtypes as ``sequences.to_tensors`` gives."""
        batch, length = event_type.shape
        if length > self.config.max_events:
            raise ValueError(f"sequences of {length} events, but the model has max_events={self.config.max_events}")
        numeric = torch.stack(
            [
                log_amount / _AMOUNT_SCALE,
                torch.log1p(days_before.clamp_min(0)) / _DAYS_SCALE,
                days_past_due / _DPD_SCALE,
            ],
            dim=-1,
        )
        history = self.event_type(event_type) + self.category(category) + self.numeric(numeric)
        zeros = torch.zeros_like(app_log_amount)
        current_numeric = torch.stack([app_log_amount / _AMOUNT_SCALE, zeros, zeros], dim=-1)
        current_type = torch.full_like(app_category, CURRENT_APPLICATION)
        current = self.event_type(current_type) + self.category(app_category) + self.numeric(current_numeric)
        tokens = torch.cat([history, current[:, None, :]], dim=1)
        # right-aligned: the last position is always the current application
        tokens = tokens + self.position.weight[self.config.max_events - length :]
        keep = torch.cat([mask, torch.ones(batch, 1, dtype=torch.bool, device=mask.device)], dim=1)
        hidden = self.norm(self.encoder(tokens, src_key_padding_mask=~keep))
        weights = keep.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
        return self.head(pooled).squeeze(-1)


def signature(config: TransformerConfig) -> Signature:
    """What the model takes and gives, as the registry records it: the inputs of ``forward``
    with the dtypes ``sequences.to_tensors`` produces (histories ``[-1, K]``, the current
    application ``[-1]``) and one output, ``probability`` (FP64, the sigmoid of the logit)."""
    k = config.max_events
    history = [("event_type", "INT64"), ("category", "INT64"), ("log_amount", "FP32"), ("days_before", "FP32"),
               ("days_past_due", "FP32"), ("mask", "BOOL")]  # fmt: skip
    return Signature(
        inputs=(
            *(TensorSpec(name, datatype, (-1, k)) for name, datatype in history),
            TensorSpec("app_category", "INT64", (-1,)),
            TensorSpec("app_log_amount", "FP32", (-1,)),
        ),
        outputs=(TensorSpec("probability", "FP64", (-1,)),),
    )


#: Builds a served version's input from the online store (the same kernel as training's sequences).
INPUT_BUILDER = "workloads.fraud.online:serving_inputs"


def flavor_config(config: TransformerConfig) -> dict[str, Any]:
    """The registry's torch ``flavor_config`` for a model of this shape: the class by import
    path, the config as JSON, the signature, the sigmoid that turns the logit into a
    probability of default, and the input builder the model server uses to make its input
    from the online store (``workloads.fraud.online.serving_inputs``)."""
    sig = signature(config)
    return {
        "class": MODEL_CLASS,
        "config": config.to_json(),
        "signature": {"inputs": [s.to_json() for s in sig.inputs], "outputs": [s.to_json() for s in sig.outputs]},
        "transform": "sigmoid",
        "input_builder": INPUT_BUILDER,
    }


def model_from_bytes(config: TransformerConfig, data: bytes) -> FraudTransformer:
    """A fresh ``FraudTransformer`` in eval mode with safetensors ``data`` loaded strictly
    (``mlplatform.models.artifacts.deserialize``: plain data, never unpickled).

    Raises:
        ModelError: the bytes are not valid safetensors.
        RuntimeError: the weights do not fit ``config`` (missing, unexpected or misshapen keys).
    """
    from mlplatform.models.artifacts import deserialize

    model = FraudTransformer(config)
    model.load_state_dict(deserialize("torch", data), strict=True)
    return model.eval()
