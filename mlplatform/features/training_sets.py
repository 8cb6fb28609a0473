"""Training-set snapshots: a point-in-time training set frozen as a versioned dataset, with
the lineage training records (path, rows, content hash, feature definition versions).

    snapshot = save_training_set(platform.features, "underwriting_v1", ds, features=refs, label="default",
                                 timestamp_column="application_ts", splits=boundaries)
    train = load_training_set(platform.features, "underwriting_v1", split="train")

Each function takes the feature store: its datasets hold the rows, its storage the snapshot
records, its registry the definition versions, and it connects to Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError
from mlplatform.features.definitions import parse_ref

if TYPE_CHECKING:
    import ray.data

    from mlplatform.features.store import FeatureStore

PREFIX = "training_sets"
SPLIT_COLUMN = "split"
_MOD = (1 << 61) - 1


@dataclass(frozen=True)
class TrainingSetSnapshot:
    """What a model was trained on: enough to find, verify and reproduce it."""

    name: str
    version: int
    uri: str
    rows: int
    content_hash: str
    label: str
    timestamp_column: str
    features: list[str]
    feature_versions: dict[str, str]
    splits: dict[str, dict[str, Any]]
    time_range: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def assign_split(ts_micros: Any, boundaries: dict[str, tuple[datetime, datetime]]) -> Any:
    """Name of the split each timestamp falls in: ``[start, end)`` per split; None outside all."""
    import numpy as np

    out = np.full(len(ts_micros), None, dtype=object)
    for split, (start, end) in boundaries.items():
        lo, hi = int(start.timestamp() * 1e6), int(end.timestamp() * 1e6)
        out[(ts_micros >= lo) & (ts_micros < hi)] = split
    return out


def save_training_set(
    store: FeatureStore,
    name: str,
    ds: ray.data.Dataset,
    *,
    features: list[str],
    label: str,
    timestamp_column: str,
    splits: dict[str, tuple[datetime, datetime]],
    metadata: dict[str, Any] | None = None,
) -> TrainingSetSnapshot:
    """Assign out-of-time splits by ``timestamp_column`` and publish the rows as the next version
    of ``training_sets/NAME``. Rows outside every split are dropped (say so in ``splits``).

    The content hash is order-independent (a sum of row hashes), so the same rows give the
    same hash however the cluster partitioned them.

    Each view with quality expectations is validated on the rows before anything is
    published; the reports' summaries are kept in the snapshot's ``quality`` (and so in the
    lineage and model card of a model trained on it).

    Raises:
        DataError: the label column is missing.
        QualityError: a strict view's features failed an expectation (nothing published).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def tag(batch: pa.Table) -> pa.Table:
        ts = batch.column(timestamp_column).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        labels = assign_split(ts.to_numpy(zero_copy_only=False), splits)
        batch = batch.append_column(SPLIT_COLUMN, pa.array(labels, type=pa.string()))
        return batch.filter(pc.is_valid(batch.column(SPLIT_COLUMN)))

    tagged = ds.map_batches(tag, batch_format="pyarrow").materialize()
    if label not in tagged.schema().names:
        raise DataError(f"label column {label!r} is not in the training set; columns: {tagged.schema().names}")
    quality = _validate(store, tagged, features)
    partials = tagged.map_batches(
        _row_hash_batch, batch_format="pandas", fn_kwargs={"timestamp_column": timestamp_column}
    ).take_all()
    digest = sum(int(p["h"]) for p in partials) % _MOD
    counts: dict[str, int] = {}
    for p in partials:
        for split, n in p["counts"].items():
            counts[split] = counts.get(split, 0) + int(n)
    views = sorted({parse_ref(r)[0] for r in features})
    feature_versions = {v: store.resolve_view(v).version for v in views}
    # the time range from the same pass: Dataset.min/max are two more global aggregations,
    # ~10 s each on a loaded 2-core machine even for a few hundred rows
    lows = [int(p["tmin"]) for p in partials if p["tmin"] is not None and not _is_nan(p["tmin"])]
    highs = [int(p["tmax"]) for p in partials if p["tmax"] is not None and not _is_nan(p["tmax"])]
    ts_stats = (_naive_utc(min(lows)) if lows else None, _naive_utc(max(highs)) if highs else None)
    version = store.datasets.publish(
        f"{PREFIX}/{name}",
        tagged,
        metadata={},
    )
    snapshot = TrainingSetSnapshot(
        name=name,
        version=version.version,
        uri=store.storage.uri(f"{PREFIX}/{name}"),
        rows=version.rows,
        content_hash=f"{digest:016x}",
        label=label,
        timestamp_column=timestamp_column,
        features=list(features),
        feature_versions=feature_versions,
        splits={
            s: {"start": b[0].isoformat(), "end": b[1].isoformat(), "rows": counts.get(s, 0)} for s, b in splits.items()
        },
        time_range={"min": str(ts_stats[0]), "max": str(ts_stats[1])},
        metadata=metadata or {},
        quality=quality,
    )
    store.storage.write_json(f"{PREFIX}/{name}/_snapshots/{version.version:012d}.json", snapshot.to_json())
    return snapshot


def get_training_set(store: FeatureStore, name: str, version: int | None = None) -> TrainingSetSnapshot:
    """The snapshot record of ``training_sets/NAME`` (latest version by default)."""
    manifest = store.datasets.get(f"{PREFIX}/{name}", version)
    data = store.storage.read_json(f"{PREFIX}/{name}/_snapshots/{manifest.version:012d}.json")
    return TrainingSetSnapshot(**data)


def load_training_set(
    store: FeatureStore, name: str, *, version: int | None = None, split: str | None = None
) -> ray.data.Dataset:
    """The rows of a snapshot (optionally one split) as a ``ray.data.Dataset``."""
    store.ray()
    ds = store.datasets.read(f"{PREFIX}/{name}", version)
    if split is not None:
        ds = ds.filter(expr=f"{SPLIT_COLUMN} == '{split}'")
    return ds


def _validate(store: FeatureStore, ds: ray.data.Dataset, features: list[str]) -> dict[str, Any]:
    """Validate the training rows of every view with expectations (one pass over the
    materialized rows per view); ``{view: report summary}``. Raises QualityError under strict."""
    from mlplatform.features.definitions import FeatureView

    gate = store.quality_gate()
    if gate is None:
        return {}
    columns = ds.schema().names
    out = {}
    for name in sorted({parse_ref(r)[0] for r in features}):
        view = store.resolve_view(name)
        plan = gate.plan(view, columns) if isinstance(view, FeatureView) else None
        if plan is None or not plan.spec.columns:
            continue
        report = gate.check(plan, gate.profile(ds, plan), stage="training_set", start=None, end=None)
        out[name] = report.summary()
    return out


def _naive_utc(micros: int) -> datetime:
    """A UTC instant as the naive datetime ``Dataset.min`` gives for a timestamp column (the
    form ``time_range`` has always recorded)."""
    from datetime import timedelta

    return datetime(1970, 1, 1) + timedelta(microseconds=micros)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _row_hash_batch(batch: Any, timestamp_column: str) -> Any:
    import pandas as pd

    columns = sorted(batch.columns)
    hashed = pd.util.hash_pandas_object(batch[columns], index=False).to_numpy().astype("uint64")
    # Python ints: an order-independent sum that cannot overflow.
    total = int((hashed % _MOD).astype(object).sum()) % _MOD if len(hashed) else 0
    counts = batch[SPLIT_COLUMN].value_counts().to_dict()
    ts = pd.to_datetime(batch[timestamp_column], utc=True).dropna()
    to_us = pd.Timedelta(microseconds=1)
    low = (ts.min() - pd.Timestamp(0, tz="UTC")) // to_us if len(ts) else None
    high = (ts.max() - pd.Timestamp(0, tz="UTC")) // to_us if len(ts) else None
    return pd.DataFrame({"h": [str(total)], "counts": [counts], "tmin": [low], "tmax": [high]}, dtype=object)
