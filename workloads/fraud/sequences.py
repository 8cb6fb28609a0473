"""Point-in-time behaviour sequences: for each application, what the lender knew about the
applicant just before it, as fixed-length tensors for the fraud transformer.

    version = build_sequences(platform, SequenceConfig(max_events=32))
    ds = platform.datasets.read("training_sets/fraud_sequences")   # one row per application
    inputs = to_tensors(table)                                     # a batch of its rows, as torch tensors

This module holds the build on Ray Data (:class:`SequenceConfig`, :func:`build_sequences`) and
the reading side (:func:`to_tensors`). What a row holds, exactly (which events are in an
application's history, their order and padding, the splits) and its columns are stated in
:mod:`workloads.fraud.windows`, the kernel the build runs; the vocabularies, column names and
schema defined there are importable from here too.

The build runs on Ray Data: each input row gets a hash bucket of its ``applicant_id``; a
``groupby(bucket).map_groups`` hands every bucket whole to :func:`bucket_sequences`, which
sorts it and cuts every application's window with array operations. A worker holds one
bucket (about ``partition_rows`` input rows), never the dataset. The same functions run
without Ray in :func:`sequences_from_tables` (used by the unit tests).
"""

from __future__ import annotations

import functools
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlplatform.errors import DataError
from workloads.fraud.windows import (
    APPLICATION,
    CATEGORIES,
    CURRENT_APPLICATION,
    DELINQUENCY,
    EVENT_TYPES,
    LATE_PAYMENT,
    MISSED,
    PAYMENT,
    SEQUENCE_COLUMNS,
    SPLITS,
    application_rows,
    bucket_sequences,
    label_rows,
    output_schema,
    repayment_rows,
    sequences_from_tables,
    split_boundaries,
    utc_micros,
)

if TYPE_CHECKING:
    import ray.data
    import torch

    from mlplatform.platform import Platform
    from mlplatform.storage import DatasetVersion

__all__ = [
    "APPLICATION",
    "CATEGORIES",
    "CURRENT_APPLICATION",
    "DATASET",
    "DELINQUENCY",
    "EVENT_TYPES",
    "LATE_PAYMENT",
    "MISSED",
    "PAYMENT",
    "SEQUENCE_COLUMNS",
    "SPLITS",
    "SequenceConfig",
    "bucket_sequences",
    "build_sequences",
    "output_schema",
    "sequences_from_tables",
    "to_tensors",
]

DATASET = "training_sets/fraud_sequences"


class SequenceConfig(BaseModel):
    """How the sequences are cut (``sequences:`` in a fraud workload config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(default="raw/underwriting", description="Prefix of the raw tables (applications, ...).")
    dataset: str = Field(default=DATASET, description="Dataset the sequences are published as.")
    max_events: int = Field(default=32, ge=1, le=1024, description="K: events kept per application (most recent).")
    cutoff: datetime | None = Field(
        default=None,
        description="Labels known by this time (label_ts <= cutoff); None = the raw data's end (its data_config).",
    )
    train: float = Field(default=0.70, gt=0, lt=1, description="Share of the application period for training.")
    validation: float = Field(default=0.15, gt=0, lt=1, description="The next share, for validation.")
    partition_rows: int = Field(
        default=2_000_000, ge=1, description="Input rows per hash bucket: what one worker holds at a time."
    )

    @model_validator(mode="after")
    def _fractions(self) -> SequenceConfig:
        if self.train + self.validation >= 1:
            raise ValueError(f"train + validation must leave room for test, got {self.train} + {self.validation}")
        return self


# ----------------------------------------------------------------------------- Ray Data
def build_sequences(platform: Platform, config: SequenceConfig | None = None) -> DatasetVersion:
    """Build the sequences of every application labelled by the cutoff and publish them.

        version = build_sequences(platform, SequenceConfig(max_events=32))
        version.metadata["splits"]      # {"train": [start, end], ...} ISO times, [start, end)

    Reads ``{source}/applications``, ``outcomes`` and ``repayment_events`` (latest versions),
    and publishes ``config.dataset`` as one new version (atomically). The manifest metadata
    records ``max_events``, ``cutoff``, the split boundaries, the vocabularies
    (``event_types``, ``categories``; ids are positions) and the source dataset versions.

    Raises:
        NotFoundError: a raw table does not exist.
        DataError: no cutoff can be found, no application is labelled by the cutoff, or a
            repayment event type is unknown.
    """
    config = config or SequenceConfig()
    platform.ray()
    datasets = platform.datasets
    names = {t: f"{config.source}/{t}" for t in ("applications", "outcomes", "repayment_events")}
    manifests = {t: datasets.get(name) for t, name in names.items()}
    cutoff = config.cutoff or _data_end(manifests["outcomes"].metadata, names["outcomes"])
    cutoff_us = int(utc_micros(pa.array([cutoff]))[0])
    rows = sum(m.rows for m in manifests.values())
    buckets = max(1, math.ceil(rows / config.partition_rows))

    def read(table: str, columns: list[str]) -> ray.data.Dataset:
        return datasets.read(names[table], manifests[table].version, columns=columns)

    labels = read("outcomes", ["application_id", "applicant_id", "default", "label_ts"]).map_batches(
        functools.partial(label_rows, cutoff_us=cutoff_us, buckets=buckets), batch_format="pyarrow"
    )
    apps = read("applications", ["application_id", "applicant_id", "merchant_category", "amount", "application_ts"])
    labelled_first, labelled_last = _labelled_range(
        read("outcomes", ["application_ts", "label_ts"]), cutoff_us, names["outcomes"], cutoff
    )
    boundaries = split_boundaries(labelled_first, labelled_last, config.train, config.validation)
    events = read(
        "repayment_events",
        ["applicant_id", "event_type", "event_ts", "known_ts", "balance_delta", "is_late", "days_past_due"],
    )
    timeline = apps.map_batches(
        functools.partial(application_rows, buckets=buckets), batch_format="pyarrow"
    ).union(
        labels,
        events.map_batches(functools.partial(repayment_rows, buckets=buckets), batch_format="pyarrow"),
    )
    # One shuffle partition per bucket: the default (200) would mostly shuffle empty partitions.
    sequences = timeline.groupby("bucket", num_partitions=buckets).map_groups(
        functools.partial(bucket_sequences, max_events=config.max_events, boundaries=boundaries),
        batch_format="pyarrow",
    )
    metadata = {
        "max_events": config.max_events,
        "cutoff": cutoff.isoformat(),
        "splits": {s: [_iso(lo), _iso(hi)] for s, (lo, hi) in boundaries.items()},
        "event_types": list(EVENT_TYPES),
        "categories": list(CATEGORIES),
        "sources": {names[t]: m.version for t, m in manifests.items()},
        "buckets": buckets,
        "builder": __name__,
    }
    return datasets.publish(config.dataset, sequences, metadata=metadata)


def _data_end(metadata: dict[str, Any], name: str) -> datetime:
    end = (metadata.get("data_config") or {}).get("end")
    if end is None:
        raise DataError(f"{name!r} records no data_config.end to use as the label cutoff; set the config's cutoff")
    return datetime.fromisoformat(end)


def _labelled_range(outcomes: ray.data.Dataset, cutoff_us: int, name: str, cutoff: datetime) -> tuple[int, int]:
    def span(batch: pa.Table) -> pa.Table:
        ts = utc_micros(batch.column("application_ts"))[utc_micros(batch.column("label_ts")) <= cutoff_us]
        if len(ts) == 0:
            return pa.table({"lo": pa.array([], pa.int64()), "hi": pa.array([], pa.int64())})
        return pa.table({"lo": [int(ts.min())], "hi": [int(ts.max())]})

    spans = outcomes.map_batches(span, batch_format="pyarrow").take_all()
    if not spans:
        raise DataError(f"no application in {name!r} has label_ts <= cutoff {cutoff.isoformat()}; pick a later cutoff")
    return min(int(s["lo"]) for s in spans), max(int(s["hi"]) for s in spans)


def _iso(us: int) -> str:
    return pa.array([us], pa.int64()).cast(pa.timestamp("us", tz="UTC"))[0].as_py().isoformat()


# ----------------------------------------------------------------------------- tensors
def to_tensors(batch: pa.Table) -> dict[str, torch.Tensor]:
    """The model inputs and the label of a batch of sequence rows, as torch tensors.

        inputs = to_tensors(table)            # table: rows of the published dataset
        logits = model(**{k: v for k, v in inputs.items() if k != "label"})

    Shapes for ``B`` rows: ``event_type``, ``category`` ``[B, K]`` int64; ``log_amount``,
    ``days_before``, ``days_past_due`` ``[B, K]`` float32; ``mask`` ``[B, K]`` bool;
    ``app_category`` ``[B]`` int64; ``app_log_amount`` ``[B]`` float32; ``label`` ``[B]``
    float32 (present when the batch has a ``default`` column).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for name in SEQUENCE_COLUMNS:
        column = batch.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        k = column.type.list_size if pa.types.is_fixed_size_list(column.type) else None
        if k is None:  # a plain list column (e.g. after a foreign Parquet writer): all the same length
            k = len(column[0]) if len(column) else 0
        flat = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), k)
        out[name] = torch.from_numpy(np.array(flat))  # a writable copy; Arrow memory is read-only
    for name in ("event_type", "category"):
        out[name] = out[name].long()
    out["app_category"] = torch.from_numpy(batch.column("app_category").to_numpy().astype(np.int64))
    out["app_log_amount"] = torch.from_numpy(batch.column("app_log_amount").to_numpy().astype(np.float32))
    if "default" in batch.column_names:
        out["label"] = torch.from_numpy(batch.column("default").to_numpy().astype(np.float32))
    return out
