"""Model flavors: a registered version becomes a predictor that scores exactly as the model
itself does (LightGBM through the one encoding rule, torch through its class, config and
signature), refuses bad inputs with a DataError naming the tensor, and never unpickles."""

from __future__ import annotations

import io
import json
import pickle

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplatform import DataError, IntegrityError, ModelError, Platform
from mlplatform.models.encoding import encode_features, encode_frame
from mlplatform.models.flavors import (
    FLAVORS,
    Predictor,
    Signature,
    TensorSpec,
    get_flavor,
)
from workloads.fraud.model import FraudTransformer, TransformerConfig, flavor_config
from workloads.fraud.sequences import CATEGORIES, EVENT_TYPES

K = 6
TINY = TransformerConfig(d_model=16, heads=2, layers=1, ff=32, dropout=0.0, max_events=K)


@pytest.fixture
def platform(tmp_path):
    return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})


def fraud_inputs(n: int, seed: int = 0, k: int = K) -> dict[str, np.ndarray]:
    """A random batch as sequences.to_tensors gives it: right-aligned histories of 0..K events."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, k + 1, size=n)
    mask = np.arange(k)[None, :] >= (k - lengths)[:, None]
    return {
        "event_type": np.where(mask, rng.integers(1, len(EVENT_TYPES), size=(n, k)), 0).astype(np.int64),
        "category": np.where(mask, rng.integers(1, len(CATEGORIES), size=(n, k)), 0).astype(np.int64),
        "log_amount": np.where(mask, rng.normal(5, 1, size=(n, k)), 0).astype(np.float32),
        "days_before": np.where(mask, rng.exponential(30, size=(n, k)), 0).astype(np.float32),
        "days_past_due": np.where(mask, rng.integers(0, 60, size=(n, k)), 0).astype(np.float32),
        "mask": mask,
        "app_category": rng.integers(1, len(CATEGORIES), size=n).astype(np.int64),
        "app_log_amount": rng.normal(5, 1, size=n).astype(np.float32),
    }


@pytest.fixture(scope="module")
def fraud_model():
    torch.manual_seed(0)
    return FraudTransformer(TINY).eval()


@pytest.fixture
def fraud_predictor(platform, fraud_model):
    platform.models.register(
        "fraud", flavor="torch", model=fraud_model, flavor_config=flavor_config(TINY), lineage={}, metrics={}, params={}
    )
    return platform.models.load_predictor("fraud")[1]


def test_the_registry_of_flavors():
    assert set(FLAVORS) == {"lightgbm", "torch", "policy"}
    assert get_flavor("torch").model_file == "model.safetensors" and get_flavor("lightgbm").model_file == "model.txt"
    with pytest.raises(ModelError, match="unknown model flavor 'onnx'.*lightgbm"):
        get_flavor("onnx")


# ---------------------------------------------------------------------------- lightgbm
@pytest.fixture(scope="module")
def lgb_frame():
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame(
        {
            "loans_90d": rng.poisson(2, n).astype(float),
            "category": pd.Categorical(rng.choice(["food", "travel", "tech"], n)),
            "income": rng.normal(50, 10, n),
        }
    )
    frame.loc[::7, "income"] = np.nan
    y = ((frame["loans_90d"] > 2) ^ (frame["category"] == "travel") ^ (rng.random(n) < 0.1)).astype(int)
    return frame, y


@pytest.fixture(scope="module")
def booster(lgb_frame):
    frame, y = lgb_frame
    params = {"objective": "binary", "verbose": -1, "num_leaves": 7, "min_data_in_leaf": 5}
    return lgb.train(params, lgb.Dataset(frame, y), num_boost_round=10)


def test_lightgbm_predictor_scores_as_the_encoding_rule_bit_for_bit(platform, booster):
    mv = platform.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    assert mv.flavor_config == {}
    got_mv, predictor = platform.models.load_predictor("pd", version=1)
    assert got_mv.version == 1 and isinstance(predictor, Predictor)
    assert predictor.signature == Signature(
        inputs=(TensorSpec("loans_90d", "FP64", (-1,)), TensorSpec("category", "BYTES", (-1,)), TensorSpec("income", "FP64", (-1,))),
        outputs=(TensorSpec("probability", "FP64", (-1,)),),
    )
    assert predictor.booster.feature_name() == booster.feature_name()

    # None/NaN missing, an unseen category missing, categories as str or UTF-8 bytes
    rows = [
        {"loans_90d": 2.0, "category": "travel", "income": 51.5},
        {"loans_90d": None, "category": "food", "income": float("nan")},
        {"loans_90d": 0.0, "category": "unseen", "income": 12.0},
        {"loans_90d": 7.0, "category": None, "income": None},
        {"loans_90d": 1.0, "category": "tech", "income": 80.0},
    ]
    frame = pd.DataFrame(rows)
    inputs = {
        "loans_90d": np.array([r["loans_90d"] for r in rows], dtype=object),
        "category": np.array([b"travel", "food", "unseen", None, "tech"], dtype=object),
        "income": frame["income"].to_numpy(),
    }
    out = predictor.predict(inputs)
    assert set(out) == {"probability"} and out["probability"].dtype == np.float64
    want = booster.predict(encode_frame(booster, frame))
    np.testing.assert_array_equal(out["probability"], want)
    per_row = np.array([booster.predict(encode_features(booster, r), num_threads=1)[0] for r in rows])
    np.testing.assert_array_equal(out["probability"], per_row)  # the decision service's path


def test_lightgbm_predictor_over_a_training_frame(booster, lgb_frame):
    frame, _ = lgb_frame
    flavor = get_flavor("lightgbm")
    saved = flavor.save(booster)
    predictor = flavor.load(saved.files, saved.config)
    inputs = {c: frame[c].astype(object).to_numpy() if c == "category" else frame[c].to_numpy() for c in frame}
    np.testing.assert_array_equal(predictor.predict(inputs)["probability"], booster.predict(encode_frame(booster, frame)))
    empty = predictor.predict({c: np.array([]) for c in frame})
    assert empty["probability"].shape == (0,)


def test_lightgbm_predictor_refuses_bad_inputs(booster):
    flavor = get_flavor("lightgbm")
    predictor = flavor.load(flavor.save(booster).files, {})
    good = {"loans_90d": np.array([1.0]), "category": np.array(["food"], object), "income": np.array([3.0])}
    with pytest.raises(DataError, match=r"missing \['income'\]"):
        predictor.predict({k: v for k, v in good.items() if k != "income"})
    with pytest.raises(DataError, match=r"unexpected \['extra'\]"):
        predictor.predict({**good, "extra": np.array([1.0])})
    with pytest.raises(DataError, match="'income' has shape"):
        predictor.predict({**good, "income": np.array([[3.0]])})
    with pytest.raises(DataError, match="'income' is not numeric"):
        predictor.predict({**good, "income": np.array(["lots"], object)})
    with pytest.raises(DataError, match="batch size"):
        predictor.predict({**good, "income": np.array([3.0, 4.0])})
    with pytest.raises(ModelError, match="CPU only"):
        flavor.load(flavor.save(booster).files, {}, device="cuda")
    with pytest.raises(ModelError, match="takes no flavor_config"):
        flavor.save(booster, {"class": "x:Y"})
    with pytest.raises(ModelError, match="does not parse"):
        flavor.load({"model.txt": b"tree\nnot a model"}, {})


def test_lightgbm_regression_output_is_a_prediction():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 2))
    reg = lgb.train({"objective": "regression", "verbose": -1}, lgb.Dataset(x, x[:, 0]), num_boost_round=3)
    flavor = get_flavor("lightgbm")
    predictor = flavor.load(flavor.save(reg).files, {})
    assert [s.name for s in predictor.signature.outputs] == ["prediction"]
    inputs = {name: x[:, j] for j, name in enumerate(reg.feature_name())}
    np.testing.assert_array_equal(predictor.predict(inputs)["prediction"], reg.predict(x))


# ------------------------------------------------------------------------------- torch
def test_torch_predictor_equals_the_models_own_sigmoid(platform, fraud_model):
    mv = platform.models.register(
        "fraud", flavor="torch", model=fraud_model, flavor_config=flavor_config(TINY), lineage={}, metrics={}, params={}
    )
    want_config = flavor_config(TINY)
    assert mv.flavor_config == want_config and platform.models.get("fraud").flavor_config == want_config
    assert want_config["class"] == "workloads.fraud.model:FraudTransformer"
    stored = platform.storage.read_json("models/fraud/versions/00000001.json")
    assert stored["flavor_config"]["signature"]["inputs"][0] == {"name": "event_type", "datatype": "INT64", "shape": [-1, K]}

    _, predictor = platform.models.load_predictor("fraud", version=1)
    assert [s.name for s in predictor.signature.inputs] == [
        "event_type", "category", "log_amount", "days_before", "days_past_due", "mask", "app_category", "app_log_amount"
    ]  # fmt: skip
    inputs = fraud_inputs(64, seed=1)
    out = predictor.predict(inputs)
    assert set(out) == {"probability"} and out["probability"].dtype == np.float64 and out["probability"].shape == (64,)
    with torch.no_grad():
        logits = fraud_model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    np.testing.assert_allclose(out["probability"], torch.sigmoid(logits).numpy(), rtol=0, atol=1e-6)
    # exactly what the fraud pipeline's evaluation computed before it went through the flavor
    np.testing.assert_array_equal(out["probability"], torch.sigmoid(logits.double()).numpy())
    assert predictor.predict({k: v[:0] for k, v in inputs.items()})["probability"].shape == (0,)


def test_registering_a_state_dict_needs_its_class(platform, fraud_model):
    config = flavor_config(TINY)
    state = fraud_model.state_dict()
    with pytest.raises(ModelError, match="needs its module's class"):
        platform.models.register("f", flavor="torch", model=state, flavor_config={k: v for k, v in config.items() if k != "class"},
                                 lineage={}, metrics={}, params={})  # fmt: skip
    platform.models.register("f", flavor="torch", model=state, flavor_config=config, lineage={}, metrics={}, params={})
    _, predictor = platform.models.load_predictor("f")
    inputs = fraud_inputs(5)
    with torch.no_grad():
        want = torch.sigmoid(fraud_model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).double()).numpy()
    np.testing.assert_array_equal(predictor.predict(inputs)["probability"], want)


def test_the_fraud_pipeline_scores_through_the_flavor(fraud_model):
    from mlplatform.models.artifacts import serialize
    from workloads.fraud.pipeline import _score

    inputs = fraud_inputs(40, seed=3)

    def fixed(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), K)

    table = pa.table(
        {
            **{k: fixed(v) for k, v in inputs.items() if v.ndim == 2},
            "app_category": inputs["app_category"],
            "app_log_amount": inputs["app_log_amount"],
            "split": ["test"] * 40,
            "default": np.arange(40) % 2 == 0,
        }
    )
    scored = _score(table, config=TINY, weights=serialize("torch", fraud_model), batch_size=16)
    with torch.no_grad():
        logits = fraud_model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    np.testing.assert_array_equal(scored.column("score").to_numpy(), torch.sigmoid(logits.double()).numpy())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda x: x.pop("mask"), r"missing \['mask'\]"),
        (lambda x: x.update(extra=np.zeros(4)), r"unexpected \['extra'\]"),
        (lambda x: x.update(log_amount=np.zeros((4, K + 1), np.float32)), r"'log_amount' has shape \[4, 7\]"),
        (lambda x: x.update(app_category=np.zeros((4, 1), np.int64)), "'app_category' has shape"),
        (lambda x: x.update(event_type=x["event_type"].astype(np.float64)), "'event_type' has datatype FP64"),
        (lambda x: x.update(mask=x["mask"].astype(np.int64)), "'mask' has datatype INT64.*BOOL"),
        (lambda x: x.update(app_log_amount=np.array(["a", "b", "c", "d"])), "'app_log_amount' has datatype BYTES"),
        (lambda x: x.update(app_category=np.ones(5, np.int64)), "batch size"),
        (lambda x: x.update(category=np.full((4, K), 10_000, np.int64)), "refused the inputs"),
    ],
)
def test_torch_predictor_refuses_bad_inputs(fraud_predictor, change, match):
    inputs = fraud_inputs(4)
    change(inputs)
    with pytest.raises(DataError, match=match):
        fraud_predictor.predict(inputs)


def test_torch_predictor_casts_within_a_kind(fraud_predictor):
    inputs = fraud_inputs(4)
    want = fraud_predictor.predict(inputs)["probability"]
    widened = {**inputs, "log_amount": inputs["log_amount"].astype(np.float64), "app_category": inputs["app_category"].astype(np.int32)}
    np.testing.assert_array_equal(fraud_predictor.predict(widened)["probability"], want)
    listed = {**inputs, "app_category": np.array(inputs["app_category"].tolist(), dtype=object)}  # decoded JSON
    np.testing.assert_array_equal(fraud_predictor.predict(listed)["probability"], want)
    with pytest.raises(DataError, match="outside the range of INT64"):
        fraud_predictor.predict({**inputs, "app_category": np.full(4, 2**63, np.uint64)})


_DTYPES = [np.bool_, np.int8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64, np.str_, object]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_torch_predictor_answers_or_refuses_generated_inputs(fraud_predictor, data):
    """Whatever arrives, the predictor answers probabilities or raises DataError, and still
    answers correctly afterwards."""
    inputs = fraud_inputs(3, seed=data.draw(st.integers(0, 99)))
    for name in data.draw(st.lists(st.sampled_from(sorted(inputs)), max_size=3, unique=True)):
        batch = data.draw(st.sampled_from([0, 3, 4]))
        shape = data.draw(st.sampled_from([(batch,), (batch, K), (batch, K - 1), (batch, K, 1), ()]))
        dtype = data.draw(st.sampled_from(_DTYPES))
        values = data.draw(st.sampled_from([0, 1, -1, 7, 2**40, float("nan"), "x"]))
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN or 2**40 into a small dtype: numpy's cast, not ours
                inputs[name] = np.full(shape, values, dtype=dtype)
        except (ValueError, OverflowError, TypeError):
            inputs[name] = np.full(shape, values, dtype=object)
    try:
        out = fraud_predictor.predict(inputs)
    except DataError:
        pass
    else:
        p = out["probability"]
        assert p.dtype == np.float64 and p.ndim == 1 and np.all((p >= 0) & (p <= 1) | np.isnan(p))
    good = fraud_inputs(2, seed=5)
    assert fraud_predictor.predict(good)["probability"].shape == (2,)


def test_bf16_runs_the_forward_in_bfloat16_and_returns_float64(platform, fraud_model):
    platform.models.register("fraud", flavor="torch", model=fraud_model, flavor_config=flavor_config(TINY), lineage={}, metrics={}, params={})
    inputs = fraud_inputs(32, seed=2)
    fp32 = platform.models.load_predictor("fraud")[1].predict(inputs)["probability"]
    _, predictor = platform.models.load_predictor("fraud", precision="bf16")
    bf16 = predictor.predict(inputs)["probability"]
    assert bf16.dtype == np.float64
    np.testing.assert_allclose(bf16, fp32, atol=3e-2)
    assert not np.array_equal(bf16, fp32)  # bfloat16 really was used
    with pytest.raises(ModelError, match="unknown precision 'fp8'"):
        platform.models.load_predictor("fraud", precision="fp8")
    with pytest.raises(ModelError, match="unknown device"):
        platform.models.load_predictor("fraud", device="tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="cannot move the model to device 'cuda'"):
            platform.models.load_predictor("fraud", device="cuda")


class Affine(torch.nn.Module):
    """A module built with cls(**config) (no from_config), returning raw scores."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


AFFINE = {
    "config": {"n_in": 3, "n_out": 2},
    "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                  "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}]},
}  # fmt: skip


def test_a_module_built_from_keyword_arguments_with_raw_outputs(platform):
    torch.manual_seed(1)
    model = Affine(3, 2)
    mv = platform.models.register("affine", flavor="torch", model=model, flavor_config=AFFINE, lineage={}, metrics={}, params={})
    assert mv.flavor_config["class"] == f"{Affine.__module__}:Affine" and mv.flavor_config["transform"] == "none"
    kept = platform.models.register("affine", flavor="torch", model=model, flavor_config={**AFFINE, "input_builder": "pkg.online:inputs"},
                                    lineage={}, metrics={}, params={})  # fmt: skip
    assert kept.flavor_config["input_builder"] == "pkg.online:inputs"  # for the model server; the flavor ignores it
    _, predictor = platform.models.load_predictor("affine")
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    out = predictor.predict({"x": x})["scores"]
    assert out.dtype == np.float32 and out.shape == (5, 2)
    with torch.no_grad():
        np.testing.assert_array_equal(out, model(torch.from_numpy(x)).numpy())


def test_registration_refuses_a_config_that_would_not_load(platform, fraud_model):
    def register(model=fraud_model, **config):
        return platform.models.register("bad", flavor="torch", model=model, flavor_config=config, lineage={}, metrics={}, params={})

    good = flavor_config(TINY)
    with pytest.raises(ModelError, match="needs 'signature'"):
        register(**{k: v for k, v in good.items() if k != "signature"})
    with pytest.raises(ModelError, match=r"unknown flavor_config keys \['weights'\]"):
        register(**good, weights="x")
    with pytest.raises(ModelError, match="input_builder'] must be 'package.module:function'"):
        register(**{**good, "input_builder": "no colon"})
    with pytest.raises(ModelError, match="unknown transform 'softplus'"):
        register(**{**good, "transform": "softplus"})
    with pytest.raises(ModelError, match="is not an nn.Module subclass"):
        register(model=fraud_model.state_dict(), **{**good, "class": "collections:OrderedDict"})
    with pytest.raises(ModelError, match="cannot import model class 'no_such_module:Net'"):
        register(model=fraud_model.state_dict(), **{**good, "class": "no_such_module:Net"})
    with pytest.raises(ModelError, match="not the configured"):
        register(**{**good, "class": f"{Affine.__module__}:Affine"})
    with pytest.raises(ModelError, match="weights do not fit"):
        register(**{**good, "config": {**good["config"], "d_model": 32, "ff": 64}})
    with pytest.raises(ModelError, match="cannot build"):
        register(**{**good, "config": {**good["config"], "heads": 3}})
    with pytest.raises(ModelError, match="datatype 'BYTES'"):
        register(**{**good, "signature": {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1]}], "outputs": good["signature"]["outputs"]}})
    with pytest.raises(ModelError, match="axis 0 is the batch"):
        register(**{**good, "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}], "outputs": good["signature"]["outputs"]}})

    class Local(torch.nn.Module):
        pass

    with pytest.raises(ModelError, match="cannot be imported where the model loads"):
        register(model=Local(), signature=AFFINE["signature"])
    assert platform.models.names() == []  # nothing was registered


def test_weights_only_versions_load_as_state_dicts_but_not_predictors(platform, fraud_model):
    platform.models.register("w", flavor="torch", model=fraud_model, lineage={}, metrics={}, params={})
    assert platform.models.get("w").flavor_config == {}
    state = platform.models.load("w").model
    assert set(state) == set(fraud_model.state_dict())
    with pytest.raises(ModelError, match="holds weights only"):
        platform.models.load_predictor("w")


def test_records_written_before_flavor_configs_still_load(platform, booster):
    platform.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    key = "models/pd/versions/00000001.json"
    record = platform.storage.read_json(key)
    del record["flavor_config"]
    platform.storage.write_json(key, record)
    assert platform.models.get("pd").flavor_config == {}
    assert platform.models.load("pd").model.feature_name() == booster.feature_name()
    assert platform.models.load_predictor("pd")[1].signature.inputs[0].name == "loans_90d"


# ------------------------------------------------------------------------ never pickle
class Marker:
    """Unpickling this creates ``path``: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickles(path) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": Marker(str(path))}, buffer)
    return {"torch.save": buffer.getvalue(), "pickle": pickle.dumps({"w": Marker(str(path))})}


def test_the_marker_pickles_are_armed(tmp_path):
    marker = tmp_path / "armed"
    pickle.loads(_pickles(marker)["pickle"])
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_pickle_is_refused_without_being_unpickled(tmp_path, kind):
    marker = tmp_path / "unpickled"
    data = _pickles(marker)[kind]
    flavor = get_flavor("torch")
    with pytest.raises(ModelError, match="not a safetensors file"):
        flavor.load({flavor.model_file: data}, flavor_config(TINY))
    with pytest.raises(ModelError, match="not a safetensors file"):
        flavor.read(data)
    assert not marker.exists()


def test_a_pickle_behind_a_matching_checksum_is_refused(platform, fraud_model, tmp_path, monkeypatch):
    """Someone who can write both the artifact and its record still cannot make a node unpickle."""
    mv = platform.models.register("fraud", flavor="torch", model=fraud_model, flavor_config=flavor_config(TINY), lineage={}, metrics={}, params={})
    marker = tmp_path / "unpickled"
    data = _pickles(marker)["torch.save"]
    key = f"{mv.artifact_prefix}/model.safetensors"
    record_key = "models/fraud/versions/00000001.json"
    record = platform.storage.read_json(record_key)
    record["artifacts"]["model.safetensors"]["sha256"] = platform.storage.write_artifact(key, data)
    platform.storage.write_json(record_key, record)

    def refuse(*args, **kwargs):
        raise AssertionError("model loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ModelError, match="not a safetensors file"):
        platform.models.load_predictor("fraud")
    with pytest.raises(ModelError, match="not a safetensors file"):
        platform.models.load("fraud")
    assert not marker.exists()


def test_a_tampered_torch_artifact_is_refused(platform, fraud_model):
    mv = platform.models.register("fraud", flavor="torch", model=fraud_model, flavor_config=flavor_config(TINY), lineage={}, metrics={}, params={})
    key = f"{mv.artifact_prefix}/model.safetensors"
    original = platform.storage.read_bytes(key)
    tampered = bytearray(original)
    tampered[-1] ^= 1  # one bit of one weight
    platform.storage.write_bytes(key, bytes(tampered))
    with pytest.raises(IntegrityError, match="refusing to load"):
        platform.models.load_predictor("fraud")
    platform.storage.write_bytes(key, original)
    assert platform.models.load_predictor("fraud")[0].version == 1


def test_a_file_that_is_not_safetensors_is_refused():
    flavor = get_flavor("torch")
    for data in (b"", b"\x00" * 4, b"\xff" * 64, json.dumps({"w": 1}).encode()):
        with pytest.raises(ModelError, match="not a safetensors file"):
            flavor.read(data)


def test_lightgbm_multiclass_models_are_refused():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 2))
    params = {"objective": "multiclass", "num_class": 3, "verbose": -1}
    multi = lgb.train(params, lgb.Dataset(x, rng.integers(0, 3, 150)), num_boost_round=2)
    flavor = get_flavor("lightgbm")
    with pytest.raises(ModelError, match="3 outputs per iteration"):
        flavor.load(flavor.save(multi).files, {})


def test_fixed_batches_make_a_row_score_independent_of_its_neighbours(fraud_predictor):
    """A transformer's score of a row alone and in a batch may differ in the last bits on CPU;
    in batches of one fixed shape the row scores the same wherever it sits and whatever is with it."""
    from mlplatform.models.flavors.base import predict_in_fixed_batches

    predictor = fraud_predictor
    batch = fraud_inputs(13, seed=4)
    together = predict_in_fixed_batches(predictor, batch, 8)["probability"]
    assert together.shape == (13,)
    for i in range(13):
        alone = predict_in_fixed_batches(predictor, {k: v[i : i + 1] for k, v in batch.items()}, 8)["probability"]
        assert alone[0] == together[i], i
