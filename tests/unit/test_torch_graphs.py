"""Recorded forwards (``torch_graphs``): a trace_safe model's hot shape runs from a graph whose
scores equal eager ones bit for bit; other models, other precisions and cold shapes stay eager;
a graph that cannot be recorded faithfully, or fails on an input, changes no answer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from mlplatform import DataError, Platform
from mlplatform.models.flavors.base import predict_in_fixed_batches
from mlplatform.models.flavors.torch_graphs import HOT_AFTER, MAX_GRAPHS, ShapeGraphs
from tests.unit.test_flavors import TINY, fraud_inputs
from workloads.fraud.model import FraudTransformer, flavor_config


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("graphs") / "root")}})
    torch.manual_seed(3)
    platform.models.register("fraud", flavor="torch", model=FraudTransformer(TINY).eval(), flavor_config=flavor_config(TINY),
                             lineage={}, metrics={}, params={})  # fmt: skip
    return platform


def test_a_hot_shape_runs_from_a_graph_with_eager_scores_bit_for_bit(platform):
    _, served = platform.models.load_predictor("fraud")
    _, eager = platform.models.load_predictor("fraud")
    eager.graphs = None
    assert served.graphs is not None and served.graphs.recorded == 0
    for seed in range(40):
        batch = fraud_inputs(11, seed=seed)
        batch["mask"][0] = False  # a first-time applicant: only the current application
        got = predict_in_fixed_batches(served, batch, 8)["probability"]
        np.testing.assert_array_equal(got, predict_in_fixed_batches(eager, batch, 8)["probability"])
        if seed == 0:
            assert served.graphs.recorded == 0  # two calls of shape 8 so far: not hot yet
    assert served.graphs.recorded == 1  # the one shape the fixed batches make


def test_bf16_and_models_without_the_declaration_stay_eager(platform):
    assert platform.models.load_predictor("fraud", precision="bf16")[1].graphs is None

    class Plain(nn.Module):
        def forward(self, x):
            return x * 2

    calls = ShapeGraphs(Plain())
    from mlplatform.models.flavors.torch_graphs import traceable

    assert not traceable(Plain()) and traceable(FraudTransformer(TINY))
    for _ in range(HOT_AFTER + 2):
        calls({"x": torch.ones(2)})
    assert calls.recorded == 1  # ShapeGraphs itself records; the predictor only builds one for trace_safe classes


def test_an_input_the_graph_rejects_gets_the_eager_error(platform):
    _, predictor = platform.models.load_predictor("fraud")
    good = fraud_inputs(8, seed=1)
    for _ in range(HOT_AFTER + 1):
        predictor.predict(good)
    assert predictor.graphs.recorded == 1
    bad = {**good, "category": np.full_like(good["category"], 10_000)}
    with pytest.raises(DataError, match="refused the inputs"):
        predictor.predict(bad)
    _, eager = platform.models.load_predictor("fraud")
    eager.graphs = None
    np.testing.assert_array_equal(predictor.predict(good)["probability"], eager.predict(good)["probability"])  # still served right
    assert predictor.graphs.recorded == 1


def test_a_recording_that_differs_from_eager_keeps_the_shape_eager(caplog):
    class Counter(nn.Module):
        trace_safe = True  # wrongly: its output depends on how often it ran

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x + self.calls

    graphs = ShapeGraphs(Counter())
    with caplog.at_level(logging.WARNING):
        outs = [graphs({"x": torch.zeros(1)}).item() for _ in range(HOT_AFTER + 3)]
    assert graphs.recorded == 0 and "differs from eager" in caplog.text
    assert outs[-1] == HOT_AFTER + 4  # eager every time after (the recording ran it once more)


def test_shapes_past_the_cap_run_eagerly():
    graphs = ShapeGraphs(nn.Linear(3, 1))
    for n in range(1, MAX_GRAPHS + 3):
        for _ in range(HOT_AFTER):
            graphs({"input": torch.ones(n, 3)})
    assert graphs.recorded == MAX_GRAPHS
