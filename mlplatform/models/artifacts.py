"""A model file's bytes and the library's own object for it, in the flavors' safe formats.

    data = serialize("lightgbm", booster)        # LightGBM's own text model
    booster = deserialize("lightgbm", data)
    data = serialize("torch", module)            # the state dict as safetensors
    state_dict = deserialize("torch", data)      # then module.load_state_dict(state_dict)

For code that handles the raw model — training checkpoints, ``ModelRegistry.load`` — rather
than a predictor (``mlplatform.models.flavors``, ``ModelRegistry.load_predictor``). The
formats are the flavors': pickle (and ``torch.load`` of a pickle) can execute arbitrary code
while loading, so a model file would become a way to run code on every node that serves it;
LightGBM's text format and safetensors are plain data, and parsing them can do nothing but
build the model.
"""

from __future__ import annotations

from typing import Any

from mlplatform.errors import ModelError
from mlplatform.models.flavors import get_flavor

__all__ = ["deserialize", "serialize"]


def serialize(flavor: str, model: Any) -> bytes:
    """The model as the bytes of its flavor's model file (weights only for torch).

    Args:
        flavor: ``"lightgbm"``: a ``lightgbm.Booster``, a fitted ``LGBMModel`` (its
            ``booster_``) or a text model already produced by ``Booster.model_to_string()``.
            ``"torch"``: an ``nn.Module`` (its ``state_dict()``) or a mapping of names to tensors.

    Raises:
        ModelError: the flavor is unknown or the model is not of that flavor.
    """
    chosen = get_flavor(flavor)
    return chosen.save(model).files[chosen.model_file]


def deserialize(flavor: str, data: bytes) -> Any:
    """Rebuild what ``serialize`` stored: a ``lightgbm.Booster``, or a torch state dict
    (``dict[str, Tensor]``, loaded with ``safetensors.torch.load``, never unpickled).

    Raises:
        ModelError: the flavor is unknown, has no raw model object, or the bytes are not a
            valid model of that flavor.
        DependencyError: lightgbm / torch / safetensors is not installed.
    """
    chosen = get_flavor(flavor)
    # ``read`` is not part of the Flavor interface: a flavor with nothing better to hand out
    # than its predictor (ONNX, say) need not have one.
    read = getattr(chosen, "read", None)
    if read is None:
        raise ModelError(f"flavor {flavor!r} has no raw model object; load a predictor (ModelRegistry.load_predictor)")
    return read(data)
