"""Evaluation metrics against scikit-learn / scipy, PSI behaviour, decile tables, segments,
and the model card's files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from mlplatform import DataError
from mlplatform.evaluation import evaluate
from mlplatform.evaluation.metrics import auc, decile_bins, decile_edges, psi


def scores(n=4000, seed=0, shift=0.0, ties=False):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    y = (latent + rng.normal(size=n) > 1.2).astype(int)
    s = 1 / (1 + np.exp(-(latent * 1.3 - 1.5 + shift)))
    if ties:
        s = np.round(s, 2)  # many tied scores
    return y, s


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_metrics_match_sklearn_and_scipy(seed, ties):
    y, s = scores(seed=seed, ties=ties)
    ev = evaluate(y, s)
    assert ev.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ev.brier == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    assert ev.log_loss == pytest.approx(log_loss(y, np.clip(s, 1e-15, 1 - 1e-15)), abs=1e-9)
    assert ev.ks == pytest.approx(ks_2samp(s[y == 1], s[y == 0]).statistic, abs=1e-12)
    assert (ev.n, ev.positives, ev.base_rate) == (len(y), int(y.sum()), pytest.approx(y.mean()))
    assert ev.psi is None


def test_auc_edge_cases():
    assert auc([0, 1], [0.2, 0.8]) == 1.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert auc([1, 0], [0.2, 0.8]) == 0.0
    assert np.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    ev = evaluate([0, 0, 0], [0.1, 0.2, 0.3])
    assert np.isnan(ev.auc) and np.isnan(ev.ks)


def test_psi_is_zero_for_identical_and_large_for_shifted():
    _, train = scores(seed=3)
    assert psi(train, train) == 0.0
    assert psi(train, np.random.default_rng(9).permutation(train)) == 0.0
    _, same_dist = scores(seed=4)
    assert psi(train, same_dist) < 0.02
    _, shifted = scores(seed=4, shift=0.8)
    assert psi(train, shifted) > 0.1
    y, test = scores(seed=4, shift=0.8)
    assert evaluate(y, test, reference_score=train).psi == pytest.approx(psi(train, shifted))


def test_psi_against_a_hand_computation():
    ref = np.arange(100) / 100.0  # deciles: 10 rows each
    cur = np.r_[np.full(50, 0.05), np.full(50, 0.95)]  # half in the first bin, half in the last
    e = np.full(10, 0.1)
    a = np.r_[0.5, np.full(8, 1e-4), 0.5]
    assert psi(ref, cur) == pytest.approx(np.sum((a - e) * np.log(a / e)))


def test_decile_bins_are_left_closed_and_keep_ties_together():
    edges = decile_edges(np.arange(100))
    assert np.bincount(decile_bins(np.arange(100), edges)).tolist() == [10] * 10
    s = np.r_[np.zeros(60), np.linspace(0.1, 1, 40)]  # 60% tied at zero
    y = np.r_[np.zeros(60, int), np.ones(40, int)]
    ev = evaluate(y, s)
    assert ev.calibration["count"].iloc[0] == 60  # ties never split across bins
    assert ev.calibration["count"].sum() == 100


def test_calibration_and_lift_tables():
    y, s = scores(n=10_000, seed=5)
    ev = evaluate(y, s)
    cal, lift = ev.calibration, ev.lift
    assert cal["bin"].tolist() == list(range(1, 11))
    assert cal["count"].tolist() == [1000] * 10
    for _, row in cal.iterrows():
        in_bin = (s >= row.score_min) & (s <= row.score_max)
        assert row.mean_score == pytest.approx(s[in_bin].mean())
        assert row.observed_rate == pytest.approx(y[in_bin].mean())
    assert lift["lift"].tolist() == pytest.approx((cal["observed_rate"] / y.mean()).tolist())
    assert lift["share_of_defaults"].sum() == pytest.approx(1.0)
    assert lift["lift"].iloc[-1] > 2 > lift["lift"].iloc[0]  # riskiest decile well above average


def test_segment_auc_with_single_class_and_missing_segments():
    y, s = scores(n=3000, seed=6)
    term = np.where(np.arange(3000) % 3 == 0, 3, 12).astype(object)
    term[:5] = None
    category = np.array(["fashion"] * 2990 + ["travel"] * 10, dtype=object)
    y = y.copy()
    y[-10:] = 0  # travel: one class only
    ev = evaluate(y, s, segments={"term": term, "merchant_category": pd.Series(category)})
    t = ev.segments["term"].set_index("value")
    assert set(t.index) == {3, 12, "missing"}
    mask = term == 12
    assert t.loc[12, "auc"] == pytest.approx(roc_auc_score(y[mask], s[mask]))
    m = ev.segments["merchant_category"].set_index("value")
    assert np.isnan(m.loc["travel", "auc"]) and m.loc["travel", "count"] == 10
    assert ev.to_json()["segments"]["merchant_category"][1]["auc"] is None


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="only 0 and 1"):
        evaluate([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="NaN or infinite"):
        evaluate([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match="same length"):
        evaluate([0, 1, 1], [0.1, 0.2])
    with pytest.raises(DataError, match="segment 'term' has 1 values"):
        evaluate([0, 1], [0.1, 0.2], segments={"term": [3]})


# ------------------------------------------------------------------------ model card
def test_model_card_files_and_contents(tmp_path):
    from mlplatform import Platform
    from mlplatform.evaluation import write_model_card
    from mlplatform.models.reasons import Reason
    from mlplatform.storage import sha256_hex

    y_tr, s_tr = scores(seed=10)
    evs = {}
    for split, seed, shift in (("train", 10, 0.0), ("validation", 11, 0.1), ("test", 12, 0.3)):
        y, s = scores(seed=seed, shift=shift)
        term = np.where(np.arange(len(y)) % 2 == 0, 3, 6)
        category = np.array(["fashion", "travel"] * (len(y) // 2), dtype=object)
        category[:8] = "jewellery"
        y = y.copy()
        y[:8] = 0  # jewellery: one outcome only -> n/a
        evs[split] = evaluate(y, s, segments={"term": term, "merchant_category": category},
                              reference_score=None if split == "train" else s_tr)
    lineage = {
        "training_set": {"name": "underwriting_v1", "version": 4, "uri": "/root/training_sets/underwriting_v1",
                         "rows": 12000, "content_hash": "1f2e3d4c5b6a7988",
                         "splits": {"train": {"start": "2024-01-01", "end": "2024-07-01", "rows": 8000}},
                         "feature_versions": {"applicant_history": "ab12cd"}, "time_range": {"min": "2024-01-01", "max": "2024-09-30"}},
        "feature_service": "underwriting_v1",
        "code_version": "0123456789abcdef",
    }
    examples = [
        {"id": 1042, "score": 0.41, "reasons": [
            Reason("missed_installments_90d", "Missed payments in the last 90 days", 0.83, 2.0),
            Reason("default_rate_90d", "Elevated risk at this merchant", 0.31, 0.12),
        ]},
        {"id": 7, "score": 0.33, "reasons": ["Amount currently owed on other loans"]},
    ]
    files = write_model_card(
        evs, model_name="underwriting_pd", version=3, lineage=lineage, params={"num_leaves": 31, "learning_rate": 0.05},
        feature_importance={"missed_installments_90d": 120.0, "default_rate_90d": 60.0, "amount": 20.0},
        reason_examples=examples, out=os.environ.get("MLP_CARD_DIR", tmp_path / "card"),
    )
    assert set(files) == {"model_card.md", "roc.png", "calibration.png", "score_distribution.png", "lift.png"}
    for name, data in files.items():
        assert (Path(os.environ.get("MLP_CARD_DIR", tmp_path / "card")) / name).read_bytes() == data
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    md = files["model_card.md"].decode()
    for png in ("roc.png", "calibration.png", "score_distribution.png", "lift.png"):
        assert f"]({png})" in md  # embedded with a relative link
    assert "# Model card: underwriting_pd — version 3" in md
    assert f"| test | {evs['test'].n:,} |" in md and f"{evs['test'].auc:.3f}" in md
    assert f"{evs['test'].psi:.3f}" in md and "PSI" in md
    assert "### merchant_category" in md and "| jewellery |" in md and "n/a" in md
    assert "| 1 | `missed_installments_90d` | 120.0 | 60.0% |" in md
    assert "**Applicant 1042**" in md and "1. Missed payments in the last 90 days (`missed_installments_90d` = 2" in md
    assert "1f2e3d4c5b6a7988" in md and "`applicant_history`" in md and "0123456789abcdef" in md
    assert "## Intended use" in md and "## Limitations" in md
    assert "## Calibration" in md and "Mean predicted" in md

    # The registry stores the card with checksums, and it can be written under a storage root too.
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    write_model_card({"test": evs["test"]}, model_name="m", version=None, lineage={}, params={},
                     feature_importance=None, reason_examples=[], out="reports/m", storage=platform.storage)
    assert "(version assigned at registration)" in platform.storage.read_bytes("reports/m/model_card.md").decode()
    text_model = "tree\nversion=v4\n"  # registering needs no real model to check the files
    mv = platform.models.register("m", flavor="lightgbm", model=text_model, lineage=lineage, metrics={}, params={}, files=files)
    assert mv.artifacts["model_card.md"] == sha256_hex(files["model_card.md"])
    assert platform.storage.read_artifact(f"{mv.artifact_prefix}/lift.png", mv.artifacts["lift.png"]) == files["lift.png"]
