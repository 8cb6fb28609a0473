"""The underwriting main job, step by step (``mlp run configs/underwriting.yaml``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.features.listing import describe_registry
from mlplatform.platform import Platform
from workloads.underwriting.generate import DataConfig
from workloads.underwriting.model import ModelConfig
from workloads.underwriting.serve import ServeConfig
from workloads.underwriting.training_set import TrainingSetConfig

Echo = Callable[[str], None]
RAW_PREFIX = "raw/underwriting"
TABLES = ("applicants", "merchants", "applications", "installments", "repayment_events", "outcomes")


class Config(BaseModel):
    """The underwriting workload file (configs/underwriting.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workload: Literal["underwriting"] = "underwriting"
    platform: str | dict[str, Any] = Field(default="local.yaml", description="Platform config path or mapping.")
    data: DataConfig = Field(default_factory=DataConfig, description="Synthetic data size, period and seed.")
    training_set: TrainingSetConfig = Field(default_factory=TrainingSetConfig, description="Training-set cut and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Training, tuning and registration.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Deployment and sample decisions.")


def definitions() -> list[Any]:
    from workloads.underwriting.features import DEFINITIONS

    return list(DEFINITIONS)


def generate_data(platform: Platform, config: Config, echo: Echo = print) -> bool:
    """Generate the synthetic data unless the same data (same config) is already published.

    Returns True if data was generated.
    """
    wanted = json.loads(config.data.model_dump_json())
    datasets = platform.datasets
    current = [
        datasets.get(f"{RAW_PREFIX}/{t}").metadata.get("data_config") if datasets.exists(f"{RAW_PREFIX}/{t}") else None
        for t in TABLES
    ]
    if all(c == wanted for c in current):
        echo(f"[generate] up to date: {config.data.applications:,} applications under {platform.storage.uri(RAW_PREFIX)}")
        return False
    from workloads.underwriting.generate import generate

    generate(platform, config.data, prefix=RAW_PREFIX)
    return True


def backfill_views(platform: Platform, config: Config, echo: Echo = print) -> None:
    """Backfill every view over the data period, skipping views whose data is current."""
    from mlplatform.features.store import offline_dataset

    start, end = config.data.start, config.data.end
    for view in platform.features.list_feature_views():
        name = offline_dataset(view.name)
        if platform.datasets.exists(name):
            meta = platform.datasets.get(name).metadata
            if meta.get("data_version") == view.data_version and meta.get("start") == start.isoformat() and meta.get(
                "end"
            ) == end.isoformat():
                echo(f"[backfill] {view.name}: up to date")
                continue
        platform.features.backfill(view, start, end)


def run(platform: Platform, config: Config, echo: Echo = print) -> dict[str, Any]:
    """Generate data → apply definitions → backfill → training set → train (or tune) →
    evaluate + model card → register + promote → materialize → deploy → sample decisions.

    Every step skips itself when its output is already there and unchanged, so re-running
    the job resumes where it stopped.
    """
    from workloads.underwriting import model, serve, training_set

    started = time.monotonic()
    echo(f"mlplatform: underwriting workload on {platform!r}")
    platform.storage.check_reachable()
    generate_data(platform, config, echo)
    result = platform.features.apply(definitions())
    echo(f"[apply] {result}")
    echo(describe_registry(platform.features))
    backfill_views(platform, config, echo)
    snapshot = training_set.build(platform, config.training_set, config.data.end)
    echo(
        f"[training set] {snapshot.name} v{snapshot.version}: {snapshot.rows:,} rows, hash {snapshot.content_hash}, "
        + ", ".join(f"{k}={v['rows']:,}" for k, v in snapshot.splits.items())
        + f" at {snapshot.uri}"
    )
    version = model.train_register_promote(platform, config.model, snapshot, echo)
    card = model.model_card_uri(platform, version)
    echo(f"[model card] {card}")
    platform.features.materialize_incremental(config.data.end)
    deployed, decisions = None, []
    if config.serve.deploy:
        deployed, decisions = serve.deploy_and_decide(platform, config.model.name, config.serve, echo)
    echo(f"done in {time.monotonic() - started:.1f}s; model card: {card}")
    return {
        "apply": result,
        "training_set": snapshot,
        "model": version,
        "model_card": card,
        "deployed": deployed,
        "decisions": decisions,
    }
