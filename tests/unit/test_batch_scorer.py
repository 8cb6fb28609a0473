"""The batch-scoring actor without Ray: ``ModelScorer`` loads a version through
``load_predictor`` and scores an Arrow batch through the predictor, for either flavor.
LightGBM scores stay bit for bit what the booster gives on the matrix batch scoring built
before the flavor interface (whatever the columns' types, nulls, chunks and slices); a torch
model's equal its predictor's on ``to_tensors``' inputs; columns that do not fit an input
are refused naming the column."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlplatform import DataError, ModelError, Platform
from mlplatform.batch.scorer import (
    MODEL_NAME,
    MODEL_VERSION,
    REASONS,
    SCORE,
    ModelScorer,
    arrow_inputs,
    check_free_columns,
    output_columns,
)
from mlplatform.models.encoding import encode_frame
from mlplatform.models.flavors import Signature, TensorSpec
from mlplatform.models.reasons import ReasonCoder
from workloads.fraud.model import FraudTransformer, TransformerConfig, flavor_config
from workloads.fraud.sequences import CATEGORIES, EVENT_TYPES, SEQUENCE_COLUMNS, output_schema, to_tensors

K = 6
TINY = TransformerConfig(d_model=16, heads=2, layers=1, ff=32, dropout=0.0, max_events=K)
NUMERIC = ["loans_90d", "utilisation", "income"]
PARAMS = {"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1, "seed": 3}


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """One registry with a numeric LightGBM model, one with a string categorical feature, and
    a tiny fraud transformer."""
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("scorer") / "root")}})
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame({name: rng.normal(size=n) for name in NUMERIC})
    frame.loc[rng.random(n) < 0.1, "income"] = np.nan
    y = (frame["loans_90d"] + frame["utilisation"] + rng.normal(size=n) > 0).astype(int)
    numeric = lgb.train(PARAMS, lgb.Dataset(frame.to_numpy(), y, feature_name=NUMERIC), num_boost_round=15)
    register(platform, "numeric", "lightgbm", numeric)
    frame["category"] = pd.Categorical(rng.choice(["travel", "food", "fuel"], n))
    y = (frame["loans_90d"] + (frame["category"] == "travel") + rng.normal(size=n) > 0.5).astype(int)
    categorical = lgb.train(PARAMS, lgb.Dataset(frame, y), num_boost_round=15)
    register(platform, "categorical", "lightgbm", categorical)
    torch.manual_seed(0)
    register(platform, "fraud", "torch", FraudTransformer(TINY).eval(), flavor_config=flavor_config(TINY))
    return platform


def register(platform, name, flavor, model, **kwargs):
    return platform.models.register(name, flavor=flavor, model=model, lineage={}, metrics={}, params={}, **kwargs)


def scorer(platform, name, texts=None, **overrides) -> ModelScorer:
    mv, predictor = platform.models.load_predictor(name)
    kwargs = {
        "storage": platform.storage, "name": name, "version": mv.version, "sha256": mv.artifacts[mv.model_file],
        "signature": predictor.signature, "texts": texts, "num_threads": 1,
    }  # fmt: skip
    return ModelScorer(**{**kwargs, **overrides})


def matrix_before_flavors(booster: lgb.Booster, batch: pa.Table) -> np.ndarray:
    """The input matrix batch scoring built before it scored through the flavor interface:
    float64 casts straight from Arrow when every feature is a number, else the encoding rule
    over the batch as pandas."""
    names = booster.feature_name()
    numbers = all(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
                  for t in (batch.schema.field(n).type for n in names))  # fmt: skip
    if getattr(booster, "pandas_categorical", None) or not numbers:
        return encode_frame(booster, batch.select(names).to_pandas())
    x = np.empty((batch.num_rows, len(names)))
    for j, name in enumerate(names):
        x[:, j] = pc.cast(batch.column(name), pa.float64(), safe=False).to_numpy()
    return x


# ---------------------------------------------------------------------------- lightgbm
NUMBER_TYPES = [pa.float64(), pa.float32(), pa.int64(), pa.int8(), pa.bool_()]


@st.composite
def numeric_batches(draw) -> pa.Table:
    """A batch of the numeric model's columns in any number type, with nulls, in chunks, maybe sliced."""
    n = draw(st.integers(1, 40))
    columns = {}
    for name in NUMERIC:
        kind = draw(st.sampled_from(NUMBER_TYPES))
        if pa.types.is_boolean(kind):
            values = st.booleans()
        elif pa.types.is_integer(kind):
            bound = 2**62 if kind == pa.int64() else 127
            values = st.integers(-bound, bound)
        else:
            values = st.floats(-1e6, 1e6, width=32 if kind == pa.float32() else 64)
        columns[name] = pa.array(draw(st.lists(st.one_of(st.none(), values), min_size=n, max_size=n)), kind)
    table = pa.table({"application_id": [f"a{i}" for i in range(n)], **columns})
    cut = draw(st.integers(0, n))
    table = pa.concat_tables([table.slice(0, cut), table.slice(cut)])  # two chunks
    start = draw(st.integers(0, n - 1))
    return table.slice(start, draw(st.integers(1, n - start)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=numeric_batches())
def test_lightgbm_scores_are_bit_identical_to_scoring_before_flavors(platform, batch):
    actor = scorer(platform, "numeric")
    out = actor(batch)
    booster = actor.predictor.booster
    assert np.array_equal(out[SCORE].to_numpy(), booster.predict(matrix_before_flavors(booster, batch), num_threads=1))
    assert out.column_names == [*batch.column_names, SCORE, MODEL_NAME, MODEL_VERSION]
    assert out.select(batch.column_names).equals(batch)  # every other column passes through


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    categories=st.lists(st.one_of(st.none(), st.sampled_from(["travel", "food", "fuel", "unseen"])), min_size=1, max_size=30),
    dictionary=st.booleans(),
    cut=st.integers(0, 30),
)
def test_a_categorical_lightgbm_model_scores_bit_identically_with_reasons(platform, categories, dictionary, cut):
    n = len(categories)
    rng = np.random.default_rng(n)
    category = pa.array(categories, pa.string())
    if dictionary:  # as Parquet gives back a pandas categorical
        category = category.dictionary_encode()
    table = pa.table({"loans_90d": rng.normal(size=n), "utilisation": pa.array(rng.integers(0, 3, n)),
                      "income": pa.array([None] * n, pa.float64()), "category": category})  # fmt: skip
    table = pa.concat_tables([table.slice(0, min(cut, n)), table.slice(min(cut, n))])
    texts = {"loans_90d": "recent loans", "utilisation": "utilisation", "income": "income", "category": "category"}
    actor = scorer(platform, "categorical", texts=texts)
    out = actor(table)
    booster = actor.predictor.booster
    assert np.array_equal(out[SCORE].to_numpy(), booster.predict(matrix_before_flavors(booster, table), num_threads=1))
    expected = ReasonCoder(booster, texts).explain(table.select(booster.feature_name()).to_pandas())
    assert out[REASONS].to_pylist() == [[r.text for r in row] for row in expected]


def test_an_integer_beyond_2_53_rounds_as_before(platform):
    batch = pa.table({"loans_90d": pa.array([2**53 + 1, -(2**62)], pa.int64()), "utilisation": [0.5, 0.1], "income": [1.0, None]})
    actor = scorer(platform, "numeric")
    booster = actor.predictor.booster
    assert np.array_equal(actor(batch)[SCORE].to_numpy(), booster.predict(matrix_before_flavors(booster, batch)))


# ------------------------------------------------------------------------------- torch
def sequence_table(n: int, seed: int = 0, *, plain_lists: bool = False) -> pa.Table:
    """Rows as the published fraud sequences hold them (``output_schema``: int8 and float32
    fixed-size lists, bool masks), with random right-aligned histories."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, K + 1, size=n)
    mask = np.arange(K)[None, :] >= (K - lengths)[:, None]
    arrays = {
        "event_type": np.where(mask, rng.integers(1, len(EVENT_TYPES), (n, K)), 0),
        "category": np.where(mask, rng.integers(1, len(CATEGORIES), (n, K)), 0),
        "log_amount": np.where(mask, rng.normal(5, 1, (n, K)), 0),
        "days_before": np.where(mask, rng.exponential(30, (n, K)), 0),
        "days_past_due": np.where(mask, rng.integers(0, 60, (n, K)), 0),
        "mask": mask,
    }
    schema = output_schema(K)
    columns = {
        "application_id": pa.array([f"a{i}" for i in range(n)]),
        "app_category": pa.array(rng.integers(1, len(CATEGORIES), n), schema.field("app_category").type),
        "app_log_amount": pa.array(rng.normal(5, 1, n), schema.field("app_log_amount").type),
    }
    for name in SEQUENCE_COLUMNS:
        values = pa.array(arrays[name].reshape(-1), schema.field(name).type.value_type)
        column = pa.FixedSizeListArray.from_arrays(values, K)
        columns[name] = column.cast(pa.list_(values.type)) if plain_lists else column
    return pa.table(columns)


def model_inputs(table: pa.Table) -> dict[str, np.ndarray]:
    """The fraud evaluation's inputs (``to_tensors`` minus the label), as numpy."""
    return {name: tensor.numpy() for name, tensor in to_tensors(table).items() if name != "label"}


@pytest.mark.parametrize("plain_lists", [False, True])
def test_a_torch_model_scores_as_its_predictor_on_to_tensors_inputs(platform, plain_lists):
    table = sequence_table(40, plain_lists=plain_lists)
    table = pa.concat_tables([table.slice(0, 13), table.slice(13)]).slice(3)  # chunked, at an offset
    actor = scorer(platform, "fraud")
    out = actor(table)
    _, predictor = platform.models.load_predictor("fraud")
    inputs = arrow_inputs(table, predictor.signature)
    for name, array in model_inputs(table).items():
        np.testing.assert_array_equal(inputs[name], array, err_msg=name)
    assert out.column_names == [*table.column_names, SCORE, MODEL_NAME, MODEL_VERSION]
    assert out.schema.field(SCORE).type == pa.float64()
    # the same rows in the same batch: the same numbers, bit for bit
    assert np.array_equal(out[SCORE].to_numpy(), predictor.predict(model_inputs(table))["probability"])


def test_reason_codes_are_refused_for_a_torch_model(platform):
    with pytest.raises(ModelError, match="reason codes explain LightGBM models only"):
        scorer(platform, "fraud", texts={})


def test_columns_that_do_not_fit_an_input_are_refused_naming_them(platform):
    actor = scorer(platform, "fraud")
    table = sequence_table(5)
    with pytest.raises(DataError, match=r"lack the model's input columns \['mask'\]"):
        actor(table.drop_columns(["mask"]))
    ragged = pa.array([[1] * K] * 4 + [[1] * (K - 1)], pa.list_(pa.int8()))
    with pytest.raises(DataError, match=r"column 'event_type' has lists of 5 to 6 values"):
        actor(table.set_column(table.schema.get_field_index("event_type"), "event_type", ragged))
    with pytest.raises(DataError, match="column 'category' is int64, but the model's input 'category' has shape"):
        actor(table.set_column(table.schema.get_field_index("category"), "category", pa.array(range(5))))
    nulls = pa.array([1, None, 2, 3, 4], pa.int8())
    with pytest.raises(DataError, match="column 'app_category' has 1 null values.*INT64"):
        actor(table.set_column(table.schema.get_field_index("app_category"), "app_category", nulls))
    null_list = pa.array([[1] * K, None, [1] * K, [1] * K, [1] * K], pa.list_(pa.int8()))
    with pytest.raises(DataError, match="column 'category' has 1 null lists"):
        actor(table.set_column(table.schema.get_field_index("category"), "category", null_list))
    with pytest.raises(DataError, match="already have output column"):
        actor(table.append_column(SCORE, pa.array([0.5] * 5)))
    # a float input takes a null as NaN (LightGBM reads it as missing)
    small = sequence_table(3)
    small = small.set_column(small.schema.get_field_index("app_log_amount"), "app_log_amount", pa.array([None, 1.0, 2.0], pa.float32()))
    assert arrow_inputs(small, actor.signature)["app_log_amount"].tolist()[1:] == [1.0, 2.0]
    assert np.isnan(arrow_inputs(small, actor.signature)["app_log_amount"][0])


def test_an_actor_refuses_a_version_other_than_the_planned_one(platform):
    with pytest.raises(ModelError, match="not the 0000.* the run was planned with"):
        scorer(platform, "fraud", sha256="0" * 64)
    other = Signature(inputs=(TensorSpec("x", "FP32", (-1,)),), outputs=(TensorSpec("probability", "FP64", (-1,)),))
    with pytest.raises(ModelError, match="has signature"):
        scorer(platform, "fraud", signature=other)


class TwoScores(torch.nn.Module):
    """A model with a ``[-1, 2]`` output, built with ``cls(**config)``."""

    def __init__(self, n_in: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_in, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_outputs_are_columns_by_name_and_a_vector_output_a_fixed_size_list(platform):
    torch.manual_seed(2)
    module = TwoScores(3)
    config = {"config": {"n_in": 3}, "signature": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                                                   "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}]}}  # fmt: skip
    register(platform, "two", "torch", module, flavor_config=config)
    x = np.random.default_rng(0).normal(size=(7, 3))
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)})  # float64 → FP32
    actor = scorer(platform, "two")
    assert actor.outputs == output_columns(actor.signature) == ("scores",)
    out = actor(table)
    assert out.schema.field("scores").type == pa.list_(pa.float32(), 2)
    with torch.inference_mode():
        want = module(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_array_equal(np.array(out["scores"].to_pylist(), np.float32), want)
    check_free_columns(["probability_of_default"], actor.outputs)  # not this model's column
    with pytest.raises(DataError, match=r"\['scores'\]"):
        check_free_columns(["scores"], actor.outputs)


def test_a_fixed_shape_tensor_column_is_an_input_of_its_shape():
    """Arrow's canonical tensor extension (Ray Data's own tensor type reads the same way)."""
    x = np.arange(40, dtype=np.int8).reshape(5, 2, 4)
    table = pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)}).slice(1)
    signature = Signature(inputs=(TensorSpec("x", "FP32", (-1, 2, 4)),), outputs=(TensorSpec("y", "FP32", (-1,)),))
    got = arrow_inputs(table, signature)["x"]
    assert got.dtype == np.float32 and got.shape == (4, 2, 4)
    np.testing.assert_array_equal(got, x[1:])
    with pytest.raises(DataError, match="column 'x' is extension"):
        arrow_inputs(table, Signature(inputs=(TensorSpec("x", "FP32", (-1, 8)),), outputs=signature.outputs))
