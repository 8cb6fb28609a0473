"""Safe model (de)serialisation: formats that load without running code from the file.

    data = serialize("lightgbm", booster)        # LightGBM's own text model
    booster = deserialize("lightgbm", data)
    data = serialize("torch", module)            # the state dict as safetensors
    state_dict = deserialize("torch", data)      # then module.load_state_dict(state_dict)

Pickle (and ``torch.load`` of a pickle) can execute arbitrary code while loading, so a model
file becomes a way to run code on every node that serves it. LightGBM's text format and
safetensors are plain data: parsing them cannot do anything but build the model.

A torch model is stored as its weights only: the code that defines the module is the
caller's (and should live in the repository whose commit the lineage records).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from mlplatform.errors import DependencyError, ModelError

__all__ = ["FLAVORS", "MODEL_FILES", "Flavor", "deserialize", "serialize"]

Flavor = Literal["lightgbm", "torch"]
FLAVORS: tuple[str, ...] = ("lightgbm", "torch")
#: The artifact that holds the model, per flavor.
MODEL_FILES: dict[str, str] = {"lightgbm": "model.txt", "torch": "model.safetensors"}


def serialize(flavor: str, model: Any) -> bytes:
    """The model as bytes in the flavor's safe format.

    Args:
        flavor: ``"lightgbm"``: a ``lightgbm.Booster``, a fitted ``LGBMModel`` (its
            ``booster_``) or a text model already produced by ``Booster.model_to_string()``.
            ``"torch"``: an ``nn.Module`` (its ``state_dict()``) or a mapping of names to tensors.

    Raises:
        ModelError: the flavor is unknown or the model is not of that flavor.
    """
    check_flavor(flavor)
    if flavor == "lightgbm":
        return _lightgbm_text(model).encode()
    return _torch_safetensors(model)


def deserialize(flavor: str, data: bytes) -> Any:
    """Rebuild what ``serialize`` stored: a ``lightgbm.Booster``, or a torch state dict
    (``dict[str, Tensor]``, loaded with ``safetensors.torch.load``, never unpickled).

    Raises:
        ModelError: the bytes are not a valid model of that flavor.
        DependencyError: lightgbm / torch / safetensors is not installed.
    """
    check_flavor(flavor)
    if flavor == "lightgbm":
        lightgbm = _require("lightgbm", "lightgbm>=4.3", "loading a LightGBM model")
        try:
            return lightgbm.Booster(model_str=data.decode())
        except (UnicodeDecodeError, lightgbm.basic.LightGBMError) as exc:
            raise ModelError(f"stored LightGBM model does not parse: {exc}") from None
    _require("torch", "torch>=2.4", "loading a torch model")
    st = _require("safetensors.torch", "safetensors>=0.4", "loading torch weights")
    try:
        return st.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for any malformed header
        raise ModelError(f"stored torch weights are not valid safetensors: {exc}") from None


def check_flavor(flavor: str) -> str:
    if flavor not in FLAVORS:
        raise ModelError(f"unknown model flavor {flavor!r}: use one of {list(FLAVORS)}")
    return flavor


# --------------------------------------------------------------------------- lightgbm
def _lightgbm_text(model: Any) -> str:
    if isinstance(model, str):
        text = model
    else:
        booster = getattr(model, "booster_", model)  # the sklearn wrapper holds a Booster
        if not hasattr(booster, "model_to_string"):
            raise ModelError(
                f"flavor 'lightgbm' needs a lightgbm.Booster (or its model_to_string() text), got {type(model).__name__}"
            )
        # Default num_iteration: the best iteration when early stopping found one, else all.
        text = booster.model_to_string()
    if not text.startswith("tree\n"):
        raise ModelError("flavor 'lightgbm': the text does not look like a LightGBM model (it should start with 'tree')")
    return text


# ------------------------------------------------------------------------------ torch
def _torch_safetensors(model: Any) -> bytes:
    torch = _require("torch", "torch>=2.4", "storing a torch model")
    st = _require("safetensors.torch", "safetensors>=0.4", "storing torch weights")
    if isinstance(model, torch.nn.Module):
        state = model.state_dict()
    elif isinstance(model, Mapping):
        state = model
    else:
        raise ModelError(f"flavor 'torch' needs an nn.Module or a state dict, got {type(model).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ModelError(
            f"flavor 'torch': state entries {not_tensors} are not tensors; only tensors are stored "
            "(safetensors holds weights, not Python objects): keep other settings in params"
        )
    # Cloning gives every tensor its own contiguous CPU storage: safetensors refuses tensors
    # that share memory (tied weights) and views with strides.
    tensors = {str(k): v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    return st.save(tensors)


def _require(module: str, package: str, purpose: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError.missing(module.split(".")[0], package, purpose) from None
