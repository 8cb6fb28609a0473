"""The promotion gate, without Ray: real LightGBM versions in a real registry on disk, a training
set published as Parquet, the gate's figures checked against scikit-learn on the same rows,
what is recorded, force with a reason, and the CLI."""

from __future__ import annotations

import logging
import textwrap
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from mlplatform import ConfigError, ModelError, Platform, PromotionRefused
from mlplatform.config import PromotionGateConfig
from mlplatform.evaluation.metrics import psi
from mlplatform.evaluation.promotion import compare_scores

T0 = datetime(2024, 1, 1, tzinfo=UTC)
FEATURES = ["income", "late", "noise"]
N, TEST_FROM = 4000, 3000  # rows [TEST_FROM, N) are the out-of-time split


def _frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    income = rng.normal(size=N)
    late = rng.poisson(1.0, size=N).astype(float)
    late[rng.random(N) < 0.05] = np.nan  # missing values travel as NaN
    logit = -2.0 - 1.2 * income + 0.8 * np.nan_to_num(late)
    default = (rng.random(N) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pd.DataFrame(
        {
            "application_id": np.arange(N),
            "application_ts": [T0 + timedelta(hours=i) for i in range(N)],
            "income": income,
            "late": late,
            "noise": rng.normal(size=N),
            "default": default,
            "split": np.where(np.arange(N) < TEST_FROM, "train", "test"),
        }
    )


FRAME = _frame()
TRAIN = FRAME[FRAME["split"] == "train"]
TEST = FRAME[FRAME["split"] == "test"]
PARAMS = {"objective": "binary", "verbose": -1, "num_leaves": 8, "seed": 1, "deterministic": True}


def _booster(columns: list[str], *, weight_positives: float = 1.0) -> lgb.Booster:
    weights = np.where(TRAIN["default"] == 1, weight_positives, 1.0)
    data = lgb.Dataset(TRAIN[columns], TRAIN["default"], weight=weights)
    return lgb.train(PARAMS, data, num_boost_round=40)


GOOD = _booster(["income", "late"])
NOISE = _booster(["noise"])  # no signal: AUC ~0.5
INFLATED = _booster(["income", "late"], weight_positives=4.0)  # ranks well, predicts ~3x the defaults


@pytest.fixture
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("MLP_USER", "risk-analyst")
    platform = Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    table = pa.Table.from_pandas(FRAME, preserve_index=False)
    table = table.set_column(1, "application_ts", table.column("application_ts").cast(pa.timestamp("us", tz="UTC")))
    platform.datasets.publish("training_sets/pd_set", table)
    return platform


def _lineage(version: int = 1) -> dict:
    # what save_training_set's snapshot holds and registration stores (the fields the gate reads)
    return {"training_set": {"name": "pd_set", "version": version, "label": "default", "timestamp_column": "application_ts"}}


def _register(platform, booster, lineage=None) -> int:
    return platform.models.register(
        "pd", flavor="lightgbm", model=booster, lineage=_lineage() if lineage is None else lineage, metrics={}, params={}
    ).version


def _production(platform) -> int | None:
    return platform.models.aliases("pd").get("production")


def test_the_first_promotion_has_nothing_to_compare_and_is_recorded(platform):
    v1 = _register(platform, GOOD)
    event = platform.models.promote("pd", v1)
    assert (event.outcome, event.version, event.previous, event.by) == ("promoted", v1, None, "risk-analyst")
    assert _production(platform) == v1
    (recorded,) = platform.models.alias_history("pd")
    assert recorded == event and "nothing to compare" in recorded.decision["note"]
    # the alias document itself carries the decision that moved it
    doc = platform.storage.read_json("models/pd/aliases/production.json")
    assert doc["version"] == v1 and doc["outcome"] == "promoted" and doc["by"] == "risk-analyst"


def test_a_worse_model_is_refused_with_every_figure_and_the_refusal_is_recorded(platform):
    v1 = _register(platform, GOOD)
    platform.models.promote("pd", v1)
    v2 = _register(platform, NOISE)
    with pytest.raises(PromotionRefused) as refused:
        platform.models.promote("pd", v2)
    assert _production(platform) == v1  # nothing moved
    decision = refused.value.decision
    checks = {c.name: c for c in decision.checks}
    # the figures, recomputed independently on the same rows (the out-of-time split)
    good, noise = GOOD.predict(TEST[["income", "late"]]), NOISE.predict(TEST[["noise"]])
    auc_good, auc_noise = roc_auc_score(TEST["default"], good), roc_auc_score(TEST["default"], noise)
    assert checks["auc"].value == pytest.approx(auc_noise - auc_good, abs=1e-12)
    assert auc_good > 0.7 and auc_noise < 0.6 and not checks["auc"].passed
    assert checks["score_psi"].value == pytest.approx(psi(good, noise), abs=1e-12)
    rate = TEST["default"].mean()
    assert checks["calibration"].value == pytest.approx(abs(noise.mean() / rate - 1), abs=1e-12)
    assert decision.evidence["rows"] == len(TEST) and decision.evidence["split"] == "test"
    message = str(refused.value)
    for line in decision.lines():
        assert line in message
    assert f"out-of-time AUC: candidate {auc_noise:.4f} vs production {auc_good:.4f}" in message
    assert "(allowed down to -0.0050) FAIL" in message and "force=True" in message
    history = platform.models.alias_history("pd", "production")
    assert [e.outcome for e in history] == ["promoted", "refused"]
    assert history[-1].version == v2 and history[-1].previous == v1
    assert history[-1].decision["checks"][0]["line"] == checks["auc"].line


def test_force_needs_a_reason_and_overrides_with_the_reason_logged_and_recorded(platform, caplog):
    v1 = _register(platform, GOOD)
    platform.models.promote("pd", v1)
    v2 = _register(platform, NOISE)
    with pytest.raises(ModelError, match="force=True needs a reason"):
        platform.models.promote("pd", v2, force=True)
    for bad in ("", "   ", 7):
        with pytest.raises(ModelError, match="reason must be a non-empty string"):
            platform.models.promote("pd", v2, force=True, reason=bad)
    assert _production(platform) == v1
    with caplog.at_level(logging.WARNING, logger="mlplatform.models.gate"):
        event = platform.models.promote("pd", v2, force=True, reason="incident 42: v1 reads a retired feed", by="cro")
    assert _production(platform) == v2
    assert (event.outcome, event.by, event.reason, event.previous) == ("forced", "cro", "incident 42: v1 reads a retired feed", v1)
    assert "incident 42: v1 reads a retired feed" in caplog.text and "forced" in caplog.text
    assert not all(c["passed"] for c in event.decision["checks"])  # the figures that were overridden are kept
    assert platform.models.alias_history("pd")[-1] == event


def test_an_equal_model_passes_and_a_miscalibrated_one_fails_calibration(platform):
    v1 = _register(platform, GOOD)
    platform.models.promote("pd", v1)
    same = _register(platform, GOOD)
    event = platform.models.promote("pd", same)
    checks = {c["name"]: c for c in event.decision["checks"]}
    assert event.outcome == "promoted" and _production(platform) == same
    assert checks["auc"]["value"] == 0.0 and checks["score_psi"]["value"] == pytest.approx(0.0, abs=1e-12)
    inflated = _register(platform, INFLATED)
    with pytest.raises(PromotionRefused) as refused:
        platform.models.promote("pd", inflated)
    by_name = {c.name: c for c in refused.value.decision.checks}
    assert not by_name["calibration"].passed and by_name["calibration"].value > 0.5
    assert by_name["auc"].value > -0.02  # it ranks about as well: calibration is what fails


def test_other_aliases_move_without_the_gate(platform):
    v1 = _register(platform, GOOD)
    platform.models.promote("pd", v1)
    v2 = _register(platform, NOISE)
    event = platform.models.promote("pd", v2, "candidate")
    assert event.outcome == "promoted" and event.decision is None
    assert platform.models.aliases("pd") == {"production": v1, "candidate": v2}
    with pytest.raises(ModelError, match="bad alias"):
        platform.models.promote("pd", v2, "Prod!")
    platform.models.set_alias("pd", "shadow", v2)  # the ungated primitive is recorded too
    assert [(e.alias, e.outcome) for e in platform.models.alias_history("pd")] == [
        ("production", "promoted"), ("candidate", "promoted"), ("shadow", "set"),
    ]


def test_a_version_that_cannot_be_compared_is_refused_unless_forced(platform):
    v1 = _register(platform, GOOD)
    platform.models.promote("pd", v1)
    bare = _register(platform, GOOD, lineage={})
    with pytest.raises(PromotionRefused, match="cannot compare: model 'pd' v2 records no training_set"):
        platform.models.promote("pd", bare)
    elsewhere = _register(platform, GOOD, lineage=_lineage(version=9))
    with pytest.raises(PromotionRefused, match="cannot compare: .*pd_set"):
        platform.models.promote("pd", elsewhere)
    event = platform.models.promote("pd", bare, force=True, reason="retrained by hand, evaluated offline")
    assert event.outcome == "forced" and _production(platform) == bare


def test_the_evidence_is_the_latest_rows_of_the_split(tmp_path, platform):
    small = Platform.from_config(
        {"storage": {"root": str(tmp_path / "root")}, "models": {"promotion_gate": {"max_rows": 300, "min_rows": 50}}}
    )
    v1 = _register(small, GOOD)
    small.models.promote("pd", v1)
    v2 = _register(small, NOISE)
    with pytest.raises(PromotionRefused) as refused:
        small.models.promote("pd", v2)
    evidence = refused.value.decision.evidence
    latest = TEST.tail(300)
    assert evidence["rows"] == 300 and evidence["first"] == str(latest["application_ts"].iloc[0])
    auc = {c.name: c for c in refused.value.decision.checks}["auc"].value
    expected = roc_auc_score(latest["default"], NOISE.predict(latest[["noise"]])) - roc_auc_score(
        latest["default"], GOOD.predict(latest[["income", "late"]])
    )
    assert auc == pytest.approx(expected, abs=1e-12)
    tiny = Platform.from_config({"storage": {"root": str(tmp_path / "root")}, "models": {"promotion_gate": {"min_rows": 5000}}})
    with pytest.raises(PromotionRefused, match="has 1000 rows; the gate needs at least 5000"):
        tiny.models.promote("pd", v2)


def test_bounds_are_inclusive_and_inputs_are_checked():
    y = np.array([0, 1, 0, 1, 0, 0, 1, 0])
    s = np.linspace(0.1, 0.8, 8)
    rate = y.mean()
    exact = abs(s.mean() / rate - 1)
    checks = compare_scores(y, s, s, PromotionGateConfig(auc_margin=0.0, max_calibration_error=exact))
    assert [c.passed for c in checks] == [True, True, True] and checks[0].value == 0.0
    with pytest.raises(Exception, match="one class"):
        compare_scores([0, 0, 0], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], PromotionGateConfig())
    with pytest.raises(Exception, match="differ in length"):
        compare_scores([0, 1], [0.1], [0.1, 0.2], PromotionGateConfig())
    with pytest.raises(Exception, match="finite"):
        compare_scores([0, 1], [0.1, float("nan")], [0.1, 0.2], PromotionGateConfig())


@pytest.mark.parametrize(
    ("gate", "field"),
    [({"auc_margin": -0.1}, "auc_margin"), ({"max_score_psi": 0}, "max_score_psi"), ({"margin": 0.1}, "margin"), ({"max_rows": 0}, "max_rows")],
)
def test_gate_config_is_strict(tmp_path, gate, field):
    with pytest.raises(ConfigError, match=f"models.promotion_gate.{field}"):
        Platform.from_config({"storage": {"root": str(tmp_path)}, "models": {"promotion_gate": gate}})


WORKLOAD = """
from pydantic import BaseModel, ConfigDict

class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

def steps(platform, config):
    return []
"""


def test_cli_promote_prints_the_refusal_figures_and_force_needs_a_reason(platform, tmp_path, monkeypatch, capsys):
    from mlplatform.cli import main

    (tmp_path / "code" / "gateteam").mkdir(parents=True)
    (tmp_path / "code" / "gateteam" / "__init__.py").write_text("")
    (tmp_path / "code" / "gateteam" / "job.py").write_text(textwrap.dedent(WORKLOAD))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    workload = tmp_path / "job.yaml"
    workload.write_text(f"workload: gateteam.job\nplatform: {{storage: {{root: '{tmp_path / 'root'}'}}}}\n")
    v1, v2 = _register(platform, GOOD), _register(platform, NOISE)

    assert main(["models", "promote", str(workload), "pd", str(v1)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("20") and f"pd production: unset -> v{v1} (promoted) by risk-analyst" in out
    assert main(["models", "promote", str(workload), "pd", str(v2)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"refused: pd v{v2} stays out of production"
    assert err[1].startswith("  out-of-time AUC: candidate ") and err[1].endswith("FAIL")
    assert err[2].startswith("  score PSI") and err[3].startswith("  calibration")
    assert err[-1] == "  override with --force --reason TEXT"
    assert main(["models", "promote", str(workload), "pd", str(v2), "--force"]) == 1
    assert "force=True needs a reason" in capsys.readouterr().err
    assert main(["models", "promote", str(workload), "pd", str(v2), "--force", "--reason", "board decision 7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"production: v{v1} -> v{v2} (forced) by risk-analyst, reason: board decision 7" in out[0]
    assert any(line.strip().startswith("out-of-time AUC") for line in out[1:])
    assert main(["models", "history", str(workload), "pd"]) == 0
    history = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[1] for line in history] == [
        f"pd production: unset -> v{v1} (promoted) by risk-analyst",
        f"pd production: v{v2} REFUSED (stays v{v1}) by risk-analyst",
        f"pd production: v{v1} -> v{v2} (forced) by risk-analyst, reason: board decision 7",
    ]
    assert _production(platform) == v2
