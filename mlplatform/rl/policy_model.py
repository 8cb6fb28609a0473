"""A learned offer policy as plain data: what the ``policy`` model flavor stores and serves.

    model = PolicyModel.from_reward_models(boosters, features, offers, Selection(kind="greedy"))
    model = PolicyModel.from_mlp(layers, mean, std, features, offers)     # e.g. RLlib MARWIL's pi network
    model.probabilities(contexts, probability_of_default)                 # a Policy: [n, K] under the cap
    PolicyModel.from_json(model.to_json())                                # same scores, bit for bit

Two kinds, one interface:

- ``reward_models``: a LightGBM regression per tier (text models) scores each tier's
  expected reward; ``selection`` turns the scores into probabilities (greedy, softmax, ε).
- ``mlp``: a small network (dense layers, ``tanh`` between them) maps the standardised
  context ``(x - mean) / std`` to one logit per tier; ``selection`` applies to the logits
  (greedy: the most likely allowed tier). Evaluated with numpy, so serving it needs neither
  RLlib nor torch.

Either way the risk cap is applied last (``OfferConfig.allowed``), so a stored policy can
never offer above it. The document is JSON (numbers written with ``repr``'s round-trip
precision), never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mlplatform.errors import DependencyError, ModelError
from mlplatform.rl.offers import OfferConfig
from mlplatform.rl.policies import Selection, context_matrix, select

__all__ = ["FORMAT", "PolicyModel"]

FORMAT = "mlplatform.policy/1"


@dataclass
class PolicyModel:
    """An offer policy held as data (see the module docstring)."""

    name: str
    kind: Literal["reward_models", "mlp"]
    features: tuple[str, ...]
    offers: OfferConfig
    selection: Selection
    reward_models: tuple[str, ...] = ()  # LightGBM text models, one per tier
    layers: tuple[tuple[np.ndarray, np.ndarray], ...] = ()  # (weight [out, in], bias [out])
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    _boosters: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        k, d = len(self.offers.tiers), len(self.features)
        if self.kind == "reward_models":
            if len(self.reward_models) != k:
                raise ModelError(f"policy {self.name!r}: {len(self.reward_models)} reward models for {k} tiers")
        elif self.kind == "mlp":
            if not self.layers:
                raise ModelError(f"policy {self.name!r}: an mlp policy needs layers")
            width = d
            for i, (w, b) in enumerate(self.layers):
                if w.ndim != 2 or w.shape[1] != width or b.shape != (w.shape[0],):
                    raise ModelError(f"policy {self.name!r}: layer {i} has shape {w.shape}/{b.shape}, expected [*, {width}]")
                width = w.shape[0]
            if width != k:
                raise ModelError(f"policy {self.name!r}: the network has {width} outputs for {k} tiers")
            if self.mean is None or self.std is None or self.mean.shape != (d,) or self.std.shape != (d,) or (self.std <= 0).any():
                raise ModelError(f"policy {self.name!r}: mean and std must be [{d}] with std > 0")
        else:
            raise ModelError(f"unknown policy kind {self.kind!r}: use reward_models or mlp")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_reward_models(
        cls, name: str, boosters: Sequence[Any], features: Sequence[str], offers: OfferConfig, selection: Selection
    ) -> PolicyModel:
        # Text models, as the lightgbm flavor stores them (this part does not import the models part).
        texts = tuple(t if isinstance(t, str) else getattr(t, "booster_", t).model_to_string() for t in boosters)
        return cls(name, "reward_models", tuple(features), offers, selection, reward_models=texts)

    @classmethod
    def from_mlp(
        cls,
        name: str,
        layers: Sequence[tuple[np.ndarray, np.ndarray]],
        mean: np.ndarray,
        std: np.ndarray,
        features: Sequence[str],
        offers: OfferConfig,
        selection: Selection | None = None,
    ) -> PolicyModel:
        return cls(
            name,
            "mlp",
            tuple(features),
            offers,
            selection or Selection(kind="greedy"),
            layers=tuple((np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in layers),
            mean=np.asarray(mean, np.float64),
            std=np.asarray(std, np.float64),
        )

    # ------------------------------------------------------------------ scoring
    def scores(self, x: np.ndarray) -> np.ndarray:
        """Per-tier scores [n, K]: expected rewards (reward_models) or logits (mlp)."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "reward_models":
            from mlplatform.rl.reward_model import predict_rewards

            if not self._boosters:
                self._boosters = [_read_booster(t) for t in self.reward_models]
            return predict_rewards(self._boosters, x)
        h = (x - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.tanh(h)
        return h

    def probabilities(self, contexts: Mapping[str, np.ndarray], probability_of_default: np.ndarray) -> np.ndarray:
        x = context_matrix(contexts, self.features)
        allowed = self.offers.allowed(probability_of_default)
        if len(allowed) != len(x):
            raise ModelError(f"{len(x)} contexts but {len(allowed)} probabilities of default")
        return select(self.scores(x), allowed, self.selection)

    # ------------------------------------------------------------------ storing
    def config(self) -> dict[str, Any]:
        """What the version record shows (everything but the weights)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "features": list(self.features),
            "offers": self.offers.model_dump(mode="json"),
            "selection": self.selection.model_dump(mode="json"),
        }

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"format": FORMAT, **self.config()}
        if self.kind == "reward_models":
            doc["reward_models"] = list(self.reward_models)
        else:
            doc["mlp"] = {
                "mean": self.mean.tolist(),
                "std": self.std.tolist(),
                "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in self.layers],
                "activation": "tanh",
            }
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PolicyModel:
        """Rebuild a stored policy.

        Raises:
            ModelError: the bytes are not a policy document of this format.
        """
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ModelError(f"not a policy document of format {FORMAT!r}: {doc.get('format')!r}")
            common = (
                str(doc["name"]),
                doc["kind"],
                tuple(doc["features"]),
                OfferConfig.model_validate(doc["offers"]),
                Selection.model_validate(doc["selection"]),
            )
            if doc["kind"] == "reward_models":
                return cls(*common, reward_models=tuple(doc["reward_models"]))
            mlp = doc["mlp"]
            if mlp.get("activation") != "tanh":
                raise ModelError(f"policy activation {mlp.get('activation')!r} is not supported (tanh)")
            layers = tuple((np.array(layer["weight"], np.float64), np.array(layer["bias"], np.float64)) for layer in mlp["layers"])
            return cls(*common, layers=layers, mean=np.array(mlp["mean"], np.float64), std=np.array(mlp["std"], np.float64))
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(f"stored policy does not parse: {type(exc).__name__}: {exc}") from None


def _read_booster(text: str) -> Any:
    try:
        import lightgbm
    except ImportError:
        raise DependencyError.missing("lightgbm", "lightgbm>=4.3", "a reward-model policy") from None
    if not text.startswith("tree\n"):
        raise ModelError("a policy's reward model is not a LightGBM text model")
    try:
        return lightgbm.Booster(model_str=text)
    except lightgbm.basic.LightGBMError as exc:
        raise ModelError(f"a policy's reward model does not parse: {exc}") from None
