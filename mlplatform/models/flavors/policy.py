"""The ``policy`` flavor: an offer policy (``mlplatform.rl.policy_model.PolicyModel``) as a
JSON document, served like any model.

    flavor = PolicyFlavor()
    saved = flavor.save(policy_model)                  # {"policy.json": ...}, config: kind, features, tiers, selection
    predictor = flavor.load(saved.files, saved.config)
    out = predictor.predict({"income": np.array([3.1]), ..., "probability_of_default": np.array([0.04])})
    out["probabilities"]                               # FP64 [-1, K]: 0 above the risk cap, rows sum to 1
    out["action"]                                      # INT64 [-1]: the most probable allowed tier

Inputs: one ``FP64 [-1]`` per context feature, in the policy's feature order, then
``probability_of_default`` (``FP64 [-1]``, the PD model's score that sets the cap). Outputs:
``probabilities`` (``FP64 [-1, K]``, tiers in the policy's order), ``action`` (``INT64
[-1]``, the index of the most probable tier, the smaller on ties) and ``scores`` (``FP64
[-1, K]``: expected rewards or logits). The offer actually made is drawn from
``probabilities`` by ``mlplatform.rl.selection.OfferSelector``, which logs its propensity.
The document is plain JSON (LightGBM text models, or the network's numbers): reading it runs
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from mlplatform.errors import DataError, ModelError
from mlplatform.models.flavors.base import SavedModel, Signature, TensorSpec, check_input_names

__all__ = ["PolicyFlavor", "PolicyPredictor"]

PD_INPUT = "probability_of_default"


class PolicyFlavor:
    """Stores a ``PolicyModel`` as ``policy.json`` and loads it as a :class:`PolicyPredictor`."""

    name: ClassVar[str] = "policy"
    model_file: ClassVar[str] = "policy.json"

    def save(self, model: Any, config: Mapping[str, Any] | None = None) -> SavedModel:
        """``model`` (a ``PolicyModel``) as its JSON document; the version record gets its
        config (kind, features, tiers and cap, selection).

        Raises:
            ModelError: ``model`` is not a ``PolicyModel``, or ``config`` is given (the
                document holds everything).
        """
        from mlplatform.rl.policy_model import PolicyModel

        if not isinstance(model, PolicyModel):
            raise ModelError(f"flavor 'policy' needs a mlplatform.rl.PolicyModel, got {type(model).__name__}")
        if config:
            raise ModelError(f"flavor 'policy' takes no flavor_config (the policy document holds everything), got {dict(config)!r}")
        return SavedModel(files={self.model_file: model.to_json()}, config=model.config())

    def load(
        self, files: Mapping[str, bytes], config: Mapping[str, Any], *, device: str = "cpu", precision: str = "fp32"
    ) -> PolicyPredictor:
        """A predictor from ``files["policy.json"]`` (numpy and LightGBM, on the CPU).

        Raises:
            ModelError: the file is missing or is not a policy document, or the device is not the CPU.
        """
        if device != "cpu":
            raise ModelError(f"flavor 'policy' predicts on the CPU only, got device {device!r}")
        if self.model_file not in files:
            raise ModelError(f"flavor 'policy' needs the file {self.model_file!r}; got {sorted(files)}")
        return PolicyPredictor(self.read(files[self.model_file]))

    def read(self, data: bytes) -> Any:
        """The stored ``PolicyModel`` (what ``ModelRegistry.load`` returns)."""
        from mlplatform.rl.policy_model import PolicyModel

        return PolicyModel.from_json(data)


class PolicyPredictor:
    """A ``PolicyModel`` behind the flavor interface; it is also a ``Policy`` (``probabilities``)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name = model.name
        self.features = model.features
        self.offers = model.offers
        k = len(model.offers.tiers)
        self.signature = Signature(
            inputs=tuple(TensorSpec(f, "FP64", (-1,)) for f in (*model.features, PD_INPUT)),
            outputs=(
                TensorSpec("probabilities", "FP64", (-1, k)),
                TensorSpec("action", "INT64", (-1,)),
                TensorSpec("scores", "FP64", (-1, k)),
            ),
        )

    def __repr__(self) -> str:
        return f"PolicyPredictor({self.name!r}, {self.model.kind}, {len(self.offers.tiers)} tiers)"

    def probabilities(self, contexts: Mapping[str, np.ndarray], probability_of_default: np.ndarray) -> np.ndarray:
        return self.model.probabilities(contexts, probability_of_default)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Probabilities, most probable tier and scores for a batch (see the module docstring).

        Raises:
            DataError: an input is missing, extra, not 1-D, not numeric or not finite, the
                arrays differ in length, or a probability of default is outside [0, 1].
        """
        from mlplatform.rl.policies import context_matrix, select

        names = check_input_names(self.signature, inputs)
        arrays = {}
        for name in names:
            try:
                array = np.asarray(inputs[name], dtype=np.float64)
            except (TypeError, ValueError):
                raise DataError(f"input {name!r} must be numeric (FP64)") from None
            if array.ndim != 1:
                raise DataError(f"input {name!r} must have shape [-1], got {list(array.shape)}")
            arrays[name] = array
        if len({len(a) for a in arrays.values()}) > 1:
            raise DataError(f"inputs differ in length: { {n: len(a) for n, a in arrays.items()} }")
        x = context_matrix({f: arrays[f] for f in self.features}, self.features)
        allowed = self.offers.allowed(arrays[PD_INPUT])
        scores = self.model.scores(x) if len(x) else np.zeros((0, len(self.offers.tiers)))
        probs = select(scores, allowed, self.model.selection) if len(x) else scores
        return {"probabilities": probs, "action": np.argmax(probs, axis=1).astype(np.int64), "scores": scores}
