"""The ``torch`` flavor: safetensors weights plus the module's class, constructor config and
signature — never pickle.

    flavor = TorchFlavor()
    saved = flavor.save(module, {
        "config": {"d_model": 64},                       # the constructor's config, JSON
        "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                      "outputs": [{"name": "probability", "datatype": "FP64", "shape": [-1]}]},
        "transform": "sigmoid",
    })                                                   # "class" defaults to the module's own
    predictor = flavor.load(saved.files, saved.config, device="cuda", precision="bf16")
    predictor.predict({"x": np.zeros((8, 4), np.float32)})["probability"]   # float64, shape (8,)

The version record's ``flavor_config`` (what ``save`` returns as ``SavedModel.config``)::

    class      "package.module:QualName" of an ``nn.Module`` subclass, imported when loading
    config     JSON object: built as ``cls.from_config(config)`` when the class has that
               classmethod, else ``cls(**config)``
    signature  {"inputs": [TensorSpec JSON…], "outputs": [TensorSpec JSON…]}: the inputs are
               passed to ``forward`` as keyword arguments named as the specs; axis 0 of every
               tensor is the batch (-1)
    transform  "none" or "sigmoid", applied to every output after it is cast to the output's
               datatype (so FP64 outputs are computed as ``sigmoid(logits.double())``)
    input_builder  optional "package.module:function" that builds the inputs from the online
               store; kept for the model server (``serving.model_server``), unused here

``class`` and ``signature`` are required; ``config`` defaults to ``{}`` and ``transform`` to
``"none"``; any other key is refused.

Weights only: a state dict (or module) saved without a config stores ``{}``, which
``ModelRegistry.load`` returns as a state dict but from which no predictor can be built.

Loading never unpickles: the weights are read with ``safetensors.torch.load`` (a JSON header
and raw tensor bytes), and bytes that are not a safetensors file — a ``torch.save`` pickle,
say — are refused before anything parses them. Importing the class does run the code of its
module: that code must be installed where the model loads (the lineage records its commit).

A class that sets ``trace_safe = True`` (its ``forward`` has no control flow that depends on
input values) has its fp32 forward run, for shapes called often, from a graph recorded by
``torch.jit.trace`` and checked equal to eager bit for bit (``torch_graphs``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlplatform.errors import DataError, DependencyError, ModelError
from mlplatform.models.flavors.base import (
    DATATYPES,
    SavedModel,
    Signature,
    TensorSpec,
    check_input_names,
    datatype_of,
    numpy_dtype,
)
from mlplatform.models.flavors.torch_graphs import ShapeGraphs, traceable

if TYPE_CHECKING:
    import torch

__all__ = ["CONFIG_KEYS", "PRECISIONS", "TRANSFORMS", "TorchFlavor", "TorchPredictor", "read_weights", "weights_bytes"]

#: The keys of a torch version's ``flavor_config``.
CONFIG_KEYS = ("class", "config", "signature", "transform", "input_builder")
TRANSFORMS = ("none", "sigmoid")
PRECISIONS = ("fp32", "bf16")
_FLOAT_TYPES = ("FP16", "FP32", "FP64")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class TorchFlavor:
    """Stores an ``nn.Module``'s weights as safetensors and rebuilds it from its class by import path."""

    name: ClassVar[str] = "torch"
    model_file: ClassVar[str] = "model.safetensors"

    def save(self, model: Any, config: Mapping[str, Any] | None = None) -> SavedModel:
        """The weights as safetensors and the checked ``flavor_config`` (see the module docstring).

        ``model`` is an ``nn.Module`` (its ``state_dict()``) or a mapping of names to tensors.
        With a ``config``, the class (``config["class"]``, or the module's own class) is
        imported and built from ``config["config"]``, and the weights must fit it exactly
        (same names and shapes), so a version that registers is one that loads. Without one
        (None or ``{}``) only the weights are stored.

        Raises:
            ModelError: the model is neither; a state entry is not a tensor; the config has an
                unknown key, lacks the signature (or the class, for a state dict), names a
                class that cannot be imported or is not an ``nn.Module``, cannot build it, or
                the weights do not fit the module it builds.
            DependencyError: torch or safetensors is not installed.
        """
        torch = _torch("storing a torch model")
        if isinstance(model, torch.nn.Module):
            state = model.state_dict()
        elif isinstance(model, Mapping):
            state = model
        else:
            raise ModelError(f"flavor 'torch' needs an nn.Module or a state dict, got {type(model).__name__}")
        files = {self.model_file: weights_bytes(state)}
        if not config:
            return SavedModel(files=files, config={})
        config = dict(config)
        if "class" not in config:
            if not isinstance(model, torch.nn.Module):
                raise ModelError(
                    "flavor 'torch': a state dict registered with a flavor_config needs its module's class, "
                    "e.g. flavor_config={'class': 'package.module:MyModel', ...} (or register the nn.Module itself)"
                )
            config["class"] = class_path(type(model))
        stored = _checked_config(config)
        cls = import_class(stored["class"])
        if isinstance(model, torch.nn.Module) and not isinstance(model, cls):
            raise ModelError(f"flavor 'torch': the model is a {class_path(type(model))}, not the configured {stored['class']}")
        _check_fits(cls, stored["config"], state)
        return SavedModel(files=files, config=stored)

    def load(
        self, files: Mapping[str, bytes], config: Mapping[str, Any], *, device: str = "cpu", precision: str = "fp32"
    ) -> TorchPredictor:
        """A predictor: the class imported and built from its config, the weights loaded
        strictly, in eval mode on ``device``. ``precision="bf16"`` runs the forward pass under
        ``torch.autocast`` with bfloat16 (outputs are still returned in their datatypes).

        Raises:
            ModelError: the version holds weights only; the config is invalid; the weights are
                not a safetensors file (never unpickled) or do not fit the module; the device
                or precision is unknown or unavailable.
            DependencyError: torch or safetensors is not installed.
        """
        torch = _torch("loading a torch model")
        if not config:
            raise ModelError(
                "this torch version holds weights only: its flavor_config names no class, constructor config or "
                "signature, so no predictor can be built; register it with flavor_config={'class': ..., 'config': ..., "
                "'signature': ...} (ModelRegistry.load still returns its state dict)"
            )
        stored = _checked_config(config)
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}: use one of {list(PRECISIONS)}")
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ModelError(f"unknown device {device!r}: {exc}") from None
        if self.model_file not in files:
            raise ModelError(f"flavor 'torch' needs the file {self.model_file!r}; got {sorted(files)}")
        weights = read_weights(files[self.model_file])
        module = _build(import_class(stored["class"]), stored["config"])
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"the stored weights do not fit {stored['class']}: {exc}") from None
        try:
            module = module.to(target).eval()
        except (RuntimeError, AssertionError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
            raise ModelError(f"cannot move the model to device {device!r}: {exc}") from None
        return TorchPredictor(module, _signature(stored["signature"]), stored["transform"], target, precision)

    def read(self, data: bytes) -> dict[str, torch.Tensor]:
        """The model file as a state dict (what ``ModelRegistry.load`` returns), never unpickled.

        Raises:
            ModelError: the bytes are not a safetensors file.
            DependencyError: torch or safetensors is not installed.
        """
        return read_weights(data)


class TorchPredictor:
    """An ``nn.Module`` in eval mode behind the flavor interface.

    Attributes:
        module: the module (on ``device``).
        signature: the stored signature.
        transform: ``"none"`` or ``"sigmoid"``.
        device: the ``torch.device`` it runs on.
        precision: ``"fp32"`` or ``"bf16"``.
    """

    def __init__(self, module: torch.nn.Module, signature: Signature, transform: str, device: Any, precision: str) -> None:
        self.module = module
        self.signature = signature
        self.transform = transform
        self.device = device
        self.precision = precision
        # fp32 forwards of a trace_safe class run hot shapes from recorded graphs (torch_graphs)
        self.graphs = ShapeGraphs(module) if precision == "fp32" and traceable(module) else None

    def __repr__(self) -> str:
        return f"TorchPredictor({type(self.module).__name__}, device={str(self.device)!r}, precision={self.precision!r})"

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for a batch, as numpy arrays in the signature's datatypes.

            out = predictor.predict({"x": np.zeros((8, 4), np.float32)})   # {"probability": (8,) float64}

        Each input is converted to its spec's datatype when numpy casts it within its kind
        (int64 → int32 in range, float64 → float32, int → float; not float → int or anything
        → BOOL) and must have the spec's number of axes and its fixed sizes. The forward pass
        runs under ``torch.inference_mode()``; each output is cast to its datatype, then
        transformed. An empty batch gives empty outputs without running the model.

        Raises:
            DataError: an input is missing, unexpected, of the wrong shape or of a datatype that
                does not cast; the batch sizes differ; or the module refused the values
                (``IndexError``/``ValueError`` from its forward, e.g. an id past an embedding).
            ModelError: the module's outputs do not match the signature.
        """
        import torch

        arrays = _checked_inputs(self.signature, inputs)
        batch = next(iter(arrays.values())).shape[0] if arrays else 0
        if batch == 0:
            return {spec.name: np.empty(_empty_shape(spec), numpy_dtype(spec.datatype)) for spec in self.signature.outputs}
        tensors = {name: torch.from_numpy(a).to(self.device) for name, a in arrays.items()}
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode():
            try:
                with autocast:
                    raw = self.graphs(tensors) if self.graphs is not None else self.module(**tensors)
            except (IndexError, ValueError) as exc:
                raise DataError(f"the model refused the inputs: {exc}") from None
            outputs = _named_outputs(self.signature, raw)
            result = {}
            for spec in self.signature.outputs:
                tensor = outputs[spec.name]
                _check_output(spec, tensor, batch)
                tensor = tensor.to(_torch_dtype(spec.datatype))
                if self.transform == "sigmoid":
                    tensor = torch.sigmoid(tensor)
                result[spec.name] = tensor.cpu().numpy()
        return result


# ------------------------------------------------------------------------------ codec
def weights_bytes(state: Mapping[str, Any]) -> bytes:
    """A state dict as safetensors bytes (tied or strided tensors are copied apart first).

    Raises:
        ModelError: an entry is not a tensor (safetensors holds weights, not Python objects).
        DependencyError: torch or safetensors is not installed.
    """
    torch = _torch("storing a torch model")
    st = _safetensors("storing torch weights")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ModelError(
            f"flavor 'torch': state entries {not_tensors} are not tensors; only tensors are stored "
            "(safetensors holds weights, not Python objects): keep other settings in params or the flavor_config"
        )
    # Cloning gives every tensor its own contiguous CPU storage: safetensors refuses tensors
    # that share memory (tied weights) and views with strides.
    tensors = {str(k): v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    return st.save(tensors)


def read_weights(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict from safetensors bytes, with ``safetensors.torch.load`` (never unpickled).

    Raises:
        ModelError: the bytes are not a safetensors file (e.g. a pickle from ``torch.save``,
            refused without being parsed as one).
        DependencyError: torch or safetensors is not installed.
    """
    _torch("loading a torch model")
    st = _safetensors("loading torch weights")
    _check_safetensors_header(data)
    try:
        return st.load(bytes(data))
    except Exception as exc:  # noqa: BLE001 -- safetensors raises its own SafetensorError for any malformed file
        raise ModelError(f"stored torch weights are not valid safetensors: {exc}") from None


def _check_safetensors_header(data: bytes) -> None:
    """A safetensors file is an 8-byte little-endian header length, then a JSON object."""
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise ModelError(
            "stored torch weights are not a safetensors file: they look like a pickle written by torch.save "
            "(a zip archive or pickle stream), which is never loaded because unpickling can run code; "
            "store the weights with safetensors (platform.models.register(..., flavor='torch', model=module))"
        )
    size = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
    if not 2 <= size <= min(len(data) - 8, _MAX_HEADER) or data[8:9] != b"{":
        raise ModelError(
            f"stored torch weights are not a safetensors file (no JSON header after the 8-byte length; "
            f"the file starts {bytes(data[:16])!r})"
        )


# ---------------------------------------------------------------------------- config
def class_path(cls: type) -> str:
    """``"module:QualName"`` of a class, as ``import_class`` reads it back.

    Raises:
        ModelError: the class cannot be imported by path (defined in ``__main__`` or in a function).
    """
    path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ModelError(
            f"model class {path} cannot be imported where the model loads: define it in an importable module "
            "(not __main__ or inside a function), or give flavor_config['class']"
        )
    return path


def import_class(path: str) -> type:
    """The ``nn.Module`` subclass named ``"package.module:QualName"``.

    Raises:
        ModelError: the path is malformed, cannot be imported, or is not an ``nn.Module`` subclass.
    """
    torch = _torch("loading a torch model")
    module_name, _, qualname = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not module_name or not qualname:
        raise ModelError(f"model class must be 'package.module:ClassName', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelError(
            f"cannot import model class {path!r}: {exc} (the code that defines the model must be installed where it loads)"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise ModelError(f"model class {path!r} is not an nn.Module subclass (it is {obj!r})")
    return obj


def _checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flavor_config with every key checked and defaults filled in, as stored (JSON)."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(f"flavor 'torch': unknown flavor_config keys {unknown}; use {list(CONFIG_KEYS)}")
    if not isinstance(config.get("class"), str):
        raise ModelError(f"flavor 'torch': flavor_config['class'] must be 'package.module:ClassName', got {config.get('class')!r}")
    ctor = config.get("config", {})
    if not isinstance(ctor, Mapping):
        raise ModelError(f"flavor 'torch': flavor_config['config'] must be a JSON object, got {type(ctor).__name__}")
    try:
        ctor = json.loads(json.dumps(dict(ctor), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"flavor 'torch': flavor_config['config'] is not JSON: {exc}") from None
    if "signature" not in config:
        raise ModelError(
            "flavor 'torch': flavor_config needs 'signature': {'inputs': [{'name', 'datatype', 'shape'}...], "
            "'outputs': [...]} (the forward's keyword arguments and its outputs)"
        )
    signature = config["signature"]
    if isinstance(signature, Signature):
        signature = {"inputs": [s.to_json() for s in signature.inputs], "outputs": [s.to_json() for s in signature.outputs]}
    transform = config.get("transform", "none")
    if transform not in TRANSFORMS:
        raise ModelError(f"flavor 'torch': unknown transform {transform!r}; use one of {list(TRANSFORMS)}")
    parsed = _signature(signature)
    if transform != "none":
        not_float = [s.name for s in parsed.outputs if s.datatype not in _FLOAT_TYPES]
        if not_float:
            raise ModelError(f"flavor 'torch': transform {transform!r} needs float outputs; {not_float} are not")
    stored = {
        "class": config["class"],
        "config": ctor,
        "signature": {"inputs": [s.to_json() for s in parsed.inputs], "outputs": [s.to_json() for s in parsed.outputs]},
        "transform": transform,
    }
    if "input_builder" in config:
        builder = config["input_builder"]
        module_name, _, function = builder.partition(":") if isinstance(builder, str) else ("", "", "")
        if not module_name or not function:
            raise ModelError(f"flavor 'torch': flavor_config['input_builder'] must be 'package.module:function', got {builder!r}")
        stored["input_builder"] = builder
    return stored


def _signature(doc: Any) -> Signature:
    if not isinstance(doc, Mapping) or set(doc) != {"inputs", "outputs"}:
        raise ModelError(f"flavor 'torch': the signature must be {{'inputs': [...], 'outputs': [...]}}, got {doc!r}")
    parts = {}
    for side in ("inputs", "outputs"):
        specs = []
        for item in doc[side] if isinstance(doc[side], list | tuple) else [None]:
            try:
                spec = item if isinstance(item, TensorSpec) else TensorSpec.from_json(item)
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"flavor 'torch': signature {side} entry {item!r} is not {{'name', 'datatype', 'shape'}}") from None
            if not spec.name or spec.datatype not in DATATYPES or spec.datatype == "BYTES":
                raise ModelError(
                    f"flavor 'torch': tensor {spec.name!r} has datatype {spec.datatype!r}; "
                    f"use one of {[d for d in DATATYPES if d != 'BYTES']} (torch has no string tensors)"
                )
            if not spec.shape or spec.shape[0] != -1 or any(d < -1 for d in spec.shape):
                raise ModelError(
                    f"flavor 'torch': tensor {spec.name!r} has shape {list(spec.shape)}; axis 0 is the batch (-1), "
                    "other axes a size or -1"
                )
            specs.append(spec)
        names = [s.name for s in specs]
        if not specs or len(set(names)) != len(names):
            raise ModelError(f"flavor 'torch': signature {side} must be a non-empty list of distinct names, got {names}")
        parts[side] = tuple(specs)
    return Signature(inputs=parts["inputs"], outputs=parts["outputs"])


def _build(cls: type, config: Mapping[str, Any]) -> Any:
    """``cls.from_config(config)`` when the class defines it, else ``cls(**config)``."""
    import torch

    try:
        builder = getattr(cls, "from_config", None)
        module = builder(dict(config)) if callable(builder) else cls(**config)
    except Exception as exc:  # noqa: BLE001 -- the class validates its config its own way: any error means it does not fit
        raise ModelError(f"cannot build {class_path(cls)} from config {dict(config)!r}: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"building {class_path(cls)} from its config gave a {type(module).__name__}, not an nn.Module")
    return module


def _check_fits(cls: type, config: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """The weights have exactly the names and shapes of the module the config builds. The
    module is built on the meta device (no memory, no initialisation) when its code allows."""
    import torch

    try:
        with torch.device("meta"):
            module = _build(cls, config)
    except ModelError:
        module = _build(cls, config)  # some constructors need real tensors; its error is the one to show
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {str(k): tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(f"{k}: {list(given[k])} vs {list(expected[k])}" for k in set(given) & set(expected) if given[k] != expected[k])
    if missing or unexpected or shapes:
        raise ModelError(
            f"the weights do not fit {class_path(cls)} built from config {dict(config)!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shapes differ {shapes[:5]}"
        )


# ----------------------------------------------------------------------------- tensors
def _checked_inputs(signature: Signature, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    check_input_names(signature, inputs)
    arrays = {spec.name: _array(spec, inputs[spec.name]) for spec in signature.inputs}
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"inputs differ in batch size (axis 0): {sizes}")
    return arrays


def _array(spec: TensorSpec, value: Any) -> np.ndarray:
    """``value`` as a contiguous, writable array of the spec's dtype and shape."""
    try:
        array = np.asarray(value)
        if array.dtype == object:  # e.g. decoded JSON: let numpy infer the values' own type
            array = np.asarray(array.tolist())
    except (TypeError, ValueError) as exc:
        raise DataError(f"input {spec.name!r} is not an array of {spec.datatype}: {exc}") from None
    target = np.dtype(numpy_dtype(spec.datatype))
    if array.dtype != target:
        kind = datatype_of(array) if array.dtype.kind != "O" else "BYTES"
        if not np.can_cast(array.dtype, target, casting="same_kind") or array.dtype.kind in "OUS":
            raise DataError(f"input {spec.name!r} has datatype {kind}, which does not cast to {spec.datatype}")
        if target.kind in "iu" and array.size and array.dtype.kind in "iu":
            info = np.iinfo(target)
            if array.min() < info.min or array.max() > info.max:
                raise DataError(f"input {spec.name!r} has values outside the range of {spec.datatype}")
    if array.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, array.shape)):
        raise DataError(
            f"input {spec.name!r} has shape {list(array.shape)}; the model takes {list(spec.shape)} (-1: any size)"
        )
    # A copy when the dtype changes, the memory is strided or read-only (e.g. Arrow buffers):
    # torch.from_numpy needs writable, contiguous memory.
    out = np.ascontiguousarray(array, dtype=target)
    return out if out.flags.writeable else out.copy()


def _named_outputs(signature: Signature, raw: Any) -> dict[str, Any]:
    import torch

    names = [s.name for s in signature.outputs]
    if isinstance(raw, torch.Tensor):
        raw = (raw,)
    if isinstance(raw, Mapping):
        found = {n: raw[n] for n in names if n in raw}
    elif isinstance(raw, list | tuple) and len(raw) == len(names):
        found = dict(zip(names, raw, strict=True))
    else:
        raise ModelError(
            f"the model returned {type(raw).__name__}{f' of {len(raw)}' if isinstance(raw, list | tuple) else ''}; "
            f"its signature expects outputs {names} (a tensor, a tuple in that order, or a dict by name)"
        )
    if set(found) != set(names) or not all(isinstance(t, torch.Tensor) for t in found.values()):
        raise ModelError(f"the model's outputs do not match its signature's {names}")
    return found


def _check_output(spec: TensorSpec, tensor: Any, batch: int) -> None:
    shape = tuple(tensor.shape)
    want = (batch, *spec.shape[1:])
    if len(shape) != len(want) or any(w not in (-1, g) for w, g in zip(want, shape)):
        raise ModelError(f"the model's output {spec.name!r} has shape {list(shape)}; its signature says {list(spec.shape)} for {batch} rows")


def _empty_shape(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(max(d, 0) for d in spec.shape)


def _torch_dtype(datatype: str) -> Any:
    import torch

    return torch.from_numpy(np.empty(0, numpy_dtype(datatype))).dtype


# ------------------------------------------------------------------------ dependencies
def _torch(purpose: str) -> Any:
    try:
        import torch
    except ImportError:
        raise DependencyError.missing("torch", "torch>=2.4", purpose) from None
    return torch


def _safetensors(purpose: str) -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise DependencyError.missing("safetensors", "safetensors>=0.4", purpose) from None
    return safetensors.torch
