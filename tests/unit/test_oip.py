"""The Open Inference Protocol codec: what a V2 client sends is read exactly, bad tensors are
refused with a message naming them, and binary data round-trips as Triton's client writes it."""

import json
import struct

import numpy as np
import pytest

from mlplatform.errors import DataError
from mlplatform.models.flavors.base import Signature, TensorSpec
from mlplatform.serving.model_server.oip import HEADER_LENGTH, decode_infer, encode_infer

SIGNATURE = Signature(
    inputs=(
        TensorSpec("event_type", "INT64", (-1, 3)),
        TensorSpec("amount", "FP32", (-1,)),
        TensorSpec("mask", "BOOL", (-1, 3)),
    ),
    outputs=(TensorSpec("probability", "FP32", (-1,)),),
)


def body(**overrides):
    inputs = {
        "event_type": {"name": "event_type", "shape": [2, 3], "datatype": "INT64", "data": [[1, 2, 0], [3, 4, 5]]},
        "amount": {"name": "amount", "shape": [2], "datatype": "FP32", "data": [12.5, None]},
        "mask": {"name": "mask", "shape": [2, 3], "datatype": "BOOL", "data": [True, True, False, True, True, True]},
    }
    for name, patch in overrides.items():
        inputs[name] = None if patch is None else {**inputs[name], **patch}
    return json.dumps({"id": "r1", "inputs": [t for t in inputs.values() if t is not None]}).encode()


def test_json_tensors_are_read_flat_or_nested_with_null_as_missing():
    request, tensors = decode_infer(body(), header_length=None, signature=SIGNATURE)
    assert request.id == "r1"
    assert tensors["event_type"].dtype == np.int64 and tensors["event_type"].tolist() == [[1, 2, 0], [3, 4, 5]]
    assert tensors["amount"].dtype == np.float32 and tensors["amount"][0] == 12.5 and np.isnan(tensors["amount"][1])
    assert tensors["mask"].tolist() == [[True, True, False], [True, True, True]]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"event_type": {"data": [1.5, 2, 0, 3, 4, 5]}}, "'event_type' is INT64"),
        ({"event_type": {"data": [True, 2, 0, 3, 4, 5]}}, "'event_type' is INT64"),
        ({"event_type": {"data": [2**63, 2, 0, 3, 4, 5]}}, "out of range for INT64"),
        ({"event_type": {"data": [1, 2, 3]}}, "needs 6 elements, data holds 3"),
        ({"event_type": {"shape": [2, 4], "data": [0] * 8}}, "the model takes [-1, 3]"),
        ({"amount": {"data": ["12", 1.0]}}, "'amount' is FP32"),
        ({"amount": {"shape": [3], "data": [1.0, 2.0, 3.0]}}, "differ in batch size"),
        ({"amount": {"datatype": "FP64", "data": [1e300, 1.0]}}, "out of range for FP32"),
        ({"mask": {"data": [1, 1, 0, 1, 1, 1]}}, "'mask' is BOOL"),
        ({"mask": None}, "inputs ['mask'] are missing"),
        ({"amount": {"name": "amount_typo"}}, "no inputs ['amount_typo']"),
        ({"amount": {"data": None}}, "has no data"),
    ],
)
def test_bad_tensors_are_refused_naming_the_tensor(overrides, needle):
    with pytest.raises(DataError, match=None) as err:
        decode_infer(body(**overrides), header_length=None, signature=SIGNATURE)
    assert needle in str(err.value)


@pytest.mark.parametrize("raw", [b"{", b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', b'{"inputs": []}',
                                 b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP128", "data": [1]}]}', b'[1]',
                                 b'{"inputs": [{"name": "amount", "shape": [1], "datatype": "FP32", "data": [1e400]}]}'])
def test_malformed_bodies_are_data_errors(raw):
    with pytest.raises(DataError):
        decode_infer(raw, header_length=None, signature=SIGNATURE)


def test_a_datatype_that_casts_safely_is_accepted():
    request, tensors = decode_infer(body(event_type={"datatype": "INT32"}), header_length=None, signature=SIGNATURE)
    assert tensors["event_type"].dtype == np.int64


def test_binary_inputs_and_outputs_round_trip():
    events = np.array([[1, 2, 0], [3, 4, 5]], dtype=np.int64)
    amount = np.array([12.5, 7.0], dtype=np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.bool_)
    header = json.dumps({
        "inputs": [
            {"name": "event_type", "shape": [2, 3], "datatype": "INT64", "parameters": {"binary_data_size": events.nbytes}},
            {"name": "amount", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": amount.nbytes}},
            {"name": "mask", "shape": [2, 3], "datatype": "BOOL", "parameters": {"binary_data_size": mask.nbytes}},
        ],
        "parameters": {"binary_data_output": True},
    }).encode()
    raw = header + events.tobytes() + amount.tobytes() + mask.tobytes()
    request, tensors = decode_infer(raw, header_length=str(len(header)), signature=SIGNATURE)
    assert np.array_equal(tensors["event_type"], events) and np.array_equal(tensors["amount"], amount) and np.array_equal(tensors["mask"], mask)

    out, headers = encode_infer(name="m", version=3, request=request, outputs={"probability": np.array([0.25, 0.5], dtype=np.float32)})
    n = int(headers[HEADER_LENGTH])
    doc = json.loads(out[:n])
    assert doc["model_version"] == "3" and doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert struct.unpack("<2f", out[n:]) == (0.25, 0.5)


def test_binary_data_that_does_not_add_up_is_refused():
    header = json.dumps({"inputs": [{"name": "amount", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(DataError, match="needs 8 bytes|does not fit"):
        decode_infer(header + b"\0" * 4, header_length=str(len(header)), signature=SIGNATURE)
    with pytest.raises(DataError, match=HEADER_LENGTH):
        decode_infer(header, header_length="-3", signature=SIGNATURE)
    with pytest.raises(DataError, match="no input claims"):
        decode_infer(body() + b"xx", header_length=str(len(body())), signature=SIGNATURE)


def test_json_outputs_follow_the_requested_order_and_refuse_unknown_ones():
    request, _ = decode_infer(json.dumps({**json.loads(body()), "outputs": [{"name": "probability"}]}).encode(), header_length=None, signature=SIGNATURE)
    out, headers = encode_infer(name="m", version=1, request=request, outputs={"probability": np.array([0.5, np.nan]), "logit": np.zeros(2)})
    assert headers == {}
    doc = json.loads(out)
    assert doc == {"model_name": "m", "model_version": "1", "id": "r1", "outputs": [{"name": "probability", "datatype": "FP64", "shape": [2], "data": [0.5, None]}]}
    request, _ = decode_infer(json.dumps({**json.loads(body()), "outputs": [{"name": "nope"}]}).encode(), header_length=None, signature=SIGNATURE)
    with pytest.raises(DataError, match="no outputs"):
        encode_infer(name="m", version=1, request=request, outputs={"probability": np.zeros(2)})
