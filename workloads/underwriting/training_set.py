"""The underwriting training set: every loan whose outcome was knowable by the cutoff, joined
point-in-time with ``underwriting_v1`` as of its application, split out of time.

Entity rows come from ``raw/underwriting/applications`` joined to ``outcomes`` (label
``default``). Only loans with ``label_ts <= cutoff`` are used: a label is a fact about the
future of the application and is unknown until its 120-day horizon has passed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlplatform.features.training_sets import TrainingSetSnapshot, save_training_set

if TYPE_CHECKING:
    from mlplatform.platform import Platform

RAW = "raw/underwriting"
_EPSILON = timedelta(microseconds=1)
LABEL = "default"
TIMESTAMP = "application_ts"
ENTITY_COLUMNS = [
    "application_id",
    "applicant_id",
    "merchant_id",
    "merchant_category",
    "amount",
    "term",
    "currency",
    "application_ts",
]


class TrainingSetConfig(BaseModel):
    """How the underwriting training set is cut: cutoff and out-of-time split fractions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="underwriting_v1", description="Snapshot name under training_sets/.")
    feature_service: str = Field(default="underwriting_v1", description="Features to join.")
    cutoff: datetime | None = Field(default=None, description="Labels knowable by this time; None = data end.")
    train: float = Field(default=0.70, gt=0, lt=1, description="Share of the application period for training.")
    validation: float = Field(default=0.15, gt=0, lt=1, description="Next share, for early stopping.")

    @model_validator(mode="after")
    def _fractions(self) -> TrainingSetConfig:
        if self.train + self.validation >= 1:
            raise ValueError(f"train + validation must leave room for test, got {self.train} + {self.validation}")
        return self


def entity_rows(platform: Platform, cutoff: datetime):  # noqa: ANN201 - pyarrow.Table
    """Applications whose label is knowable at ``cutoff``, with their label."""
    import pyarrow.compute as pc

    datasets = platform.datasets
    apps = datasets.read_table(f"{RAW}/applications", columns=ENTITY_COLUMNS)
    outcomes = datasets.read_table(f"{RAW}/outcomes", columns=["application_id", "label_ts", LABEL])
    outcomes = outcomes.filter(pc.less_equal(outcomes.column("label_ts"), cutoff))
    return apps.join(outcomes, "application_id", join_type="inner").drop_columns(["label_ts"])


def build(platform: Platform, config: TrainingSetConfig, data_end: datetime) -> TrainingSetSnapshot:
    """Join, split out of time and publish the training-set snapshot (its metadata's
    ``build_key`` is the fingerprint of :func:`build_inputs`)."""
    import pyarrow.compute as pc

    from mlplatform.jobs.steps import fingerprint

    cutoff = config.cutoff or data_end
    key = fingerprint(build_inputs(platform, config, cutoff))
    rows = entity_rows(platform, cutoff)
    start = pc.min(rows.column(TIMESTAMP)).as_py()
    end = pc.max(rows.column(TIMESTAMP)).as_py()
    span = end - start
    train_end = start + span * config.train
    valid_end = train_end + span * config.validation
    # splits are [start, end); the last one must include the latest application
    splits = {"train": (start, train_end), "validation": (train_end, valid_end), "test": (valid_end, end + _EPSILON)}
    refs = platform.features.resolve_features(config.feature_service)
    ds = platform.features.get_historical_features(rows, refs, entity_timestamp=TIMESTAMP)
    return save_training_set(
        platform.features,
        config.name,
        ds,
        features=refs,
        label=LABEL,
        timestamp_column=TIMESTAMP,
        splits=splits,
        metadata={"feature_service": config.feature_service, "cutoff": cutoff.isoformat(), "build_key": key},
    )


def build_inputs(platform: Platform, config: TrainingSetConfig, cutoff: datetime) -> dict:
    """What the snapshot is a function of: its config, the feature definitions and the exact
    versions of the raw and offline data it reads. Equal inputs = the same rows.

    A real-time view reads its stream's offline log: the generated history (the version of the
    table the ``event log`` step imported) and whatever was ingested live since. Live events
    cannot change a row: a row at ``t`` sees only events the bus accepted by ``t``, and every
    row is an application of the data, so before its end, which is before the bus accepted
    any live event (``end`` is today or earlier).
    """
    from mlplatform.features.store import offline_dataset
    from workloads.underwriting.event_history import STREAM_TABLES

    features = platform.features
    refs = features.resolve_features(config.feature_service)
    views = sorted({ref.split(":")[0] for ref in refs})
    used = [v for v in features.list_feature_views() if v.name in views]
    streams = sorted({v.source.name for v in used if v.is_realtime})
    inputs = {
        "config": config.model_dump(mode="json"),
        "cutoff": cutoff.isoformat(),
        "definitions": {v: features.registry.resolve_view(v).version for v in views},
        "data": {
            name: platform.datasets.get(name).version
            for name in [f"{RAW}/applications", f"{RAW}/outcomes"]
            + [offline_dataset(v.name) for v in used if not v.is_realtime]
            + [f"{RAW}/{STREAM_TABLES[s]}" for s in streams]
        },
    }
    return inputs
