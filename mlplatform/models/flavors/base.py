"""The flavor interface: how a registered version's bytes become something that predicts.

    flavor = get_flavor(version.flavor)                      # "lightgbm" or "torch"
    predictor = flavor.load(files, version.flavor_config)    # files: checksum-verified bytes
    predictor.signature.inputs                               # (TensorSpec(name, datatype, shape), …)
    outputs = predictor.predict({"amount": np.array([120.0, 80.0]), …})   # named arrays in and out

One interface serves online scoring, batch scoring and replay, so a model scores the same
wherever it runs; ``ModelRegistry.load_predictor(name, version=…, alias=…, device=…,
precision=…)`` does the above with every artifact's sha256 verified. A flavor is one module
holding one class that implements ``Flavor``; a new one (ONNX, say) is a new module in this
package and one line in ``FLAVORS``.

Tensors are named numpy arrays whose first axis is the batch. Their datatypes are the Open
Inference Protocol's (``BOOL``, ``INT8`` … ``INT64``, ``UINT8`` … ``UINT64``, ``FP16``,
``FP32``, ``FP64``, ``BYTES``), so a signature is what ``GET /v2/models/{name}`` shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DATATYPES",
    "Flavor",
    "Predictor",
    "SavedModel",
    "Signature",
    "TensorSpec",
    "check_input_names",
    "datatype_of",
    "numpy_dtype",
    "predict_in_fixed_batches",
]

#: Open Inference Protocol datatype → numpy dtype (``BYTES`` is an object array of str/bytes).
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def numpy_dtype(datatype: str) -> Any:
    """The numpy dtype of an Open Inference Protocol datatype (KeyError for an unknown one)."""
    return DATATYPES[datatype]


def datatype_of(array: np.ndarray) -> str:
    """The Open Inference Protocol datatype of a numpy array (object and string arrays: ``BYTES``)."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if dtype is not np.object_ and array.dtype == np.dtype(dtype):
            return name
    raise TypeError(f"no Open Inference Protocol datatype for numpy dtype {array.dtype}")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: its datatype and shape (``-1`` = any size; axis 0 is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TensorSpec:
        return cls(str(doc["name"]), str(doc["datatype"]), tuple(int(d) for d in doc["shape"]))


@dataclass(frozen=True)
class Signature:
    """What a model takes and gives, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class SavedModel:
    """What ``Flavor.save`` hands the registry: the files to store (the model file among them)
    and the flavor's config, a JSON-able mapping stored in the version record and given back
    to ``Flavor.load``."""

    files: dict[str, bytes]
    config: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Predictor(Protocol):
    """A loaded model ready to predict a batch."""

    signature: Signature

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for a batch: every name in ``signature.inputs`` must be given, each array
        with the batch on axis 0; one array per ``signature.outputs``, same batch size.

        Raises:
            DataError: a missing, extra, mis-shaped or mis-typed input (the message names it).
        """
        ...


class Flavor(Protocol):
    """One way of storing and loading models (a module in this package)."""

    name: ClassVar[str]
    #: The file that holds the model among the version's artifacts.
    model_file: ClassVar[str]

    def save(self, model: Any, config: Mapping[str, Any] | None = None) -> SavedModel:
        """The model as files in the flavor's safe format (never pickle), and its config.

        Raises:
            ModelError: the model is not of this flavor, or the config does not fit it.
        """
        ...

    def load(
        self, files: Mapping[str, bytes], config: Mapping[str, Any], *, device: str = "cpu", precision: str = "fp32"
    ) -> Predictor:
        """A predictor from checksum-verified files and the stored config. ``device`` and
        ``precision`` (``fp32``, ``bf16``) matter to flavors that run on accelerators.

        Raises:
            ModelError: the bytes are not a valid model of this flavor (never executed).
            DependencyError: the flavor's library is not installed.
        """
        ...


def check_input_names(signature: Signature, inputs: Any, hint: str = "") -> list[str]:
    """The signature's input names, once ``inputs`` is checked to be a mapping holding exactly them.

    Raises:
        DataError: not a mapping, or names missing or unexpected (the message lists both and
            the model's; ``hint`` is added to it).
    """
    from mlplatform.errors import DataError

    if not isinstance(inputs, Mapping):
        raise DataError(f"inputs must be a mapping of input name to array, got {type(inputs).__name__}")
    names = [spec.name for spec in signature.inputs]
    missing = [n for n in names if n not in inputs]
    extra = sorted(str(n) for n in inputs if n not in set(names))
    if missing or extra:
        raise DataError(f"inputs do not match the model's: missing {missing}, unexpected {extra}; it takes {names}{hint}")
    return names


def predict_in_fixed_batches(predictor: Predictor, inputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``predictor.predict`` run on batches of exactly ``rows`` rows (the last one padded with
    copies of its last row), so each row's output is the same bit for bit whatever else it
    was scored with.

        outputs = predict_in_fixed_batches(predictor, inputs, rows=8)    # serving
        again = predict_in_fixed_batches(predictor, one_row, rows=8)     # replay: identical

    Why: a float kernel may take another path for another batch size (a transformer's matmuls
    do on CPU: a row scored alone and the same row in a batch of 8 differ in the last bits),
    but with one shape a row's result does not depend on its position or its neighbours. A
    decision's rule models are scored this way and log ``rows``, so replay recomputes their
    scores exactly.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    n = len(next(iter(inputs.values()))) if inputs else 0
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n, rows):
        chunk = {k: v[start : start + rows] for k, v in inputs.items()}
        got = len(next(iter(chunk.values())))
        if got < rows:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], rows - got, axis=0)]) for k, v in chunk.items()}
        parts.append({k: v[:got] for k, v in predictor.predict(chunk).items()})
    if not parts:
        return predictor.predict(inputs)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
