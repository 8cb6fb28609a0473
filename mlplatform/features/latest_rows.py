"""The Ray Data pipeline under materialization: the latest offline row per key, written to the store.

    rows = write_latest_rows(store, online, view, manifest, partitions, offline_rows,
                             start, end, generation, batch_rows=..., bucket_rows=...)

``mlplatform.features.materialize`` plans a run, opens and publishes the generation and records
the state; this module does the work that grows with the data. Per view, as one Ray Data
pipeline: read the view's offline dataset (only the ``date`` partitions that can hold events in
the window), keep rows with ``start < event_timestamp <= end``, reduce each block to its latest
row per key and tag each row with a hash bucket of its key (``map_batches``), group by bucket
(``groupby(…).map_groups``, a sort-based shuffle run as plain tasks: a worker holds about one
bucket, never the dataset; buckets are sized from the row count, ``TARGET_BUCKET_ROWS``), reduce
each bucket to the latest row per key and write it from that worker, which opens its own store
connection. A window that fits one bucket is one task with no shuffle. The driver only sees
row counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from mlplatform.features.definitions import FeatureView
from mlplatform.online.base import OnlineStore, encode_rows
from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.features.store import FeatureStore
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["TARGET_BUCKET_ROWS", "WRITE_BATCH_ROWS", "latest_per_key", "write_latest_rows"]

#: Rows a worker hands to the store per write call (one SQLite transaction per 5,000 of them,
#: one Redis pipeline per 1,000): bounds the memory of encoded rows, not correctness.
WRITE_BATCH_ROWS = 20_000
#: About this many offline rows per hash bucket, the unit of parallel work: a worker reduces
#: and writes one bucket at a time. A window with no more rows than this runs as one task,
#: with no shuffle (small views, and most incremental runs).
TARGET_BUCKET_ROWS = 200_000


def write_latest_rows(
    store: FeatureStore,
    online: OnlineStore,
    view: FeatureView,
    manifest: DatasetVersion,
    partitions: set[str | None],
    offline_rows: int,
    start: datetime | None,
    end: datetime,
    generation: str | None,
    *,
    batch_rows: int,
    bucket_rows: int,
) -> int:
    """Write the latest row per key among the view's offline rows with ``start < event_timestamp <= end``.

    Reads ``partitions`` of offline version ``manifest``; ``offline_rows`` (their row count)
    sizes the buckets. Writes into ``generation``, or upserts into the current state when it is
    None. Returns the number of keys written (see ``MaterializeResult.rows``). Publishing or
    aborting the generation is the caller's.
    """
    from mlplatform.features.store import offline_dataset

    columns = [*view.join_keys, EVENT_TIMESTAMP, CREATED_TIMESTAMP, *(f.name for f in view.features)]
    ray = store.ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    buckets = 1 if offline_rows <= bucket_rows else max(cpus, math.ceil(offline_rows / bucket_rows))
    # One read block per bucket: the sort-based groupby below makes as many partitions
    # as it gets blocks, which bounds a worker's share to about one bucket.
    ds = store.datasets.read(
        offline_dataset(view.name),
        manifest.version,
        columns=columns,
        partitions=partitions,
        override_num_blocks=buckets,
    )
    bounds = _Bounds(tuple(view.join_keys), start, end, buckets)
    spec = _Write(online, view, generation, tuple(view.join_keys), batch_rows)
    ds = ds.map_batches(_reduce_block, fn_args=(bounds,), batch_format="pyarrow", batch_size=None)
    if buckets == 1:
        # Small: the whole window is one bucket, reduced and written by one task. (Should
        # the read still yield several blocks, their rows meet in the store, where the
        # newer row per key wins: correct, only a few more writes.)
        ds = ds.map_batches(_write_bucket, fn_args=(spec,), batch_format="pyarrow", batch_size=None)
    else:
        # ds.context is this pipeline's own copy of the DataContext. Sort-based shuffles
        # run as plain tasks on the workers Ray already has; the default hash shuffle
        # starts aggregator actors for every shuffle, seconds of fixed cost per run.
        from ray.data.context import ShuffleStrategy

        ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        ds = ds.groupby(_BUCKET).map_groups(_write_bucket, fn_args=(spec,), batch_format="pyarrow")
    return int(sum(batch["rows"].sum() for batch in ds.iter_batches(batch_format="numpy", batch_size=None)))


_BUCKET = "__mlp_bucket"


@dataclass(frozen=True)
class _Bounds:
    join_keys: tuple[str, ...]
    start: datetime | None
    end: datetime
    buckets: int


def _reduce_block(block: pa.Table, bounds: _Bounds) -> pa.Table:
    """Rows in the window, reduced to the latest per key (shrinks what the shuffle moves),
    tagged with their key's hash bucket."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from mlplatform.timestamps import UTC_MICROS, to_utc

    if block.num_rows == 0:
        return block.append_column(_BUCKET, pa.array([], pa.int64()))
    event = to_utc(block.column(EVENT_TIMESTAMP))
    block = block.set_column(block.schema.get_field_index(EVENT_TIMESTAMP), EVENT_TIMESTAMP, event)
    created = pc.coalesce(to_utc(block.column(CREATED_TIMESTAMP)), event)
    block = block.set_column(block.schema.get_field_index(CREATED_TIMESTAMP), CREATED_TIMESTAMP, created)
    keep = pc.less_equal(event, pa.scalar(bounds.end, UTC_MICROS))
    if bounds.start is not None:
        keep = pc.and_(keep, pc.greater(event, pa.scalar(bounds.start, UTC_MICROS)))
    for key in bounds.join_keys:  # a null key can never be looked up
        keep = pc.and_(keep, pc.is_valid(block.column(key)))
    latest = latest_per_key(block.filter(pc.fill_null(keep, False)), bounds.join_keys)
    # Equal keys hash equal in every block (ints by value, strings by text), so all rows of a
    # key meet in one bucket.
    hashed = pd.util.hash_pandas_object(latest.select(list(bounds.join_keys)).to_pandas(), index=False).to_numpy()
    return latest.append_column(_BUCKET, pa.array((hashed % np.uint64(bounds.buckets)).astype(np.int64)))


def latest_per_key(table: pa.Table, join_keys: Sequence[str]) -> pa.Table:
    """The row with the greatest ``(event_timestamp, created_timestamp)`` per key.

        >>> latest_per_key(rows, ["applicant_id"])   # one row per applicant_id
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows <= 1:
        return table
    order = pc.sort_indices(
        table,
        sort_keys=[(k, "ascending") for k in join_keys]
        + [(EVENT_TIMESTAMP, "descending"), (CREATED_TIMESTAMP, "descending")],
    )
    table = table.take(order)
    first = None
    for key in join_keys:
        column = table.column(key).combine_chunks()
        changed = pc.not_equal(column.slice(1), column.slice(0, len(column) - 1))
        first = changed if first is None else pc.or_(first, changed)
    mask = pa.concat_arrays([pa.array([True]), first])  # type: ignore[list-item]
    return table.filter(mask)


@dataclass(frozen=True)
class _Write:
    """What a worker needs to write its bucket: the store travels as its config (picklable)."""

    store: OnlineStore
    view: FeatureView
    generation: str | None  # None: upsert into the current state (incremental)
    join_keys: tuple[str, ...]
    batch_rows: int


def _write_bucket(bucket: pa.Table, spec: _Write) -> pa.Table:
    """Runs in a worker: the latest row per key of one hash bucket, written to the online store
    over the worker's own connection. Returns the number of keys written."""
    import pyarrow as pa

    latest = latest_per_key(bucket.drop_columns([_BUCKET]), spec.join_keys)
    try:
        for at in range(0, latest.num_rows, spec.batch_rows):
            encoded = encode_rows(spec.view, latest.slice(at, spec.batch_rows))
            if spec.generation is None:
                spec.store.upsert_encoded(spec.view, encoded)
            else:
                spec.store.write_encoded(spec.view, spec.generation, encoded)
    finally:
        spec.store.close()
    return pa.table({"rows": pa.array([latest.num_rows], pa.int64())})

