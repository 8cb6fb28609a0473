"""Monitoring reports without Ray: PSI per column (with a bin for missing values), a report built
from decision-log records against a training snapshot, written as Markdown, JSON and PNGs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform import Platform
from mlplatform.errors import DataError, ModelError
from mlplatform.evaluation.metrics import psi
from mlplatform.monitoring.drift import column_drift
from mlplatform.monitoring.latest import latest_psi

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
FEATURES = ["income", "utilization", "tenure_months"]


def _frame(rng: np.random.Generator, n: int, *, income_shift: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "income": rng.normal(3000 + income_shift, 800, n),
        "utilization": rng.uniform(0, 1, n),
        "tenure_months": rng.integers(0, 120, n).astype(float),
    }


# ------------------------------------------------------------------------------ drift
def test_a_shifted_feature_is_flagged_and_the_others_are_not():
    rng = np.random.default_rng(1)
    ref, live = _frame(rng, 20_000), _frame(rng, 5_000, income_shift=1200.0)
    drifts = {n: column_drift(n, reference=ref[n], current=live[n]) for n in FEATURES}
    assert drifts["income"].status == "shift" and drifts["income"].psi > 0.25
    for name in ("utilization", "tenure_months"):
        assert drifts[name].status == "stable", drifts[name]
        assert drifts[name].psi < 0.02


def test_a_feature_going_null_is_drift():
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, 10_000)
    live = [None if i % 10 < 3 else float(v) for i, v in enumerate(rng.normal(0, 1, 3_000))]  # 30% null
    d = column_drift("x", reference=ref, current=live)
    assert d.current_missing == pytest.approx(0.3)
    assert d.reference_missing == 0.0
    assert d.status == "shift"
    assert d.labels[-1] == "(missing)" and d.current_shares[-1] == pytest.approx(0.3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300),
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300),
)
def test_without_missing_values_it_is_the_evaluation_psi(ref, cur):
    assert column_drift("x", reference=ref, current=cur).psi == pytest.approx(psi(ref, cur), rel=1e-9, abs=1e-12)


def test_categories_unseen_in_training_count_as_other():
    ref = ["a"] * 500 + ["b"] * 500
    d = column_drift("merchant", reference=ref, current=["a"] * 50 + ["c"] * 50)
    assert d.labels == ["a", "b", "(other)", "(missing)"]
    assert d.current_shares == [0.5, 0.0, 0.5, 0.0]
    assert d.status == "shift"
    same = column_drift("merchant", reference=ref, current=["a", "b"] * 100)
    assert same.psi == pytest.approx(0.0, abs=1e-12) and same.status == "stable"


def test_no_live_values_is_no_data_and_an_empty_reference_is_refused():
    d = column_drift("x", reference=[1.0, 2.0], current=[])
    assert d.psi is None and d.status == "no_data"
    with pytest.raises(DataError, match="no reference values for 'x'"):
        column_drift("x", reference=[], current=[1.0])


# ------------------------------------------------------------------------ the report
@pytest.fixture
def trained(tmp_path):
    """A platform on tmp disk with a training snapshot and a LightGBM model whose lineage names it."""
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    rng = np.random.default_rng(0)
    train = _frame(rng, 4_000)
    y = (rng.uniform(0, 1, 4_000) < 1 / (1 + np.exp((train["income"] - 2500) / 500))).astype(int)
    table = pa.table({**train, "default": y, "split": ["train"] * 3_000 + ["test"] * 1_000})
    ds = platform.datasets.publish("training_sets/uw", table)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7}, lgb.Dataset(np.column_stack([train[f] for f in FEATURES]), y, feature_name=FEATURES), 20)
    lineage = {"training_set": {"name": "uw", "version": ds.version, "rows": 4_000}}
    mv = platform.models.register("uw", flavor="lightgbm", model=booster, lineage=lineage, metrics={}, params={})
    platform.models.set_alias("uw", "production", mv.version)
    return platform, booster, mv.version


def _records(booster, frame, *, version, start, model="uw"):
    out = []
    n = len(frame["income"])
    scores = booster.predict(np.column_stack([frame[f] for f in FEATURES]))
    for i in range(n):
        out.append({
            "decision_id": f"d{i}",
            "model_name": model,
            "model_version": version,
            "fallback": False,
            "returned": True,
            "probability_of_default": float(scores[i]),
            "features": json.dumps({f: float(frame[f][i]) for f in FEATURES}),
            "created_at": (start + timedelta(seconds=i)).isoformat(),
        })
    return out


def test_the_report_flags_the_shifted_feature_and_the_score_and_is_written(trained):
    platform, booster, version = trained
    rng = np.random.default_rng(5)
    start = NOW - timedelta(hours=2)
    live = _records(booster, _frame(rng, 1_500, income_shift=-1500.0), version=version, start=start)
    # Not counted: a fallback, another version, a decision outside the window, one not returned.
    live += [
        {**live[0], "decision_id": "f", "fallback": True, "probability_of_default": None},
        {**live[0], "decision_id": "v", "model_version": version + 1},
        {**live[0], "decision_id": "old", "created_at": (NOW - timedelta(days=3)).isoformat()},
        {**live[0], "decision_id": "nr", "returned": False},
    ]
    monitoring = type(platform.monitoring)(platform.storage, platform.datasets, platform.models, decisions=lambda since: live)
    report = monitoring.report("uw", window="1d", now=NOW)
    assert report.decisions == 1_500
    assert report.version == version
    assert report.reference == {"name": "uw", "version": 1, "split": "train", "rows": 3_000}
    assert report.flagged == ["income", "score"]
    assert {d.name: d.status for d in report.features}["utilization"] == "stable"

    md = platform.storage.read_bytes(f"{report.key}/report.md").decode()
    assert "# Monitoring: uw v1" in md and "`income` | " in md and "![score distribution](score.png)" in md
    assert platform.storage.read_bytes(f"{report.key}/income.png")[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(platform.storage.read_bytes(f"{report.key}/report.json"))
    assert doc["flagged"] == ["income", "score"] and doc["decisions"] == 1_500
    latest = latest_psi(platform.storage, "uw")
    assert latest["version"] == version and latest["report"] == report.key
    assert latest["psi"]["income"] == pytest.approx(report.psi()["income"]) and latest["psi"]["score"] > 0.25


def test_unshifted_traffic_flags_nothing(trained):
    platform, booster, version = trained
    live = _records(booster, _frame(np.random.default_rng(9), 1_500), version=version, start=NOW - timedelta(hours=1))
    monitoring = type(platform.monitoring)(platform.storage, platform.datasets, platform.models, decisions=lambda since: live)
    report = monitoring.report("uw", window=timedelta(hours=6), now=NOW, write=False)
    assert report.flagged == [] and report.key == ""
    assert latest_psi(platform.storage, "uw") is None


def test_bad_requests_are_refused_with_the_reason(trained):
    platform, booster, version = trained
    monitoring = platform.monitoring
    with pytest.raises(DataError, match="window must be positive"):
        monitoring.report("uw", window=timedelta(0))
    with pytest.raises(DataError, match="no 'holdout' rows"):
        monitoring.report("uw", reference_split="holdout", write=False)
    mv = platform.models.register("bare", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    with pytest.raises(ModelError, match="records no training_set"):
        monitoring.report("bare", version=mv.version)


def test_mlp_monitor_reads_the_decision_log_and_prints_what_shifted(trained, tmp_path, capsys):
    from mlplatform.cli import main
    from mlplatform.serving.decisions.log import DecisionLog

    platform, booster, version = trained
    now = datetime.now(UTC)
    live = _records(booster, _frame(np.random.default_rng(3), 400, income_shift=-1500.0), version=version, start=now - timedelta(hours=1))
    with DecisionLog(platform.storage, spool_dir=platform.serving.default_spool_dir(), replica_id="r1", group_commit_ms=0) as log:
        for r in live:
            log.append_sync({
                **r, "application_id": r["decision_id"], "request": "{}", "decision": "approve", "reasons": "[]",
                "model_sha256": "0" * 64, "feature_names": json.dumps(FEATURES), "feature_event_timestamps": "{}",
                "fallback_reason": None, "latency_ms": 1.0, "shadow": None, "confirmed": True,
            })
    (tmp_path / "platform.yaml").write_text(f"storage:\n  root: {platform.storage.root}\n")
    (tmp_path / "workload.yaml").write_text("workload: underwriting\nplatform: platform.yaml\n")

    assert main(["monitor", str(tmp_path / "workload.yaml"), "--model", "uw", "--window", "6h"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("monitor uw v1: 400 decisions, flagged income, score; report ")
    assert out[-1].endswith("/report.md") and any(line.strip().startswith("shift income: PSI") for line in out)
    assert latest_psi(platform.storage, "uw")["psi"]["income"] > 0.25

    assert main(["monitor", str(tmp_path / "workload.yaml"), "--model", "uw", "--window", "soon"]) == 1
    assert "window" in capsys.readouterr().err
