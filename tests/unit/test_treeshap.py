"""The fast exact TreeSHAP equals LightGBM's own ``pred_contrib`` on every kind of numeric
model it accepts (missing values as NaN or as zero, missing handling off, a feature split
several times on one path, single-leaf trees), refuses the models it cannot do exactly, and
is what ``ReasonCoder`` uses, with the same reasons as the ``pred_contrib`` path."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from mlplatform.models import treeshap
from mlplatform.models.reasons import ReasonCoder
from mlplatform.models.treeshap import FastTreeShap


def _data(seed: int, n: int = 3000, k: int = 8, *, nan: float = 0.1, zeros: float = 0.1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    x[rng.random((n, k)) < zeros] = 0.0
    x[rng.random((n, k)) < nan] = np.nan
    y = (np.nan_to_num(x[:, 0]) + 0.7 * np.nan_to_num(x[:, 1]) - 0.5 * np.isnan(x[:, 2]) + rng.logistic(size=n) > 0.3).astype(int)
    return x, y


def _probe(seed: int, k: int) -> np.ndarray:
    """Rows a model has not seen: values in and out of range, exact zeros, NaN."""
    rng = np.random.default_rng(seed + 1000)
    x = rng.normal(scale=2.0, size=(300, k))
    x[rng.random(x.shape) < 0.15] = 0.0
    x[rng.random(x.shape) < 0.15] = np.nan
    return x


@pytest.mark.parametrize(
    "params",
    [
        {"num_leaves": 31},
        {"num_leaves": 15, "zero_as_missing": True},
        {"num_leaves": 15, "use_missing": False},
        {"num_leaves": 7, "max_depth": 6, "min_data_in_leaf": 2},
        {"num_leaves": 4, "learning_rate": 0.5},
    ],
    ids=["nan-missing", "zero-as-missing", "no-missing-handling", "deep-narrow", "stumps"],
)
@pytest.mark.parametrize("way", ["tables", "paths"])
def test_equals_pred_contrib(params, way, monkeypatch):
    if way == "paths":  # no room for tables: the path-by-path kernel
        monkeypatch.setattr(treeshap, "MAX_TABLE_ENTRIES", -1)
    x, y = _data(1)
    booster = lgb.train({"objective": "binary", "verbose": -1, "seed": 3, **params}, lgb.Dataset(x, y), 60)
    shap = FastTreeShap.for_booster(booster)
    assert shap is not None
    assert ("table" in shap._a) == (way == "tables")
    rows = np.vstack([x[:300], _probe(1, x.shape[1])])
    expected = booster.predict(rows, pred_contrib=True)
    got = shap.contributions(rows)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # SHAP's defining property: the contributions add up to the raw score.
    np.testing.assert_allclose(got.sum(axis=1), booster.predict(rows, raw_score=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("way", ["tables", "paths"])
def test_a_feature_split_several_times_on_one_path(way, monkeypatch):
    if way == "paths":
        monkeypatch.setattr(treeshap, "MAX_TABLE_ENTRIES", -1)
    rng = np.random.default_rng(5)
    x = rng.uniform(-3, 3, size=(4000, 2))
    y = ((np.abs(x[:, 0]) < 1) ^ (x[:, 1] > 0.5)).astype(int)  # bands of x0: the same feature again and again
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 31, "min_data_in_leaf": 5}, lgb.Dataset(x, y), 30)
    assert _max_repeats_on_a_path(booster) >= 2
    rows = np.vstack([x[:500], _probe(5, 2)])
    np.testing.assert_allclose(
        FastTreeShap.for_booster(booster).contributions(rows), booster.predict(rows, pred_contrib=True), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("way", ["tables", "paths"])
def test_single_leaf_trees_are_all_bias(way, monkeypatch):
    if way == "paths":
        monkeypatch.setattr(treeshap, "MAX_TABLE_ENTRIES", -1)
    x, _ = _data(2, k=3)
    booster = lgb.train({"objective": "binary", "verbose": -1, "min_data_in_leaf": 10_000}, lgb.Dataset(x, np.r_[np.ones(100), np.zeros(2900)]), 5)
    assert booster.dump_model()["tree_info"][0]["num_leaves"] == 1
    rows = _probe(2, 3)
    got = FastTreeShap.for_booster(booster).contributions(rows)
    np.testing.assert_allclose(got, booster.predict(rows, pred_contrib=True), rtol=0, atol=1e-12)
    assert not got[:, :-1].any()


def test_models_it_cannot_do_exactly_fall_back():
    x, y = _data(3, k=4)
    frame = pd.DataFrame(x, columns=list("abcd"))
    frame["kind"] = pd.Categorical(np.random.default_rng(0).choice(["p", "q", "r"], len(frame)))
    categorical = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(frame, y), 10)
    assert FastTreeShap.for_booster(categorical) is None
    multiclass = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1}, lgb.Dataset(x, y + (x[:, 3] > 1)), 5)
    assert FastTreeShap.for_booster(multiclass) is None
    rf = lgb.train({"objective": "binary", "verbose": -1, "boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.5},
                   lgb.Dataset(x, y), 5)
    assert FastTreeShap.for_booster(rf) is None


def test_long_paths_are_explained_path_by_path(monkeypatch):
    monkeypatch.setattr(treeshap, "MAX_TABLE_PATH_FEATURES", 2)  # a leaf's table would be too wide
    x, y = _data(7)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15}, lgb.Dataset(x, y), 20)
    shap = FastTreeShap.for_booster(booster)
    assert "table" not in shap._a
    np.testing.assert_allclose(shap.contributions(x[:200]), booster.predict(x[:200], pred_contrib=True), rtol=0, atol=1e-12)


def test_wrong_row_width_is_refused():
    x, y = _data(4, k=5)
    shap = FastTreeShap.for_booster(lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, y), 5))
    with pytest.raises(ValueError, match="5 features"):
        shap.contributions(np.zeros((2, 4)))


def test_reason_coder_uses_it_and_gives_the_pred_contrib_reasons():
    x, y = _data(6, k=6)
    names = [f"f{i}" for i in range(6)]
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 31}, lgb.Dataset(pd.DataFrame(x, columns=names), y), 80)
    texts = {n: f"reason {n}" for n in names}
    fast = ReasonCoder(booster, texts)
    slow = ReasonCoder(booster, texts)
    slow._shap = None  # LightGBM's pred_contrib
    assert fast._shap is not None
    frame = pd.DataFrame(np.vstack([x[:200], _probe(6, 6)]), columns=names)
    assert fast.explain(frame) == slow.explain(frame) or _close(fast.explain(frame), slow.explain(frame))
    for row in frame.head(50).to_dict("records"):
        a, b = fast.explain_row(row), slow.explain_row(row)
        assert [r.feature for r in a.reasons] == [r.feature for r in b.reasons]
        assert a.raw_score == pytest.approx(b.raw_score, abs=1e-12)


def _max_repeats_on_a_path(booster) -> int:
    """The most times one feature is split on along one root-to-leaf path."""
    best = 0
    for tree in booster.dump_model()["tree_info"]:
        stack = [(tree["tree_structure"], ())]
        while stack:
            node, path = stack.pop()
            if "leaf_value" in node:
                best = max([best, *(path.count(f) for f in set(path))])
                continue
            path = (*path, node["split_feature"])
            stack.extend(((node["left_child"], path), (node["right_child"], path)))
    return best


def _close(a, b) -> bool:
    return all(
        [r.feature for r in ra] == [r.feature for r in rb]
        and all(abs(p.contribution - q.contribution) < 1e-12 for p, q in zip(ra, rb))
        for ra, rb in zip(a, b, strict=True)
    )
