"""Replay: a logged decision recomputes to the same float with the logged model version, even
after the alias moved; tampered artifacts and mismatched hashes are refused; fallbacks are
replayed only with a policy."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from mlplatform import DataError, IntegrityError, NotFoundError, Platform
from mlplatform.models.reasons import ReasonCoder
from mlplatform.serving.decisions.log import DecisionLog
from mlplatform.models.encoding import encode_features
from mlplatform.serving.decisions.replay import replay, score_features

FEATURES = ["loans_90d", "utilisation", "category", "income"]
CATEGORIES = ["electronics", "fashion", "travel"]


def frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "loans_90d": rng.poisson(1.5, n).astype(float),
        "utilisation": rng.uniform(0, 1, n),
        "category": pd.Categorical(rng.choice(CATEGORIES, n), categories=CATEGORIES),
        "income": rng.normal(3000, 800, n),
    })
    df.loc[rng.uniform(size=n) < 0.2, "income"] = np.nan
    return df


def train(seed: int) -> lgb.Booster:
    df = frame(1500, seed)
    logit = 0.6 * df["loans_90d"] + 2 * df["utilisation"] + (df["category"] == "travel") * 0.8 - 2.5
    y = (np.random.default_rng(seed + 1).uniform(size=len(df)) < 1 / (1 + np.exp(-logit))).astype(int)
    return lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 15, "seed": seed},
                     lgb.Dataset(df, y), num_boost_round=40)


@pytest.fixture(scope="module")
def boosters():
    return train(1), train(2)


@pytest.fixture
def platform(tmp_path):
    return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})


def register(platform: Platform, booster: lgb.Booster):
    return platform.models.register("pd", flavor="lightgbm", model=booster, lineage={"code_version": "test"},
                                    metrics={}, params={})


def served_rows(n: int) -> list[dict]:
    """Rows as the feature server hands them over: plain values, None for missing, and the
    occasional category the model never saw."""
    df = frame(n, 99)
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    rows[0]["category"] = "groceries"  # unseen in training
    rows[1]["loans_90d"] = None
    return rows


def log_decision(log: DecisionLog, decision_id: str, mv, row: dict, score: float | None, **changes) -> None:
    log.append_sync({
        "decision_id": decision_id,
        "application_id": f"app-{decision_id}",
        "request": json.dumps({"amount": 120.0, "currency": "USD", "term": 4}),
        "decision": "approve",
        "probability_of_default": score,
        "reasons": "[]",
        "model_name": mv.name,
        "model_version": mv.version,
        "model_sha256": mv.artifacts[mv.model_file],
        "feature_names": json.dumps(FEATURES),
        "features": json.dumps(row),
        "feature_event_timestamps": json.dumps({"applicant_history": "2025-01-30T00:00:00+00:00"}),
        "fallback": False,
        "fallback_reason": None,
        "latency_ms": 3.0,
        "created_at": datetime.now(UTC).isoformat(),
        "shadow": None,
        "returned": True,
        "confirmed": True,
        **changes,
    })


def lightgbm_pandas_score(booster: lgb.Booster, row: dict) -> float:
    """How LightGBM itself scores a row given as a pandas frame with the training categories:
    an independent check of ``encode_features``."""
    df = pd.DataFrame([row], columns=FEATURES)
    df["category"] = pd.Categorical(df["category"], categories=CATEGORIES)
    for name in ("loans_90d", "utilisation", "income"):
        df[name] = df[name].astype(float)
    return float(booster.predict(df, num_threads=1)[0])


def test_replay_recomputes_the_identical_score_with_the_logged_version(platform, boosters, tmp_path):
    v1, v2 = boosters
    mv1 = register(platform, v1)
    platform.models.set_alias("pd", "production", mv1.version)
    rows = served_rows(30)
    spool = tmp_path / "spool"
    with DecisionLog(platform.storage, spool_dir=spool, replica_id="r1") as log:
        for i, row in enumerate(rows):
            # The in-memory booster of the training run scores; replay loads the stored text model.
            score = lightgbm_pandas_score(v1, row)
            assert score == score_features(v1, row)
            log_decision(log, f"d-{i}", mv1, row, score)
        log.compact()
        log_decision(log, "d-spooled", mv1, rows[2], score_features(v1, rows[2]))

        # A newer version now holds the alias: replay must not care.
        mv2 = register(platform, v2)
        platform.models.set_alias("pd", "production", mv2.version)

        for i, row in enumerate(rows):
            result = replay(platform.models, platform.storage, f"d-{i}")
            assert (result.model_name, result.model_version, result.replayable) == ("pd", 1, True)
            assert result.identical and result.replayed_score == result.logged_score
            assert score_features(v2, row) != result.logged_score  # v2 would have scored differently
        assert replay(platform.models, platform.storage, "d-spooled", spool_dir=str(spool)).identical
        with pytest.raises(NotFoundError):
            replay(platform.models, platform.storage, "d-spooled")  # not compacted yet, and no spool given


def test_encoding_matches_the_reason_coder(boosters):
    booster = boosters[0]
    rows = served_rows(20)
    expected = ReasonCoder(booster, {}).matrix(pd.DataFrame(rows, columns=FEATURES))
    got = np.vstack([encode_features(booster, row) for row in rows])
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(DataError, match=r"lack model features \['income'\]"):
        encode_features(booster, {k: v for k, v in rows[0].items() if k != "income"})
    with pytest.raises(DataError, match="'income' has value 'n/a', which is not a number"):
        encode_features(booster, rows[0] | {"income": "n/a"})
    # The online path's own score input: the raw score it sums equals predict's raw score.
    coder = ReasonCoder(booster, {})
    for row in rows:
        raw = float(booster.predict(encode_features(booster, row), raw_score=True)[0])
        assert coder.explain_row(row).raw_score == pytest.approx(raw, abs=1e-9)


def test_a_score_that_is_not_bit_identical_is_reported(platform, boosters, tmp_path):
    mv = register(platform, boosters[0])
    row = served_rows(3)[2]
    explained = ReasonCoder(boosters[0], {}).explain_row(row).probability
    exact = score_features(boosters[0], row)
    off = float(np.nextafter(exact, 1.0))
    with DecisionLog(platform.storage, spool_dir=tmp_path / "spool", replica_id="r1") as log:
        log_decision(log, "d-off", mv, row, off)
        log_decision(log, "d-explained", mv, row, explained)
        log.compact()
    result = replay(platform.models, platform.storage, "d-off")
    assert not result.identical and result.replayed_score == exact and result.logged_score == off
    assert replay(platform.models, platform.storage, "d-explained").identical == (explained == exact)


def test_tampered_artifact_is_refused(platform, boosters, tmp_path):
    mv = register(platform, boosters[0])
    row = served_rows(3)[2]
    with DecisionLog(platform.storage, spool_dir=tmp_path / "spool", replica_id="r1") as log:
        log_decision(log, "d-1", mv, row, score_features(boosters[0], row))
        log.compact()
    key = f"{mv.artifact_prefix}/{mv.model_file}"
    text = platform.storage.read_bytes(key)
    platform.storage.write_bytes(key, text.replace(b"shrinkage=", b"shrinkage=0", 1))
    with pytest.raises(IntegrityError, match="modified after it was written"):
        replay(platform.models, platform.storage, "d-1")


def test_logged_hash_must_match_the_registry(platform, boosters, tmp_path):
    mv = register(platform, boosters[0])
    row = served_rows(3)[2]
    with DecisionLog(platform.storage, spool_dir=tmp_path / "spool", replica_id="r1") as log:
        log_decision(log, "d-1", mv, row, score_features(boosters[0], row), model_sha256="0" * 64)
        log_decision(log, "d-2", mv, row, 0.1, feature_names=json.dumps(FEATURES[::-1]))
        log.compact()
    with pytest.raises(IntegrityError, match="sha256 000000000000"):
        replay(platform.models, platform.storage, "d-1")
    with pytest.raises(DataError, match="in this order"):
        replay(platform.models, platform.storage, "d-2")


class Policy:
    """The decision policy's fallback rule (an explicit seam: ``replay`` takes any object with it)."""

    def __init__(self, approve_up_to: float) -> None:
        self.approve_up_to = approve_up_to

    def fallback(self, *, amount: float, currency: str, term: int):
        return ("approve" if amount <= self.approve_up_to else "review"), []


def test_fallback_is_replayed_only_with_a_policy(platform, boosters, tmp_path):
    mv = register(platform, boosters[0])
    with DecisionLog(platform.storage, spool_dir=tmp_path / "spool", replica_id="r1") as log:
        log_decision(log, "d-fb", mv, {}, None, fallback=True, fallback_reason="feature deadline",
                     decision="approve", model_name=None, model_version=None, model_sha256=None,
                     features="{}", feature_names="[]")
        log.compact()
    result = replay(platform.models, platform.storage, "d-fb")
    assert (result.replayable, result.identical, result.fallback) == (False, False, True)
    assert "pass the policy" in result.note
    same = replay(platform.models, platform.storage, "d-fb", policy=Policy(approve_up_to=150))
    assert (same.replayable, same.identical, same.replayed_decision) == (True, True, "approve")
    changed = replay(platform.models, platform.storage, "d-fb", policy=Policy(approve_up_to=100))
    assert (changed.identical, changed.replayed_decision) == (False, "review")
