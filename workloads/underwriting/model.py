"""Train (or tune), evaluate, write the model card, register and promote the underwriting model."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.features.training_sets import TrainingSetSnapshot, load_training_set

if TYPE_CHECKING:
    import pandas as pd

    from mlplatform.models.registry import ModelVersion
    from mlplatform.platform import Platform

Echo = Callable[[str], None]
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


def _spec_key(config: ModelConfig, snapshot: TrainingSetSnapshot) -> str:
    return json.dumps(
        {"train": config.train, "tune": config.tune, "snapshot": snapshot.content_hash}, sort_keys=True, default=str
    )


def current_version(platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot) -> ModelVersion | None:
    """The registered version trained from this exact snapshot and spec, if any (resumable runs)."""
    if config.name not in platform.models.names():
        return None
    for version in reversed(platform.models.list(config.name)):
        if version.lineage.get("spec_key") == _spec_key(config, snapshot):
            return version
    return None


def train(platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot, echo: Echo) -> Any:
    """Train with Ray Train (or tune with Ray Tune when configured). Returns (booster, info)."""
    spec = {"training_set": snapshot.name, "training_set_version": snapshot.version, **config.train}
    if config.tune:
        echo(f"[tune] {config.tune.get('num_samples', 8)} trials with ASHA over {sorted(config.tune['search_space'])}")
        result = platform.training.tune({**config.tune, "train": spec})
        echo(
            f"[tune] {len(result.trials)} trials in {result.wall_time_s:.1f}s; best validation AUC "
            f"{result.validation_auc:.4f} with {result.config}"
        )
        return result.booster, {"tuned": True, "best_config": result.config, "params": result.params}
    result = platform.training.train(spec)
    echo(
        f"[train] {result.rounds} rounds (best {result.best_iteration}) on {spec.get('num_workers', 2)} workers in "
        f"{result.wall_time_s:.1f}s; validation AUC {result.metrics['validation']['auc']:.4f}, "
        f"test AUC {result.metrics['test']['auc']:.4f}"
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
    rows = load_training_set(platform.features, snapshot.name, version=snapshot.version).filter(
        lambda r, ids=set(test["application_id"]): r["application_id"] in ids
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


def train_register_promote(
    platform: Platform, config: ModelConfig, snapshot: TrainingSetSnapshot, echo: Echo
) -> ModelVersion:
    """The whole model step, skipped when this snapshot and spec are already registered."""
    existing = current_version(platform, config, snapshot)
    if existing is not None:
        echo(f"[train] up to date: {config.name} v{existing.version} was trained on snapshot {snapshot.content_hash}")
        version = existing
    else:
        booster, info = train(platform, config, snapshot, echo)
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
        echo(
            f"[register] {config.name} v{version.version}: test AUC {metrics.get('test_auc', float('nan')):.4f}, "
            f"KS {metrics.get('test_ks', float('nan')):.3f}, Brier {metrics.get('test_brier', float('nan')):.4f}"
        )
    if config.promote and platform.models.aliases(config.name).get("production") != version.version:
        platform.models.set_alias(config.name, "production", version.version)
        echo(f"[promote] {config.name}: production -> v{version.version}")
    return version


def model_card_uri(platform: Platform, version: ModelVersion) -> str:
    """Where the registered model card lives (a local path or an s3:// URI)."""
    return platform.storage.uri(f"{version.artifact_prefix}/model_card.md")
