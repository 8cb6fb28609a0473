"""Reason codes against a direct computation from LightGBM's contributions: the largest
positive contributions, descending, texts mapped and deduplicated, at most four; the
single-row (serving) path agrees with the DataFrame (model card) path."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from mlplatform import DataError, Platform
from mlplatform.models.reasons import Reason, ReasonCoder, reason_codes, reason_texts_from_definitions

FEATURES = ["missed_90d", "late_90d", "loans_30d", "balance", "merchant_rate", "amount", "tenure", "noise"]
TEXTS = {
    "missed_90d": "Missed payments in the last 90 days",
    "late_90d": "Missed payments in the last 90 days",  # shares a text with missed_90d
    "loans_30d": "Number of recent loans",
    "balance": "Amount currently owed on other loans",
    "merchant_rate": "Elevated risk at this merchant",
    "amount": "Size of this purchase",
    "category": "Type of merchant",
    # "tenure" and "noise" have no text
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 4000
    df = pd.DataFrame({name: rng.normal(size=n) for name in FEATURES})
    df["category"] = pd.Categorical(rng.choice(["fashion", "travel", "electronics"], n))
    df.loc[rng.random(n) < 0.05, "balance"] = np.nan
    logit = (
        df.missed_90d + 0.8 * df.late_90d + 0.6 * df.loans_30d + 0.5 * df.balance.fillna(0) + 0.7 * df.merchant_rate
        + 0.4 * df.amount - 0.5 * df.tenure + (df.category == "travel") * 0.8
    )
    y = (logit + rng.logistic(size=n) > 1.0).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_leaves": 15, "seed": 1}, lgb.Dataset(df, y), num_boost_round=100
    )
    return booster, df


def expected_reasons(contrib_row, names, values, texts, max_reasons=4):
    """Brute force: sort every (feature, contribution) by contribution, keep positives with a
    text, first occurrence of each text, at most four."""
    candidates = sorted(
        ((c, j) for j, c in enumerate(contrib_row[:-1]) if c > 0), key=lambda cj: (-cj[0], cj[1])
    )
    out, seen = [], set()
    for c, j in candidates:
        text = texts.get(names[j])
        if text is None or text in seen:
            continue
        seen.add(text)
        out.append((names[j], text, c, values[j]))
    return out[:max_reasons]


def test_reasons_are_the_largest_positive_contributions(data):
    booster, df = data
    sample = df.iloc[:300]
    got = reason_codes(booster, sample, reasons=TEXTS)
    contrib = booster.predict(sample, pred_contrib=True)  # LightGBM's own pandas path
    names = booster.feature_name()
    assert len(got) == len(sample)
    deduplicated = 0
    for i, reasons in enumerate(got):
        values = [None if pd.isna(v) else v for v in sample[names].iloc[i].tolist()]
        want = expected_reasons(contrib[i], names, values, TEXTS)
        assert [(r.feature, r.text, r.value) for r in reasons] == [(f, t, v) for f, t, _, v in want]
        assert [r.contribution for r in reasons] == pytest.approx([c for _, _, c, _ in want], abs=1e-9)
        assert len(reasons) <= 4
        assert all(r.contribution > 0 for r in reasons)
        assert [r.contribution for r in reasons] == sorted((r.contribution for r in reasons), reverse=True)
        assert len({r.text for r in reasons}) == len(reasons)
        assert not {r.feature for r in reasons} & {"tenure", "noise"}
        both = contrib[i][names.index("missed_90d")] > 0 and contrib[i][names.index("late_90d")] > 0
        deduplicated += both
    assert deduplicated > 10  # the shared text was actually exercised


def test_single_row_path_matches_the_dataframe_path(data):
    booster, df = data
    coder = ReasonCoder(booster, TEXTS)
    batch = coder.explain(df.iloc[:100])
    raw = booster.predict(df.iloc[:100], raw_score=True)
    for i in range(100):
        row = {k: (None if pd.isna(v) else v) for k, v in df.iloc[i].to_dict().items()}  # category as a string
        explained = coder.explain_row(row)
        assert explained.reasons == batch[i]
        assert explained.raw_score == pytest.approx(raw[i], abs=1e-9)
        assert explained.probability == pytest.approx(1 / (1 + np.exp(-raw[i])))
    assert reason_codes(booster, row, reasons=TEXTS) == [explained.reasons]


def test_encoded_rows_are_explained_as_each_row_alone(data):
    """The decision service explains a micro-batch's declines in one call; each row must get
    exactly what it would get alone."""
    from mlplatform.models.encoding import encode_features

    booster, df = data
    coder = ReasonCoder(booster, TEXTS)
    rows = [{k: (None if pd.isna(v) else v) for k, v in df.iloc[i].to_dict().items()} for i in range(40)]
    x = np.vstack([encode_features(booster, row) for row in rows])
    together = coder.explain_encoded(x, rows)
    assert together == [coder.explain_row(row) for row in rows]
    assert coder.explain_encoded(x[:0], []) == []
    with pytest.raises(DataError, match="2 encoded rows but 1 rows"):
        coder.explain_encoded(x[:2], rows[:1])


def test_default_text_groups_features_without_one(data):
    booster, df = data
    for reasons in reason_codes(booster, df.iloc[:200], reasons=TEXTS, default_text="Other factors", max_reasons=8):
        other = [r for r in reasons if r.text == "Other factors"]
        assert len(other) <= 1
        assert all(r.feature in {"tenure", "noise"} for r in other)
    one = reason_codes(booster, df.iloc[:50], reasons=TEXTS, max_reasons=1)
    assert all(len(r) <= 1 for r in one)


def test_missing_features_are_data_errors(data):
    booster, df = data
    with pytest.raises(DataError, match=r"lacks model features \['noise'\]"):
        ReasonCoder(booster, TEXTS).explain_row({k: 0.0 for k in FEATURES if k != "noise"} | {"category": "travel"})
    with pytest.raises(DataError, match="lack model columns"):
        reason_codes(booster, df.drop(columns=["amount"]), reasons=TEXTS)


def test_reason_is_a_small_value_object():
    r = Reason("missed_90d", "Missed payments", 0.5, 2.0)
    assert r == Reason("missed_90d", "Missed payments", 0.5, 2.0)
    with pytest.raises(AttributeError):
        r.text = "x"


def test_texts_come_from_feature_definitions(tmp_path):
    from workloads.underwriting.features import DEFINITIONS

    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    platform.features.apply(DEFINITIONS)
    refs = ["applicant_history:missed_installments_90d", "merchant_risk:default_rate_90d"]
    texts = reason_texts_from_definitions(refs, platform.features.registry)
    assert texts == {
        "missed_installments_90d": "Missed payments in the last 90 days",
        "default_rate_90d": "Elevated risk at this merchant",
    }
    full = reason_texts_from_definitions(refs, platform.features.registry, full_feature_names=True)
    assert set(full) == {"applicant_history__missed_installments_90d", "merchant_risk__default_rate_90d"}
    service = next(d for d in DEFINITIONS if d.kind == "feature_service")
    from_service = reason_texts_from_definitions(service, platform.features.registry)
    assert from_service["missed_installments_90d"] == "Missed payments in the last 90 days"


def test_missing_values_and_unseen_categories_in_a_row(data):
    booster, df = data
    coder = ReasonCoder(booster, TEXTS)
    row = {k: (None if pd.isna(v) else v) for k, v in df.iloc[0].to_dict().items()}
    as_none = coder.explain_row(row | {"balance": None, "category": "unseen"})
    as_na = coder.explain_row(row | {"balance": pd.NA, "category": np.nan})
    frame = df.iloc[:1].copy()
    frame["balance"] = np.nan
    frame["category"] = pd.Categorical([None], categories=df["category"].cat.categories)
    assert as_none == as_na
    assert as_none.raw_score == pytest.approx(booster.predict(frame, raw_score=True)[0], abs=1e-9)
    assert all(r.value is not pd.NA for r in as_na.reasons)
    with pytest.raises(DataError, match="'amount' has value 'lots'"):
        coder.explain_row(row | {"amount": "lots"})
