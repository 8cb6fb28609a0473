"""Train (or tune), evaluate, write the model card, register and promote the underwriting model."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.features.training_sets import TrainingSetSnapshot, load_training_set

if TYPE_CHECKING:
    import pandas as pd

    from mlplatform.models.registry import ModelVersion
    from mlplatform.platform import Platform

log = logging.getLogger(__name__)
MODEL_NAME = "underwriting"
SEGMENTS = ("term", "merchant_category")


class ModelConfig(BaseModel):
    """The model step of the workload file: training, optional tuning, registration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default=MODEL_NAME, description="Registered model name.")
    train: dict[str, Any] = Field(
        default_factory=lambda: {"num_workers": 2, "num_boost_round": 300, "report_every": 25},
        description="TrainSpec fields (training_set is filled in from the snapshot).",
    )
    tune: dict[str, Any] | None = Field(
        default=None, description="TuneSpec fields without 'train' (search_space, num_samples, …); None = no tuning."
    )
    promote: bool = Field(default=True, description="Point the 'production' alias at the new version.")


def spec_inputs(config: ModelConfig, snapshot: TrainingSetSnapshot) -> dict[str, Any]:
    """What a trained model is a function of: the training and tuning spec and the snapshot."""
    return {"train": config.train, "tune": config.tune, "snapshot": snapshot.content_hash}


def _spec_key(config: ModelConfig, snapshot: TrainingSetSnapshot) -> str:
    return json.dumps(spec_inputs(config, snapshot), sort_keys=True, default=str)


def current_version(platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot) -> ModelVersion | None:
    """The registered version trained from this exact snapshot and spec, if any (resumable runs)."""
    if config.name not in platform.models.names():
        return None
    for version in reversed(platform.models.list(config.name)):
        if version.lineage.get("spec_key") == _spec_key(config, snapshot):
            return version
    return None


def train(platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot) -> Any:
    """Train with Ray Train (or tune with Ray Tune when configured). Returns (booster, info)."""
    spec = {"training_set": snapshot.name, "training_set_version": snapshot.version, **config.train}
    if config.tune:
        log.info(
            "[tune] %s trials with ASHA over %s", config.tune.get("num_samples", 8), sorted(config.tune["search_space"])
        )
        result = platform.training.tune({**config.tune, "train": spec})
        log.info(
            "[tune] %d trials in %.1fs; best validation AUC %.4f with %s",
            len(result.trials), result.wall_time_s, result.validation_auc, result.config,
        )
        return result.booster, {"tuned": True, "best_config": result.config, "params": result.params}
    result = platform.training.train(spec)
    log.info(
        "[train] %d rounds (best %d) on %d workers in %.1fs; validation AUC %.4f, test AUC %.4f",
        result.rounds, result.best_iteration, spec.get("num_workers", 2), result.wall_time_s,
        result.metrics["validation"]["auc"], result.metrics["test"]["auc"],
    )
    return result.booster, {"tuned": False, "params": result.params, "run_uri": result.run_uri}


def _scores(platform: Platform, snapshot: TrainingSetSnapshot, booster: Any) -> pd.DataFrame:
    """Label, score, split and segments for every row, scored on the cluster; only those
    few columns come back to the driver."""
    features = booster.feature_name()
    keep = ["split", snapshot.label, *SEGMENTS, "application_id"]

    def score(batch: pd.DataFrame) -> pd.DataFrame:
        import numpy as np

        out = batch[keep].copy()
        # the same float matrix training used (nullable ints and object columns with None -> NaN)
        matrix = np.column_stack([batch[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in features])
        out["score"] = booster.predict(matrix, num_threads=1)
        return out

    ds = load_training_set(platform.features, snapshot.name, version=snapshot.version)
    return ds.map_batches(score, batch_format="pandas").to_pandas()


def evaluate_and_card(
    platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot, booster: Any, lineage: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Metrics per split and the model card files (Markdown + PNG plots)."""
    from ray.data.expressions import col

    from mlplatform.evaluation.card import write_model_card
    from mlplatform.evaluation.metrics import evaluate
    from mlplatform.models.reasons import ReasonCoder, reason_texts_from_definitions

    scored = _scores(platform, snapshot, booster)
    train_scores = scored.loc[scored["split"] == "train", "score"].to_numpy()
    evaluations = {}
    for split in ("train", "validation", "test"):
        part = scored[scored["split"] == split]
        evaluations[split] = evaluate(
            part[snapshot.label].to_numpy(),
            part["score"].to_numpy(),
            segments={s: part[s].to_numpy() for s in SEGMENTS},
            reference_score=train_scores if split != "train" else None,
        )
    texts = reason_texts_from_definitions(snapshot.features, platform.features.registry)
    coder = ReasonCoder(booster, texts)
    test = scored[scored["split"] == "test"].sort_values("score", ascending=False).head(3)
    # an expression filter runs on Arrow batches; a row lambda would turn every tz-aware
    # timestamp of the row into numpy (which warns that it drops the zone)
    rows = load_training_set(platform.features, snapshot.name, version=snapshot.version).filter(
        expr=col("application_id").is_in(test["application_id"].tolist())
    ).to_pandas()
    examples = []
    for _, row in rows.iterrows():
        explained = coder.explain_row(row[booster.feature_name()].to_dict())
        examples.append(
            {
                "application_id": row["application_id"],
                "probability_of_default": float(explained.probability),
                "reasons": [r.text for r in explained.reasons],
            }
        )
    importance = dict(zip(booster.feature_name(), booster.feature_importance("gain").tolist(), strict=True))
    files = write_model_card(
        evaluations,
        model_name=config.name,
        version=None,
        lineage=lineage,
        params=booster.params if hasattr(booster, "params") else {},
        feature_importance=importance,
        reason_examples=examples,
    )
    metrics = {f"{split}_{k}": v for split, ev in evaluations.items() for k, v in ev.metrics().items()}
    return metrics, files


def train_and_register(platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot) -> ModelVersion:
    """Train (or tune) on ``snapshot``, evaluate, write the model card and register a new version."""
    booster, info = train(platform, config, snapshot)
    lineage = {
        "training_set": snapshot.to_json(),
        "feature_service": snapshot.metadata.get("feature_service"),
        "features": snapshot.features,
        "spec_key": _spec_key(config, snapshot),
        **{k: v for k, v in info.items() if k != "params"},
    }
    metrics, files = evaluate_and_card(platform, config, snapshot, booster, lineage)
    version = platform.models.register(
        config.name,
        flavor="lightgbm",
        model=booster,
        lineage=lineage,
        metrics=metrics,
        params=info.get("params") or {},
        files=files,
        description="Probability that a checkout loan defaults (60+ days past due within 120 days).",
    )
    log.info(
        "[register] %s v%d: test AUC %.4f, KS %.3f, Brier %.4f",
        config.name, version.version, metrics.get("test_auc", float("nan")),
        metrics.get("test_ks", float("nan")), metrics.get("test_brier", float("nan")),
    )
    return version


def promote(platform: Platform, config: ModelConfig, version: ModelVersion) -> str:
    """Promote ``version`` to ``production`` through the promotion gate (when ``config.promote``).

    Returns the step's one-line state: the move, the alias left where it was, or the gate's
    refusal with its figures (recorded in the alias history; the job goes on with the
    production version it had, as a scheduled run would).
    """
    from mlplatform.errors import PromotionRefused

    current = platform.models.aliases(config.name).get("production")
    if not config.promote or current == version.version:
        return "production unset" if current is None else f"production is v{current}"
    try:
        platform.models.promote(config.name, version.version, by="mlp run")
    except PromotionRefused as refused:
        log.warning("[promote] %s", refused)
        decision = refused.decision
        failed = [c.line for c in decision.checks if not c.passed] if decision is not None else []
        why = "; ".join(failed) or (decision.problem if decision is not None else str(refused))
        return f"production stays v{current}, gate refused v{version.version}: {why}"
    return f"production -> v{version.version}"


def model_card_uri(platform: Platform, version: ModelVersion) -> str:
    """Where the registered model card lives (a local path or an s3:// URI)."""
    return platform.storage.uri(f"{version.artifact_prefix}/model_card.md")
