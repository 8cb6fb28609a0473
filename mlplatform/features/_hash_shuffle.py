"""The hash shuffle under :func:`mlplatform.features.pit_join.point_in_time_join`, as Ray core tasks.

Every block of both sides is cut into N buckets by a hash of the join keys (one partition
task per batch of blocks, ``num_returns=N``), then one task per bucket runs the
single-partition kernel (:func:`mlplatform.features._asof.asof_join`) on its entity rows and
feature rows. This module holds those tasks and the driver-side helper that submits the
partition tasks; which inputs are shuffled on which keys, and into how many buckets, is
decided in :mod:`mlplatform.features.pit_join`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.features._asof import asof_join
from mlplatform.timestamps import to_utc

if TYPE_CHECKING:
    import ray.data

__all__ = ["PARTITION_BATCH_BYTES", "Block", "BucketSpec", "Prepare", "dataset_blocks", "remote_tasks", "shuffle"]

# Blocks are partitioned in batches of about this many bytes per task.
PARTITION_BATCH_BYTES = 64 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# The shuffle.


@dataclass(frozen=True)
class Block:
    """One input block: its object ref, the row range of it to use (None = all), its size."""

    ref: Any
    block_slice: tuple[int, int] | None
    size_bytes: int


def dataset_blocks(ds: ray.data.Dataset) -> Iterator[Block]:
    """Execute ``ds`` and yield its blocks as they are produced (refs only; no data here)."""
    for bundle in ds.iter_internal_ref_bundles():
        for entry, block_slice in zip(bundle.blocks, bundle.slices):
            size = entry.metadata.size_bytes or 0
            if block_slice is None:
                yield Block(entry.ref, None, size)
            else:
                rows = entry.metadata.num_rows or max(block_slice.num_rows, 1)
                yield Block(entry.ref, (block_slice.start_offset, block_slice.end_offset),
                             size * block_slice.num_rows // max(rows, 1))


@dataclass(frozen=True)
class Prepare:
    """What a partition task does to a block before cutting it into buckets."""

    entity_ts: str | None = None  # entity side: normalise this column to UTC
    event_ts: str | None = None  # feature side: normalise, drop rows that can never match
    created_ts: str | None = None
    join_keys: tuple[str, ...] = ()


def shuffle(blocks, keys: tuple[str, ...], n: int, prepare: Prepare) -> list[list[Any]]:
    """Submit partition tasks over the blocks; returns refs indexed [bucket][task].

    Small blocks are batched, up to ``PARTITION_BATCH_BYTES`` per task: every Ray task and
    object costs a few milliseconds of CPU across driver, raylet and worker, which adds up
    with readers that produce hundreds of small blocks.
    """
    partition = remote_tasks().partition.options(num_returns=n)
    by_bucket: list[list[Any]] = [[] for _ in range(n)]
    batch: list[Block] = []

    def submit() -> None:
        refs = partition.remote(keys, n, prepare, [b.block_slice for b in batch], *[b.ref for b in batch])
        for bucket, ref in enumerate([refs] if n == 1 else refs):
            by_bucket[bucket].append(ref)
        batch.clear()

    batch_bytes = 0
    for block in blocks:
        batch.append(block)
        # Unknown sizes (0) count as full, so a big block never waits for company.
        batch_bytes += block.size_bytes or PARTITION_BATCH_BYTES
        if batch_bytes >= PARTITION_BATCH_BYTES:
            submit()
            batch_bytes = 0
    if batch:
        submit()
    return by_bucket


def _partition_blocks(keys: tuple[str, ...], n: int, prepare: Prepare,
                      slices: list[tuple[int, int] | None], *blocks: Any) -> Any:
    tables = []
    for block, block_slice in zip(blocks, slices):
        table = _as_arrow(block, prepare.entity_ts)
        if block_slice is not None:
            table = table.slice(block_slice[0], block_slice[1] - block_slice[0])
        tables.append(_prepare(table, prepare))
    table = _concat(tables)
    if n == 1:
        return table
    bucket = _bucket_ids(table, keys, n)
    order = np.argsort(bucket, kind="stable")
    ends = np.cumsum(np.bincount(bucket, minlength=n))
    grouped = table.take(order)
    starts = np.concatenate([[0], ends[:-1]])
    return tuple(grouped.slice(int(s), int(e - s)) for s, e in zip(starts, ends))


def _as_arrow(block: Any, ts_column: str | None) -> pa.Table:
    if isinstance(block, pa.Table):
        return block
    if isinstance(block, pd.DataFrame):
        frame = block
        if ts_column is not None and ts_column in frame.columns:
            # Convert the timestamp by to_utc's rules (naive = UTC, any zone, ISO strings), not
            # by whatever Arrow would infer from an object column.
            at = list(frame.columns).index(ts_column)
            table = pa.Table.from_pandas(frame.drop(columns=[ts_column]), preserve_index=False)
            return table.add_column(at, ts_column, to_utc(frame[ts_column]))
        return pa.Table.from_pandas(frame, preserve_index=False)
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow()


def _prepare(table: pa.Table, prepare: Prepare) -> pa.Table:
    def normalise(t: pa.Table, column: str) -> pa.Table:
        at = t.schema.get_field_index(column)
        return t.set_column(at, column, to_utc(t.column(column)))

    if prepare.entity_ts is not None:
        return normalise(table, prepare.entity_ts)
    table = normalise(table, prepare.event_ts)
    if prepare.created_ts is not None:
        table = normalise(table, prepare.created_ts)
    # Rows with a null key or event time can never match: don't ship them.
    needed = [prepare.event_ts, *prepare.join_keys]
    if any(table.column(c).null_count for c in needed):
        mask = functools.reduce(pc.and_, [pc.is_valid(table.column(c)) for c in needed])
        table = table.filter(mask)
    return table


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads nearby ids over all buckets."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _bucket_ids(table: pa.Table, keys: tuple[str, ...], n: int) -> np.ndarray:
    """Bucket of each row by a hash of its keys, equal on both sides for equal key values.

    Integers of any width hash by their int64 value and strings by their UTF-8 text, so an
    int32 key meets an int64 key and a string meets a large_string. Nulls hash as 0 (the rows
    must land somewhere; they never match).
    """
    h = np.zeros(table.num_rows, dtype=np.uint64)
    for key in keys:
        column = table.column(key)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if pa.types.is_integer(column.type):
            values = pc.fill_null(column.cast(pa.int64()), 0).to_numpy().view(np.uint64)
        else:
            encoded = column.cast(pa.large_string()).dictionary_encode()
            if encoded.num_chunks == 0:
                continue
            words = encoded.chunk(0).dictionary.to_numpy(zero_copy_only=False).astype(object)
            hashed = pd.util.hash_array(words) if words.size else np.zeros(0, np.uint64)
            indices = pa.chunked_array([c.indices for c in encoded.chunks], encoded.type.index_type)
            valid = indices.is_valid().to_numpy()
            values = np.zeros(table.num_rows, dtype=np.uint64)
            values[valid] = hashed[pc.drop_null(indices).to_numpy()]
        h = _mix(h * _GOLDEN + values)
    # Small ints: numpy's stable argsort is a radix sort for 16-bit values.
    return (h % np.uint64(n)).astype(np.int16 if n <= np.iinfo(np.int16).max else np.int64)


# ---------------------------------------------------------------------------------------------
# The per-bucket join.


@dataclass(frozen=True)
class BucketSpec:
    entity_ts: str
    as_known_at: bool
    views: tuple[dict[str, Any], ...]
    part_counts: tuple[int, ...]  # entity parts, then each view's parts
    empty_entities: pa.Table
    empty_features: tuple[pa.Table, ...]


def _join_bucket(spec: BucketSpec, *parts: pa.Table) -> pa.Table:
    sides: list[list[pa.Table]] = []
    at = 0
    for count in spec.part_counts:
        sides.append(list(parts[at : at + count]))
        at += count
    entities = _concat(sides[0]) if sides[0] else spec.empty_entities
    for args, tables, empty in zip(spec.views, sides[1:], spec.empty_features):
        features = _concat(tables) if tables else empty
        entities = asof_join(entities, features, entity_ts=spec.entity_ts, as_known_at=spec.as_known_at, **args)
    return entities


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    # Blocks of one dataset may disagree on nullability or an all-null column's type.
    return pa.concat_tables(tables, promote_options="permissive")


@functools.cache
def remote_tasks():
    import ray

    class Tasks:
        partition = ray.remote(_partition_blocks)
        join_bucket = ray.remote(_join_bucket)

    return Tasks
