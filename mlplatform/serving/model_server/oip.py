"""The Open Inference Protocol (KServe V2) on the wire: request and response bodies, tensors
in and out, and Triton's binary tensor data extension.

    request, tensors = decode_infer(body, header_length=None, signature=predictor.signature)
    body, headers = encode_infer(name="fraud", version=3, request=request, outputs=outputs)

What the protocol says (https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol),
and what this module adds, exactly:

- A tensor is ``{"name", "shape", "datatype", "data"}``; ``data`` holds the elements in
  row-major order, flat or nested. The number of elements must equal the product of
  ``shape``; ``shape`` must be concrete (no ``-1``).
- Datatypes are checked strictly: an integer tensor takes JSON integers only (``1.5`` and
  ``true`` are refused, and values outside the datatype's range), a floating tensor takes
  numbers (a JSON ``null`` is a missing value, NaN: the JSON form has no other way to send
  one), ``BOOL`` takes ``true``/``false``, ``BYTES`` takes strings. ``NaN``/``Infinity``
  tokens and numbers too large for a double (``1e400``) are refused.
- Against the model's signature: every input is given once, none that the model lacks; the
  rank and the fixed sizes match; all inputs share the batch size (axis 0); a datatype may
  differ from the signature's only where numpy casts it safely (``INT32`` for ``INT64``,
  ``FP32`` for ``FP64``).
- **Binary data** (Triton's extension, which ``tritonclient`` uses by default): a request
  body may be the JSON header (its length in the ``Inference-Header-Content-Length`` HTTP
  header) followed by the inputs' raw bytes, each input saying how many in
  ``parameters.binary_data_size``; little-endian, ``BOOL`` one byte per element, ``BYTES``
  each element as a 4-byte little-endian length then its bytes. Outputs are sent the same way
  when the request asks for it (``parameters.binary_data_output``, or an output's
  ``parameters.binary_data``); the response then carries that header too.
- Limits: at most ``MAX_ELEMENTS`` elements per tensor and ``MAX_TENSORS`` inputs, and a rank
  of at most 8, so a request cannot make the server allocate without bound.

Every problem is a ``DataError`` whose message names the tensor and what was wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlplatform.errors import DataError
from mlplatform.models.flavors.base import DATATYPES, Signature, TensorSpec, datatype_of

__all__ = [
    "HEADER_LENGTH",
    "MAX_ELEMENTS",
    "MAX_TENSORS",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "ModelReady",
    "RequestedOutput",
    "ServerLive",
    "ServerMetadata",
    "ServerReady",
    "TensorInput",
    "TensorMetadata",
    "TensorOutput",
    "decode_infer",
    "encode_infer",
    "metadata",
]

#: The HTTP header that carries the JSON part's length of a binary-data body.
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ELEMENTS = 4_000_000
MAX_TENSORS = 64
_MAX_RANK = 8
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
_Name = Annotated[str, Field(min_length=1, max_length=128)]
_Parameters = dict[Annotated[str, Field(max_length=128)], Any]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorInput(_Body):
    """One input tensor of an inference request."""

    name: _Name
    shape: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]], Field(max_length=_MAX_RANK)]
    datatype: Datatype
    parameters: _Parameters | None = None
    data: list[Any] | None = Field(default=None, description="Elements in row-major order, flat or nested (absent with binary data).")


class RequestedOutput(_Body):
    """An output the client wants (all of them when the request names none)."""

    name: _Name
    parameters: _Parameters | None = None


class InferRequest(_Body):
    """``POST /v2/models/{name}/infer``."""

    id: Annotated[str, Field(max_length=256)] | None = None
    parameters: _Parameters | None = None
    inputs: Annotated[list[TensorInput], Field(min_length=1, max_length=MAX_TENSORS)]
    outputs: Annotated[list[RequestedOutput], Field(max_length=MAX_TENSORS)] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``: the versions served and the signature."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


def metadata(name: str, version: int, platform: str, signature: Signature, parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ModelMetadata`` document of a served version."""
    return {
        "name": name,
        "versions": [str(version)],
        "platform": platform,
        "inputs": [t.to_json() for t in signature.inputs],
        "outputs": [t.to_json() for t in signature.outputs],
        **({"parameters": dict(parameters)} if parameters else {}),
    }


# ----------------------------------------------------------------------------- decoding
def _no_constants(token: str) -> float:
    raise ValueError(f"{token} is not JSON: a missing value is null")


def decode_infer(body: bytes, *, header_length: str | None, signature: Signature) -> tuple[InferRequest, dict[str, np.ndarray]]:
    """The request and its inputs as numpy arrays in the signature's datatypes.

    Raises:
        DataError: a malformed body, a bad tensor or a mismatch with the signature (the
            message names the tensor).
    """
    header, binary = _split(body, header_length)
    try:
        doc = json.loads(header, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"the body is not valid JSON: {exc}") from None
    try:
        request = InferRequest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise DataError(f"{where}: {first.get('msg')}") from None
    offset = 0
    given: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise DataError(f"input {tensor.name!r} is given twice")
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise DataError(f"input {tensor.name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} bytes left")
            if tensor.data is not None:
                raise DataError(f"input {tensor.name!r} has both data and binary_data_size")
            given[tensor.name] = _from_bytes(tensor, binary[offset : offset + size])
            offset += size
        elif tensor.data is None:
            raise DataError(f"input {tensor.name!r} has no data (and no binary_data_size)")
        else:
            given[tensor.name] = _from_json(tensor)
    if offset != len(binary):
        raise DataError(f"{len(binary) - offset} bytes of binary data follow the inputs that no input claims")
    return request, conform(given, signature)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 < n <= len(body):
        raise DataError(f"{HEADER_LENGTH} must be the JSON part's length, 1 to {len(body)} bytes; got {header_length!r}")
    return body[:n], body[n:]


def _count(tensor: TensorInput) -> int:
    count = math.prod(tensor.shape)
    if count > MAX_ELEMENTS:
        raise DataError(f"input {tensor.name!r}: shape {tensor.shape} holds {count} elements, more than {MAX_ELEMENTS}")
    return count


def _flatten(data: list[Any], name: str) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > _MAX_RANK:
                    raise DataError(f"input {name!r}: data nests deeper than {_MAX_RANK} levels")
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > MAX_ELEMENTS:
                raise DataError(f"input {name!r}: more than {MAX_ELEMENTS} elements")
        else:
            stack.pop()
    return flat


def _from_json(tensor: TensorInput) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    count = _count(tensor)
    flat = _flatten(tensor.data or [], name)
    if len(flat) != count:
        raise DataError(f"input {name!r}: shape {tensor.shape} needs {count} elements, data holds {len(flat)}")
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        bad = next((v for v in flat if not isinstance(v, str)), _NONE)
        if bad is not _NONE:
            raise DataError(f"input {name!r} is BYTES: every element must be a string, got {bad!r}")
        return np.array(flat, dtype=object).reshape(tensor.shape)
    if datatype == "BOOL":
        bad = next((v for v in flat if not isinstance(v, bool)), _NONE)
        if bad is not _NONE:
            raise DataError(f"input {name!r} is BOOL: every element must be true or false, got {bad!r}")
        return np.array(flat, dtype=np.bool_).reshape(tensor.shape)
    floating = datatype.startswith("FP")
    for v in flat:
        if isinstance(v, bool) or not (isinstance(v, int) or (floating and (isinstance(v, float) or v is None))):
            kind = "numbers (null for missing)" if floating else "integers"
            raise DataError(f"input {name!r} is {datatype}: every element must be one of {kind}, got {v!r}")
    if floating:
        array = np.array([np.nan if v is None else v for v in flat], dtype=np.float64)
        if np.isinf(array).any():
            raise DataError(f"input {name!r}: a value is too large for a double (it must be finite)")
        with np.errstate(over="ignore"):
            out = array.astype(dtype)
        if np.isinf(out).any():
            raise DataError(f"input {name!r}: a value is out of range for {datatype}")
        return out.reshape(tensor.shape)
    info = np.iinfo(dtype)
    bad = next((v for v in flat if not info.min <= v <= info.max), _NONE)
    if bad is not _NONE:
        raise DataError(f"input {name!r}: {bad} is out of range for {datatype} ({info.min} to {info.max})")
    return np.array(flat, dtype=dtype).reshape(tensor.shape)


_NONE = object()


def _from_bytes(tensor: TensorInput, raw: bytes) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    count = _count(tensor)
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise DataError(f"input {name!r}: binary BYTES data ends inside an element's length")
            n = int.from_bytes(raw[pos : pos + 4], "little")
            if pos + 4 + n > len(raw):
                raise DataError(f"input {name!r}: a binary BYTES element of {n} bytes overruns the data")
            items.append(raw[pos + 4 : pos + 4 + n].decode("utf-8", errors="replace"))
            pos += 4 + n
        if len(items) != count:
            raise DataError(f"input {name!r}: shape {tensor.shape} needs {count} elements, binary data holds {len(items)}")
        return np.array(items, dtype=object).reshape(tensor.shape)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise DataError(f"input {name!r}: shape {tensor.shape} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}")
    array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    if datatype.startswith("FP") and np.isinf(array).any():
        raise DataError(f"input {name!r}: values must be finite (NaN marks a missing value)")
    return array.reshape(tensor.shape)


def conform(given: Mapping[str, np.ndarray], signature: Signature) -> dict[str, np.ndarray]:
    """``given`` checked against the signature and cast to its datatypes (see the module doc).

    Raises:
        DataError: a missing or unknown input, a wrong rank or size, mismatched batch sizes,
            or a datatype that does not cast safely.
    """
    expected = {t.name: t for t in signature.inputs}
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise DataError(f"the model has no inputs {unknown}; its inputs are {list(expected)}")
    missing = [n for n in expected if n not in given]
    if missing:
        raise DataError(f"inputs {missing} are missing; the model's inputs are {list(expected)}")
    out: dict[str, np.ndarray] = {}
    batch: tuple[str, int] | None = None
    for name, spec in expected.items():
        array = given[name]
        _check_shape(name, array.shape, spec)
        if batch is None:
            batch = (name, array.shape[0])
        elif array.shape[0] != batch[1]:
            raise DataError(f"inputs {batch[0]!r} and {name!r} differ in batch size (axis 0): {batch[1]} and {array.shape[0]}")
        out[name] = _cast(name, array, spec)
    return out


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
        raise DataError(f"input {name!r} has shape {list(shape)}; the model takes {list(spec.shape)} (-1: any size)")


def _cast(name: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    want = DATATYPES[spec.datatype]
    if spec.datatype == "BYTES" or array.dtype == np.dtype(want):
        if spec.datatype == "BYTES" and array.dtype != object:
            raise DataError(f"input {name!r} must be BYTES (strings), got {datatype_of(array)}")
        return array
    if spec.datatype == "BOOL" or array.dtype == object or array.dtype == np.bool_ or not np.can_cast(array.dtype, want, casting="same_kind"):
        raise DataError(f"input {name!r} is {datatype_of(array)}; the model takes {spec.datatype}")
    if np.issubdtype(array.dtype, np.integer) and np.issubdtype(want, np.integer):
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DataError(f"input {name!r}: values are out of range for {spec.datatype}")
    elif np.dtype(want).itemsize < array.dtype.itemsize and np.issubdtype(want, np.floating):
        with np.errstate(over="ignore"):
            cast = array.astype(want)
        if np.isinf(cast).any() and not np.isinf(array).any():
            raise DataError(f"input {name!r}: values are out of range for {spec.datatype}")
        return cast
    return array.astype(want)


# ----------------------------------------------------------------------------- encoding
def encode_infer(
    *, name: str, version: int, request: InferRequest, outputs: Mapping[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The response body (and its extra headers) for ``outputs``: the requested outputs in
    the request's order (all of them when it names none), as JSON data, or as binary data
    where the request asks for it.

    Raises:
        DataError: the request asks for an output the model does not give.
    """
    wanted: Sequence[RequestedOutput] = request.outputs or [RequestedOutput(name=n) for n in outputs]
    unknown = [o.name for o in wanted if o.name not in outputs]
    if unknown:
        raise DataError(f"the model gives no outputs {unknown}; it gives {list(outputs)}")
    binary_all = bool((request.parameters or {}).get("binary_data_output", False))
    docs, chunks = [], []
    for out in wanted:
        array = np.asarray(outputs[out.name])
        datatype = datatype_of(array)
        doc: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
        if (out.parameters or {}).get("binary_data", binary_all):
            raw = _to_bytes(array, datatype)
            doc["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            flat = array.reshape(-1)
            doc["data"] = [_jsonable(v) for v in flat.tolist()] if datatype in ("FP16", "FP32", "FP64") else flat.tolist()
        docs.append(doc)
    response: dict[str, Any] = {"model_name": name, "model_version": str(version), "outputs": docs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {HEADER_LENGTH: str(len(header))}


def _jsonable(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def _to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(data).to_bytes(4, "little") + data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<")).tobytes()
