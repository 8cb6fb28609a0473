"""Point-in-time join of an entity dataset with feature views, distributed over Ray.

Ray Data's joins are equality-only, so the as-of join is built as a hash shuffle from Ray core
tasks: every block of both sides is cut into N buckets by a hash of the join keys (one task
per block, ``num_returns=N``), then one task per bucket runs the single-partition kernel
(:func:`mlplatform.features._asof.asof_join`) on its entity rows and feature rows. A worker
holds one bucket, never the dataset, and the driver only handles object references.

This module holds the public operator: validating the inputs against their schemas, planning
each view's columns and output names, and driving the shuffles. The Ray tasks themselves (the
partitioning, the bucket hash, the per-bucket join) are in :mod:`mlplatform.features._hash_shuffle`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mlplatform.errors import DataError
from mlplatform.features._hash_shuffle import Block, BucketSpec, Prepare, dataset_blocks, remote_tasks, shuffle
from mlplatform.timestamps import UTC_MICROS

if TYPE_CHECKING:
    import ray.data

__all__ = ["ViewJoin", "point_in_time_join"]

# A bucket of about this many bytes (both sides together) is comfortable for one worker: the
# kernel's temporaries are a few int64 arrays the length of the bucket.
TARGET_BUCKET_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ViewJoin:
    """One feature view's part in a point-in-time join.

    Args:
        name: the view's name; prefixes output columns when ``full_feature_names`` is set.
        join_keys: key columns, named the same in the entity and the feature dataset.
        features: the view's feature rows.
        event_ts: the feature rows' event timestamp column.
        created_ts: the feature rows' created (ingestion) timestamp column, or None.
        feature_columns: feature columns to bring over.
        ttl: how old an event may be relative to the entity timestamp; None = any age.
    """

    name: str
    join_keys: tuple[str, ...]
    features: ray.data.Dataset
    event_ts: str
    created_ts: str | None
    feature_columns: tuple[str, ...]
    ttl: timedelta | None


def point_in_time_join(
    entities: ray.data.Dataset,
    views: Sequence[ViewJoin],
    *,
    entity_ts: str,
    as_known_at: bool = False,
    full_feature_names: bool = False,
    include_event_timestamps: bool = False,
    num_partitions: int | None = None,
) -> ray.data.Dataset:
    """Build a training set: each entity row with each view's feature values as of its time.

        >>> training = point_in_time_join(
        ...     ray.data.read_parquet("applications/"),
        ...     [ViewJoin("applicant_stats", ("applicant_id",), stats_ds, "event_ts", "created_ts",
        ...               ("n_loans", "late_ratio"), timedelta(days=90))],
        ...     entity_ts="applied_at", as_known_at=True)

    Semantics, exactly (the kernel, :func:`~mlplatform.features._asof.asof_join`, states them
    in full):

    * Every entity row appears exactly once with its own columns unchanged; duplicates each
      appear; rows with no usable feature row get nulls. The entity timestamp column comes
      back as ``timestamp[us, tz=UTC]`` (naive input is read as UTC, aware input converted).
    * For each view, the value is taken from the feature row with equal join keys (null keys
      never match) and the greatest event timestamp with ``t - ttl <= event <= t`` (both
      inclusive; ``ttl=None`` is unbounded). Event ties go to the greatest created timestamp,
      then to the greatest feature values compared column by column (null < NaN < numbers),
      so the result is independent of row order and partitioning.
    * ``as_known_at=True`` also ignores feature rows created after ``t``. A view without a
      created column uses its event time as created time.
    * Output columns are named ``feature`` or, with ``full_feature_names``, ``view__feature``;
      ``include_event_timestamps`` adds ``view__event_timestamp``, the matched row's event time.
    * Output row order is not the input order (rows come back grouped by hash bucket).

    How it runs: one hash shuffle per distinct set of join keys (views sharing keys share a
    shuffle; different keys, e.g. applicant then merchant, are chained). It runs eagerly: when
    this returns, the result is computed and held in the object store, not on the driver.
    All inputs are read concurrently. With ``num_partitions`` given, blocks are partitioned
    while they are read; without it the inputs are read first so their size can pick N (about one bucket per
    ``TARGET_BUCKET_BYTES``, at least one per cluster CPU). One very frequent key lands in one
    bucket: memory per worker is bounded by the largest bucket.

    Args:
        entities: entity rows: every view's join keys, ``entity_ts`` and any other columns.
        views: the feature views to join, in output column order.
        entity_ts: the entity timestamp column.
        as_known_at: ignore feature rows whose created time is after the entity time.
        full_feature_names: name outputs ``view__feature`` instead of ``feature``.
        include_event_timestamps: add ``view__event_timestamp`` per view.
        num_partitions: hash buckets per shuffle; default from data size and cluster CPUs.

    Returns:
        A materialized ``ray.data.Dataset`` of the entity rows with the feature columns.

    Raises:
        DataError: a column is missing (the message lists the available ones), two outputs
            would share a name or collide with an entity column, key types disagree, or a
            ttl is negative.
    """
    import ray

    if not views:
        raise DataError("point_in_time_join needs at least one feature view; got none")
    if num_partitions is not None and num_partitions < 1:
        raise DataError(f"num_partitions must be at least 1, got {num_partitions}")
    plans, empty_entities = _plan_views(entities, views, entity_ts, full_feature_names, include_event_timestamps)

    remote_tasks()  # define the remote functions once, before threads use them
    join = _Join(entities, plans, entity_ts=entity_ts, as_known_at=as_known_at, empty_entities=empty_entities)
    if num_partitions is not None:
        current = _join_partitioning_while_reading(join, num_partitions)
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        current = _join_sized_after_reading(join, cpus)
    assert current is not None
    return ray.data.from_arrow_refs(current)


# ---------------------------------------------------------------------------------------------
# Running the shuffles: two strategies, one per way of choosing N. Both drop each ref as soon
# as the tasks that need it are submitted, so Ray can free every input block once it has been
# partitioned, and every bucket once joined.


def _join_partitioning_while_reading(join: _Join, n: int) -> list[Any] | None:
    """Join into ``n`` buckets per shuffle, partitioning every block as soon as it has been read.

    Each view's shuffle starts with its read; the entity rows are shuffled with the first
    group's and, for each later group, the previous group's joined buckets are shuffled again.

    Returns:
        The refs of the last group's joined buckets (None only without groups).
    """
    with join.reader_pool() as pool:
        first_keys = join.keys_of[join.plans[0].view.name]
        entity_first = pool.submit(shuffle, dataset_blocks(join.entities), first_keys, n, join.entity_prepare)
        feature_parts = {
            p.view.name: pool.submit(shuffle, join.feature_input(p), join.keys_of[p.view.name], n, join.feature_prepare(p))
            for p in join.plans
        }

        current: list[Any] | None = None  # entity rows as object refs, after the previous shuffle
        for group in join.groups:
            keys = join.keys_of[group[0].view.name]
            if current is None:
                entity_parts = entity_first.result()
                del entity_first
            else:
                entity_parts = shuffle((Block(ref, None, 0) for ref in current), keys, n, join.entity_prepare)
            feature_sides = [feature_parts.pop(p.view.name).result() for p in group]
            parts = [entity_parts, *feature_sides]
            del entity_parts, feature_sides
            current = join.join_buckets(group, parts, n)
            del parts
    return current


def _join_sized_after_reading(join: _Join, cpus: int) -> list[Any] | None:
    """Read every input first, then join each group into N buckets sized from the data.

    N is about one bucket per ``TARGET_BUCKET_BYTES`` of the group's entity and feature
    blocks, and at least ``cpus``. Later groups shuffle the previous group's joined buckets,
    whose size is taken to be that of the entity input.

    Returns:
        The refs of the last group's joined buckets (None only without groups).
    """
    with join.reader_pool() as pool:
        # Sizing N needs the sizes: read the inputs first (into the object store, not here).
        entity_read = pool.submit(list, dataset_blocks(join.entities))
        feature_read = {p.view.name: pool.submit(list, join.feature_input(p)) for p in join.plans}

        current: list[Any] | None = None  # entity rows as object refs, after the previous shuffle
        entity_bytes = 0
        for group in join.groups:
            keys = join.keys_of[group[0].view.name]
            feature_blocks = [feature_read.pop(p.view.name).result() for p in group]
            if current is None:
                source = entity_read.result()
                del entity_read
                entity_bytes = sum(b.size_bytes for b in source)
            else:
                source = [Block(ref, None, 0) for ref in current]
            total = entity_bytes + sum(b.size_bytes for blocks in feature_blocks for b in blocks)
            n = max(cpus, math.ceil(total / TARGET_BUCKET_BYTES))
            entity_parts = shuffle(source, keys, n, join.entity_prepare)
            feature_sides = [shuffle(b, keys, n, join.feature_prepare(p)) for p, b in zip(group, feature_blocks)]
            del source, feature_blocks
            parts = [entity_parts, *feature_sides]
            del entity_parts, feature_sides
            current = join.join_buckets(group, parts, n)
            del parts
    return current


class _Join:
    """One join's inputs and the steps both strategies share: the groups of views that share a
    shuffle, what each input reads and how its blocks are prepared, and the per-bucket joins."""

    def __init__(
        self,
        entities: ray.data.Dataset,
        plans: list[_ViewPlan],
        *,
        entity_ts: str,
        as_known_at: bool,
        empty_entities: pa.Table,
    ) -> None:
        self.entities = entities
        self.plans = plans
        self.groups = list(_group_by_keys(plans))
        self.keys_of = {p.view.name: tuple(g[0].view.join_keys) for g in self.groups for p in g}
        self.entity_ts = entity_ts
        self.as_known_at = as_known_at
        self.empty_entities = empty_entities
        self.entity_prepare = Prepare(entity_ts=entity_ts)

    def reader_pool(self) -> ThreadPoolExecutor:
        """A thread per input (every view and the entities), to read them all at once."""
        # Every input is read at the same time, each by its own Ray Data execution driven from its
        # own thread: a read is mostly waiting, and reading one after another adds up the latency.
        return ThreadPoolExecutor(max_workers=len(self.plans) + 1, thread_name_prefix="pit-join-read")

    def feature_input(self, p: _ViewPlan) -> Iterator[Block]:
        """The blocks of view ``p``'s feature rows, only the columns the join reads."""
        return dataset_blocks(p.view.features.select_columns(p.read_columns))

    def feature_prepare(self, p: _ViewPlan) -> Prepare:
        """How the partition tasks prepare view ``p``'s feature blocks."""
        return Prepare(event_ts=p.view.event_ts, created_ts=p.view.created_ts, join_keys=self.keys_of[p.view.name])

    def join_buckets(self, group: list[_ViewPlan], parts: list[list[list[Any]]], n: int) -> list[Any]:
        """Submit one join task per bucket; returns their refs, the entity rows with ``group``'s features.

        ``parts`` holds the shuffled entity side, then each view's of ``group``, each as
        refs indexed ``[bucket][task]``.
        """
        spec = BucketSpec(
            entity_ts=self.entity_ts,
            as_known_at=self.as_known_at,
            views=tuple(p.kernel_args for p in group),
            part_counts=tuple(len(side[0]) for side in parts),
            empty_entities=self.empty_entities,
            empty_features=tuple(p.empty_features for p in group),
        )
        join_bucket = remote_tasks().join_bucket
        return [join_bucket.remote(spec, *[ref for side in parts for ref in side[bucket]]) for bucket in range(n)]


# ---------------------------------------------------------------------------------------------
# Planning: validate everything against the schemas before any work starts.


@dataclass(frozen=True)
class _ViewPlan:
    view: ViewJoin
    read_columns: list[str]
    kernel_args: dict[str, Any]
    empty_features: pa.Table


def _plan_views(
    entities: ray.data.Dataset,
    views: Sequence[ViewJoin],
    entity_ts: str,
    full_feature_names: bool,
    include_event_timestamps: bool,
) -> tuple[list[_ViewPlan], pa.Table]:
    """Check every name and type, and work out each view's columns and output names."""
    entity_schema = _arrow_schema(entities.schema(), "entity dataset")
    _require(entity_schema, [entity_ts], "entity dataset")
    # An entity dataset without blocks still yields a (typed, empty) result.
    empty_entities = entity_schema.empty_table()
    empty_entities = empty_entities.set_column(
        entity_schema.get_field_index(entity_ts), entity_ts, pa.array([], UTC_MICROS)
    )
    produced: dict[str, str] = {}
    plans = []
    for view in views:
        _require(entity_schema, view.join_keys, "entity dataset", f" (join key of view {view.name!r})")
        if view.ttl is not None and view.ttl < timedelta(0):
            raise DataError(f"view {view.name!r}: ttl must not be negative, got {view.ttl!r}")
        read = list(
            dict.fromkeys(
                [*view.join_keys, view.event_ts, *([view.created_ts] if view.created_ts else []), *view.feature_columns]
            )
        )
        feature_schema = _arrow_schema(view.features.schema(), f"feature dataset of view {view.name!r}")
        _require(feature_schema, read, f"feature dataset of view {view.name!r}")
        for key in view.join_keys:
            _check_key_types(key, entity_schema.field(key).type, feature_schema.field(key).type, view.name)
        outputs = [f"{view.name}__{c}" if full_feature_names else c for c in view.feature_columns]
        event_output = f"{view.name}__event_timestamp" if include_event_timestamps else None
        for name in [*outputs, *([event_output] if event_output else [])]:
            if name in entity_schema.names:
                raise DataError(
                    f"view {view.name!r} would output column {name!r}, which the entity dataset already has; "
                    "rename the entity column or use full_feature_names=True"
                )
            if name in produced:
                raise DataError(
                    f"views {produced[name]!r} and {view.name!r} would both output column {name!r}; "
                    "use full_feature_names=True"
                )
            produced[name] = view.name
        kernel_args = dict(
            join_keys=list(view.join_keys),
            event_ts=view.event_ts,
            created_ts=view.created_ts,
            feature_columns=list(view.feature_columns),
            ttl=view.ttl,
            output_names=outputs,
            event_ts_output=event_output,
        )
        empty = pa.schema([feature_schema.field(c) for c in read]).empty_table()
        plans.append(_ViewPlan(view, read, kernel_args, empty))
    return plans, empty_entities


def _group_by_keys(plans: list[_ViewPlan]) -> Iterator[list[_ViewPlan]]:
    """Views sharing join keys share one shuffle; groups keep first-appearance order."""
    groups: dict[tuple[str, ...], list[_ViewPlan]] = {}
    for plan in plans:
        groups.setdefault(tuple(plan.view.join_keys), []).append(plan)
    yield from groups.values()


def _arrow_schema(schema: Any, what: str) -> pa.Schema:
    if schema is None:
        raise DataError(f"the {what} has no schema (is it empty?); cannot join it")
    fields = []
    for name, typ in zip(schema.names, schema.types):
        fields.append(pa.field(name, typ if isinstance(typ, pa.DataType) else pa.null()))
    return pa.schema(fields)


def _require(schema: pa.Schema, columns: Sequence[str], what: str, role: str = "") -> None:
    for column in columns:
        if column not in schema.names:
            raise DataError(f"column {column!r}{role} is not in the {what}; available columns: {schema.names}")


def _check_key_types(key: str, left: pa.DataType, right: pa.DataType, view: str) -> None:
    def kind(t: pa.DataType) -> str:
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_integer(t):
            return "integer"
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return "string"
        return "other" if not pa.types.is_null(t) else "unknown"

    lk, rk = kind(left), kind(right)
    if "other" in (lk, rk):
        raise DataError(f"join key {key!r} of view {view!r} must be integer or string, got {left} / {right}")
    if "unknown" not in (lk, rk) and lk != rk:
        raise DataError(
            f"join key {key!r} is {left} in the entity dataset but {right} in view {view!r}; "
            "cast one side so both are integers or both are strings"
        )
