"""Model flavors: how a registered version is stored and how it becomes a ``Predictor``.

    from mlplatform.models.flavors import get_flavor

    flavor = get_flavor("torch")
    saved = flavor.save(module, {"signature": ..., "config": ..., "transform": "sigmoid"})
    predictor = flavor.load(saved.files, saved.config, device="cpu", precision="fp32")
    predictor.predict({"amount": np.array([120.0, 80.0]), ...})["probability"]

``lightgbm`` stores LightGBM's text model; ``torch`` stores safetensors weights and names the
module's class, its constructor config and its signature in the version record; ``policy``
stores an offer policy (``mlplatform.rl``) as a JSON document. No format runs code from the
file when it is read (no pickle). The interface is in
:mod:`mlplatform.models.flavors.base`; a new flavor is one module here and one entry in
``FLAVORS``. Importing this package imports neither torch nor lightgbm: each flavor imports
its library when it first saves or loads a model.
"""

from __future__ import annotations

from mlplatform.errors import ModelError
from mlplatform.models.flavors.base import (
    DATATYPES,
    Flavor,
    Predictor,
    SavedModel,
    Signature,
    TensorSpec,
    datatype_of,
    numpy_dtype,
)
from mlplatform.models.flavors.lightgbm import LightGBMFlavor
from mlplatform.models.flavors.policy import PolicyFlavor
from mlplatform.models.flavors.torch import TorchFlavor

__all__ = [
    "DATATYPES",
    "FLAVORS",
    "Flavor",
    "LightGBMFlavor",
    "PolicyFlavor",
    "Predictor",
    "SavedModel",
    "Signature",
    "TensorSpec",
    "TorchFlavor",
    "datatype_of",
    "get_flavor",
    "numpy_dtype",
]

#: Every flavor by name. Flavors hold no state, so one instance each serves every caller.
FLAVORS: dict[str, Flavor] = {flavor.name: flavor for flavor in (LightGBMFlavor(), TorchFlavor(), PolicyFlavor())}


def get_flavor(name: str) -> Flavor:
    """The flavor called ``name`` (``"lightgbm"``, ``"torch"`` or ``"policy"``).

        flavor = get_flavor(version.flavor)

    Raises:
        ModelError: no flavor has that name (the message lists those that exist).
    """
    try:
        return FLAVORS[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown model flavor {name!r}: use one of {list(FLAVORS)}") from None
