"""Materialization: load the latest offline row per entity into the online store, with Ray Data.

    platform.features.materialize("2024-01-01", "2024-07-01")          # rebuild, atomically per view
    platform.features.materialize_incremental(datetime.now(UTC))       # continue from the last end

How it runs, per view, as one Ray Data pipeline: read the view's offline dataset (only the
``date`` partitions that can hold events in the window), keep rows with
``start < event_timestamp <= end``, reduce each block to its latest row per key and tag each
row with a hash bucket of its key (``map_batches``), group by bucket (``groupby(…).map_groups``,
a sort-based shuffle run as plain tasks: a worker holds about one bucket, never the dataset;
buckets are sized from the row count, ``TARGET_BUCKET_ROWS``), reduce each bucket to the
latest row per key and write it from that worker, which opens its own store connection. A
window that fits one bucket is one task with no shuffle. The driver only sees row counts.

A full run writes into a new generation and publishes it once every write has succeeded; any
failure aborts it, and a killed run leaves the previous generation readable (the next run
supersedes the orphan). An incremental run upserts into the current generation instead: each
key switches to its newer row atomically as its batch lands, so during the run some keys are
already at the new ``end`` and others not yet — every key always shows a complete row that was
true at its event time, and nothing is ever older than before the run. We chose this over
copying the whole current generation into a new one on every run (the point of incremental
runs is to cost as much as the new data, not the whole store); a killed incremental run
leaves its state file unchanged, so the next run re-applies the same window (newer-row-wins
writes make that harmless).

What was materialized is recorded per view in ``online/state/<view>.json`` under the storage
root (start, end, generation, rows, the offline dataset version and the view's data version).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal

from mlplatform.errors import DataError, NotFoundError
from mlplatform.features.definitions import FeatureView
from mlplatform.online.base import CREATED_TIMESTAMP, EVENT_TIMESTAMP, OnlineStore, encode_rows

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.features.store import FeatureStore
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["MaterializeResult", "materialize", "materialize_incremental", "read_state"]

STATE_PREFIX = "online/state"
#: Rows a worker hands to the store per write call (one SQLite transaction per 5,000 of them,
#: one Redis pipeline per 1,000): bounds the memory of encoded rows, not correctness.
WRITE_BATCH_ROWS = 20_000
#: About this many offline rows per hash bucket, the unit of parallel work: a worker reduces
#: and writes one bucket at a time. A window with no more rows than this runs as one task,
#: with no shuffle (small views, and most incremental runs).
TARGET_BUCKET_ROWS = 200_000


@dataclass(frozen=True)
class MaterializeResult:
    """What one view's materialization did. ``mode``: ``full`` (a new generation, published) or
    ``incremental`` (upserts into the current one). ``rows``: entity keys written (in a
    single-bucket run whose read came back in several blocks, a key in two of them counts twice)."""

    view: str
    mode: Literal["full", "incremental"]
    start: datetime | None
    end: datetime
    generation: str | None
    rows: int
    offline_version: int
    seconds: float

    def summary(self) -> str:
        window = f"({self.start.isoformat() if self.start else '-inf'}, {self.end.isoformat()}]"
        target = f"generation {self.generation}" if self.mode == "full" else f"current generation {self.generation}"
        return (
            f"materialized {self.view} ({self.mode}): {self.rows:,} keys from offline v{self.offline_version} "
            f"events in {window} into {target} in {self.seconds:.1f}s"
        )


def materialize(
    store: FeatureStore,
    start: Any,
    end: Any,
    views: Iterable[str | FeatureView] | None = None,
    *,
    echo: Callable[[str], Any] = print,
    batch_rows: int = WRITE_BATCH_ROWS,
    bucket_rows: int = TARGET_BUCKET_ROWS,
) -> list[MaterializeResult]:
    """Rebuild each view's online state from its offline rows with ``start < event_timestamp <= end``.

        platform.features.materialize("2024-01-01", "2024-07-01", ["applicant_history"])

    Per view, the new state is exactly the latest row per entity key among those rows: the
    greatest ``event_timestamp``, ties to the greatest ``created_timestamp`` (an exact tie on
    both goes to an arbitrary one of the tied rows). Keys with no row in the window are not in
    the new state (use ``start=None`` for "from the beginning"). Rows are chosen by event time
    only: a row created after ``end`` still counts. Readers switch from the previous complete
    state to the new one in one step when the view is done; views are switched one by one.

    Args:
        start: exclusive lower bound (datetime, date or ISO string; naive = UTC), or None.
        end: inclusive upper bound.
        views: names or views; default every registered feature view with offline data.
        echo: where progress lines go.
        batch_rows: rows per store write call from a worker.
        bucket_rows: offline rows per hash bucket (see ``TARGET_BUCKET_ROWS``).

    Returns:
        One ``MaterializeResult`` per view, in order.

    Raises:
        DataError: ``start >= end``, or a named view has no (current) offline data.
        NotFoundError: a named view is not registered.
        OnlineStoreUnavailable / StorageError: the online store failed; the view's previous
            state is untouched.
    """
    start_at = None if start is None else _instant(start, "start")
    end_at = _instant(end, "end")
    if start_at is not None and start_at >= end_at:
        raise DataError(f"materialize needs start < end, got start={start_at.isoformat()} end={end_at.isoformat()}")
    results = []
    for view, manifest in _plan(store, views, echo):
        results.append(_run(store, view, manifest, start_at, end_at, "full", echo, batch_rows, bucket_rows))
    return results


def materialize_incremental(
    store: FeatureStore,
    end: Any,
    views: Iterable[str | FeatureView] | None = None,
    *,
    echo: Callable[[str], Any] = print,
    batch_rows: int = WRITE_BATCH_ROWS,
    bucket_rows: int = TARGET_BUCKET_ROWS,
) -> list[MaterializeResult]:
    """Bring each view's online state up to ``end``, continuing from where the last run ended.

        platform.features.materialize_incremental(datetime.now(UTC))

    Upserts the latest row per key among offline rows with ``last_end < event_timestamp <= end``
    into the current state (a key keeps its stored row if that one is newer). Keys switch one
    by one as their batch lands; see the module doc for why. A view is rebuilt in full from
    the beginning of its data instead when it was never materialized, when the online store no
    longer holds the generation the state file names (wiped, or another store configured), or
    when the view's definition changed. An ``end`` at or before the last end does nothing.

    Offline rows with event times at or before the last end that a backfill rewrites later are
    not picked up: run ``materialize`` over that range for them.

    Returns / Raises: as ``materialize``.
    """
    end_at = _instant(end, "end")
    online = store.online_store
    results = []
    for view, manifest in _plan(store, views, echo):
        state = read_state(store, view.name)
        reason = None
        if state is None:
            reason = "never materialized"
        elif state.get("data_version") != view.data_version:
            reason = "its definition changed"
        elif state.get("generation") != online.current_generation(view):
            reason = "the online store does not hold the recorded generation"
        if reason is not None:
            echo(f"{view.name}: {reason}; materializing from the beginning of its data")
            results.append(_run(store, view, manifest, None, end_at, "full", echo, batch_rows, bucket_rows))
            continue
        last_end = datetime.fromisoformat(state["end"])
        if end_at <= last_end:
            echo(f"{view.name}: already materialized up to {last_end.isoformat()}; nothing to do")
            continue
        results.append(_run(store, view, manifest, last_end, end_at, "incremental", echo, batch_rows, bucket_rows))
    return results


def read_state(store: FeatureStore, view: str) -> dict[str, Any] | None:
    """The state file of ``view`` (what was last materialized), or None."""
    try:
        return store.platform.storage.read_json(f"{STATE_PREFIX}/{view}.json")
    except NotFoundError:
        return None


# ---------------------------------------------------------------------------- planning


def _instant(value: Any, what: str) -> datetime:
    import pandas as pd

    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a datetime, date or ISO string, got {value!r}") from None
    if stamp is pd.NaT:
        raise DataError(f"{what} must be a datetime, date or ISO string, got {value!r}")
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.floor("us").to_pydatetime()


def _plan(
    store: FeatureStore, views: Iterable[str | FeatureView] | None, echo: Callable[[str], Any]
) -> list[tuple[FeatureView, DatasetVersion]]:
    from mlplatform.features.store import offline_dataset

    if views is None:
        chosen, named = store.list_feature_views(), False
    else:
        chosen, named = [], True
        for v in [views] if isinstance(views, (str, FeatureView)) else views:
            view = store.get_feature_view(v if isinstance(v, str) else v.name)
            chosen.append(view)
    planned = []
    for view in chosen:
        try:
            manifest = store.platform.datasets.get(offline_dataset(view.name))
        except NotFoundError:
            if named:
                raise DataError(f"feature view {view.name!r} has no offline data; run backfill for it first") from None
            echo(f"{view.name}: no offline data yet (run backfill); skipped")
            continue
        stored = manifest.metadata.get("data_version")
        if stored is not None and stored != view.data_version:
            raise DataError(
                f"offline data of view {view.name!r} was computed from definition {stored}, but the registered "
                f"definition is {view.data_version}; backfill the view again before materializing"
            )
        planned.append((view, manifest))
    return planned


def _partitions(manifest: DatasetVersion, start: datetime | None, end: datetime) -> set[str | None]:
    """Date partitions that can hold events in ``(start, end]`` (the partition is the event's
    UTC date); files outside any partition, or with an unexpected name, are always read."""
    wanted: set[str | None] = set()
    for f in manifest.files:
        if f.partition is None:
            wanted.add(None)
            continue
        try:
            day = date.fromisoformat(f.partition)
        except ValueError:
            wanted.add(f.partition)
            continue
        if (start is None or day >= start.date()) and day <= end.date():
            wanted.add(f.partition)
    return wanted


# ------------------------------------------------------------------------------ running


def _run(
    store: FeatureStore,
    view: FeatureView,
    manifest: DatasetVersion,
    start: datetime | None,
    end: datetime,
    mode: Literal["full", "incremental"],
    echo: Callable[[str], Any],
    batch_rows: int,
    bucket_rows: int,
) -> MaterializeResult:
    from mlplatform.features.store import offline_dataset

    began = time.perf_counter()
    online = store.online_store
    partitions = _partitions(manifest, start, end)
    offline_rows = sum(f.rows for f in manifest.files if f.partition in partitions)
    columns = [*view.join_keys, EVENT_TIMESTAMP, CREATED_TIMESTAMP, *(f.name for f in view.features)]
    generation = online.begin(view) if mode == "full" else None
    try:
        if offline_rows == 0:
            rows = 0
        else:
            ray = store.platform.ray()
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            buckets = 1 if offline_rows <= bucket_rows else max(cpus, math.ceil(offline_rows / bucket_rows))
            # One read block per bucket: the sort-based groupby below makes as many partitions
            # as it gets blocks, which bounds a worker's share to about one bucket.
            ds = store.platform.datasets.read(
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
            rows = int(sum(batch["rows"].sum() for batch in ds.iter_batches(batch_format="numpy", batch_size=None)))
        if generation is not None:
            online.publish(view, generation)
    except BaseException:
        if generation is not None:
            try:
                online.abort(view, generation)
            except Exception:  # the store may be what failed; the next begin supersedes it anyway
                pass
        raise
    if generation is None:
        generation = online.current_generation(view)
    result = MaterializeResult(
        view=view.name,
        mode=mode,
        start=start,
        end=end,
        generation=generation,
        rows=rows,
        offline_version=manifest.version,
        seconds=time.perf_counter() - began,
    )
    covered_from = start.isoformat() if start else None
    if mode == "incremental":  # extends the window the state already covered
        covered_from = (read_state(store, view.name) or {}).get("start")
    store.platform.storage.write_json(
        f"{STATE_PREFIX}/{view.name}.json",
        {
            "view": view.name,
            "mode": mode,
            "start": covered_from,
            "end": end.isoformat(),
            "generation": generation,
            "rows": rows,
            "offline_dataset": offline_dataset(view.name),
            "offline_version": manifest.version,
            "data_version": view.data_version,
            "materialized_at": datetime.now(UTC).isoformat(),
        },
    )
    echo(result.summary())
    return result


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

    from mlplatform.features._asof import UTC_MICROS, to_utc

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

