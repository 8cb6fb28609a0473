"""Feature backfills: compute a view's offline rows for a time range with Ray Data.

    result = platform.features.backfill("applicant_history", "2024-01-01", "2024-07-01")
    result.rows_out, result.version        # rows computed, the offline DatasetVersion written

The pipeline, one Ray Data job: read the view's source dataset (columns and time range
pushed down to the Parquet scan) → normalise timestamps to UTC and hash each event's join
keys into a bucket → ``groupby(bucket).map_groups``: the vectorised kernel
(:func:`mlplatform.features._windows.window_aggregate`) runs on one bucket of whole
entities at a time → sort the rows by date, so each date's rows land in one or two files →
publish as the view's offline dataset, replacing exactly the dates of the range, in one
atomic commit. Memory per worker is bounded by a partition of about one bucket (roughly
500k events), never the dataset.

This module runs that job: it resolves the view and the range, reads the source, and sorts
and publishes the rows (keeping the rows of partly covered dates that lie outside the range).
What the range's rows are, and the Ray Data tasks that compute them, are in
:mod:`mlplatform.features._backfill_rows`.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError, DefinitionError, NotFoundError
from mlplatform.features._backfill_rows import PARTITION, Plan, compute_rows
from mlplatform.features.definitions import FeatureView
from mlplatform.timestamps import EVENT_TIMESTAMP, UTC_MICROS, parse_instant, to_utc

if TYPE_CHECKING:
    import ray.data

    from mlplatform.features.store import FeatureStore
    from mlplatform.storage import DatasetVersion

__all__ = ["BackfillResult", "backfill"]

log = logging.getLogger(__name__)

# Events per bucket. The kernel's temporaries are a few dozen arrays the length of the
# bucket's events and candidates; 500k events of a 14-feature view stay well under 1 GiB.
_EVENTS_PER_BUCKET = 500_000


@dataclass(frozen=True)
class BackfillResult:
    """What one backfill did.

    ``rows_in``: source events read in the range the computation needed; ``rows_out``: rows
    computed for ``(start, end]``; ``partitions``: dates rewritten; ``seconds``: wall time;
    ``kernel_seconds``: CPU time spent in the window kernel, summed over tasks (the rest of
    ``seconds`` x CPUs went to reading, shuffling and writing, or to other work on the
    machine); ``version``: the offline dataset version that holds the rows.
    """

    view: str
    start: datetime
    end: datetime
    rows_in: int
    rows_out: int
    partitions: int
    seconds: float
    kernel_seconds: float
    version: DatasetVersion = field(repr=False)

    @property
    def events_per_second(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"backfilled {self.view} ({self.start:%Y-%m-%d %H:%M}, {self.end:%Y-%m-%d %H:%M}] UTC: "
            f"{self.rows_in:,} events in, {self.rows_out:,} rows out, {self.partitions} partitions, "
            f"{self.seconds:.1f}s ({self.events_per_second:,.0f} events/s) -> {self.version.name} v{self.version.version}"
        )


def backfill(
    store: FeatureStore,
    view: str | FeatureView,
    start: Any,
    end: Any,
    *,
    buckets: int | None = None,
) -> BackfillResult:
    """Compute ``view``'s offline rows for ``(start, end]`` and publish them, replacing that range.

        >>> platform.features.backfill("applicant_history", "2024-01-01", "2024-07-01")
        backfilled applicant_history (2024-01-01 00:00, 2024-07-01 00:00] UTC: 9,912,408 events in, ...

    Semantics, exactly:

    * A view with ``aggregations``: rows at every cadence boundary ``T`` with
      ``start < T <= end`` (``T = epoch + k * cadence``, so UTC-midnight-aligned) at which
      some feature value of the entity changed since the previous boundary; the value at
      ``T`` covers events with event time in ``(T - window, T]`` whose created time is
      ``<= T``. ``created_timestamp`` is ``T + availability_delay``, never the wall clock.
      Events before ``start`` are read as far back as the longest window, so values (and
      the change test at the first boundary, which compares with the last boundary
      ``<= start``) are those of a backfill over all time: backfilling ``(a, b]`` and then
      ``(b, c]`` gives exactly the rows of ``(a, c]``. See
      :func:`~mlplatform.features._windows.window_aggregate` for nulls and empty windows.
    * A view with a ``schema`` (plain columns): the source rows with event time in
      ``(start, end]``, as join keys, ``event_timestamp``, ``created_timestamp`` (the
      source's created time, or the event time without one) and the feature columns cast to
      their declared dtypes. Rows with a null key or event time are skipped.
    * Writes the offline dataset ``offline/<view>`` partitioned by ``date`` (UTC date of
      ``event_timestamp``). The commit replaces every date partition the range touches and
      nothing else, so re-running a range replaces its rows instead of adding to them. A date
      only partly inside the range (a sub-daily cadence or range ends that are not midnight)
      keeps its rows outside the range from the version current when the backfill started
      (a backfill running at the same time on an overlapping date may lose that race).
      Readers see the previous version until the commit; an interrupted backfill changes
      nothing.
    * Timestamps of any unit or zone are read as UTC instants; ``start``/``end`` may be
      datetimes, dates or ISO strings, naive meaning UTC.

    Args:
        store: the feature store (its registry, datasets and Ray connection are used).
        view: a registered view's name, or the view itself (it must be the registered one).
        start, end: the range ``(start, end]``.
        buckets: hash buckets of entities (default: about one per 500k source events, at
            least two per CPU).

    Returns:
        A :class:`BackfillResult`; its ``summary()`` is the last line logged (INFO, on this
        module's logger, after a line saying what the backfill is about to read).

    Raises:
        NotFoundError: the view or its source dataset does not exist.
        DefinitionError: the view is an on-demand view, or differs from the registered one.
        DataError: bad ``start``/``end``, or a source column is missing or unusable.
        QualityError: the view's quality policy is ``strict`` and the range's rows failed
            an expectation; nothing was published (see :mod:`mlplatform.quality.api`).
    """
    began = time.perf_counter()
    view = _resolve(store, view)
    start_at, end_at = parse_instant(start, "backfill start"), parse_instant(end, "backfill end")
    if start_at >= end_at:
        raise DataError(f"backfill start {start_at.isoformat()} must be before end {end_at.isoformat()}")
    source = view.source
    if not store.datasets.exists(source.dataset):
        raise NotFoundError(
            f"source dataset {source.dataset!r} of view {view.name!r} does not exist under "
            f"{store.storage.root!r}; publish the events there first"
        )
    manifest = store.datasets.get(source.dataset)
    schema = _schema_of(manifest.schema)
    plan = Plan.make(view, schema, start_at, end_at)

    ray = store.ray()
    n_buckets = buckets or max(2 * _cpus(ray), math.ceil(manifest.rows / _EVENTS_PER_BUCKET))
    target = _offline_name(view)
    log.info(
        "backfilling %s (%s, %s] UTC from %s v%d (%s rows, events after %s) in %d buckets -> %s",
        view.name,
        f"{start_at:%Y-%m-%d %H:%M}",
        f"{end_at:%Y-%m-%d %H:%M}",
        source.dataset,
        manifest.version,
        f"{manifest.rows:,}",
        f"{plan.read_after:%Y-%m-%d %H:%M}",
        n_buckets,
        target,
    )
    counter = ray.remote(num_cpus=0)(_Counter).remote()

    # One read block per bucket: the sort-based groupby below makes as many partitions as
    # it gets blocks, so this is what bounds a worker's share to about one bucket.
    ds = store.datasets.read(
        source.dataset, manifest.version, columns=plan.read_columns, override_num_blocks=n_buckets
    )
    # ds.context is this pipeline's own copy of the DataContext (shared only with datasets
    # derived from this read). Sort-based shuffles run as plain tasks on the workers Ray
    # already has; the default hash shuffle starts a pool of aggregator actors for every
    # shuffle, seconds of fixed cost per backfill (minutes on a loaded 2-core machine).
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds = _push_down_time_range(ds, source.timestamp_field, schema, plan.read_after, plan.read_until)
    rows = compute_rows(ds, plan, buckets=n_buckets, counter=counter)
    gate = store.quality_gate()
    gate_plan = gate.plan(view) if gate is not None else None
    if gate_plan is not None:  # profiled in this pass, as the rows stream to the write
        rows, profiled = gate.observe(rows, gate_plan)
    # Every bucket holds every date: sort by time so that each date is one or two files rather
    # than one per bucket (an int64 key sorts faster than the date string, and range
    # partitioning never splits one timestamp, so a daily date is one file).
    rows = rows.sort(EVENT_TIMESTAMP)
    kept = _rows_kept_outside_range(store, target, view, plan)
    if kept is not None and kept.num_rows:
        rows = rows.union(ray.data.from_arrow(kept))

    def write(staging: str) -> None:
        rows.write_parquet(staging, filesystem=store.storage.arrow_fs, partition_cols=[PARTITION])
        if gate_plan is not None:  # strict and failed: raises before the commit, nothing published
            gate.check(gate_plan, profiled(), stage="backfill", start=start_at, end=end_at)

    version = store.datasets.publish(
        target,
        write,
        partition_by=PARTITION,
        replace="partitions",
        replace_partitions=plan.dates,
        metadata={
            "view": view.name,
            "view_version": view.version,
            "data_version": view.data_version,
            "start": start_at.isoformat(),
            "end": end_at.isoformat(),
        },
    )
    rows_in, rows_out, kernel_seconds = ray.get(counter.totals.remote())
    result = BackfillResult(
        view=view.name,
        start=start_at,
        end=end_at,
        rows_in=rows_in,
        rows_out=rows_out,
        partitions=len(plan.dates),
        seconds=time.perf_counter() - began,
        kernel_seconds=kernel_seconds,
        version=version,
    )
    log.info("%s", result.summary())
    return result


def _resolve(store: FeatureStore, view: str | FeatureView) -> FeatureView:
    if isinstance(view, FeatureView):
        registered = _registered(store, view.name)
        if registered.data_version != view.data_version:
            raise DefinitionError(
                f"feature view {view.name!r} differs from the registered one (data version "
                f"{view.data_version} vs {registered.data_version}); apply it before backfilling"
            )
        return registered
    if not isinstance(view, str):
        raise DefinitionError(f"backfill needs a feature view or its name, got {view!r}")
    return _registered(store, view)


def _registered(store: FeatureStore, name: str) -> FeatureView:
    found = store.resolve_view(name)
    if not isinstance(found, FeatureView):
        raise DefinitionError(
            f"{name!r} is an on-demand feature view: it is computed at request time and has no offline data to backfill"
        )
    return found


def _offline_name(view: FeatureView) -> str:
    from mlplatform.features.store import offline_dataset

    return offline_dataset(view.name)


def _schema_of(text: str) -> pa.Schema | None:
    if not text:
        return None
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _push_down_time_range(
    ds: ray.data.Dataset, column: str, schema: pa.Schema | None, after: datetime, until: datetime
) -> ray.data.Dataset:
    """Let the Parquet scan skip row groups outside the range (rows are filtered exactly later).

    The bounds must be scalars of the column's own type: Arrow compares timestamps only
    within one zone-awareness, and not across zones.
    """
    if schema is None or column not in schema.names or not pa.types.is_timestamp(schema.field(column).type):
        return ds
    from ray.data.expressions import col, lit

    typ = schema.field(column).type
    lo, hi = after, until
    if typ.tz is None:
        lo, hi = lo.replace(tzinfo=None), hi.replace(tzinfo=None)
    # Widen by a second: the scan's unit may truncate; the exact filter comes after.
    lo_s = pa.scalar(lo - timedelta(seconds=1), type=pa.timestamp("us", tz=typ.tz)).cast(typ)
    hi_s = pa.scalar(hi + timedelta(seconds=1), type=pa.timestamp("us", tz=typ.tz)).cast(typ)
    return ds.filter(expr=(col(column) > lit(lo_s)) & (col(column) <= lit(hi_s)))


# --------------------------------------------------------------------------------- counting
class _Counter:
    """Events in, rows out and kernel CPU seconds, added up across tasks (a tiny actor)."""

    def __init__(self) -> None:
        self.rows_in = 0
        self.rows_out = 0
        self.kernel_seconds = 0.0

    def add(self, rows_in: int = 0, rows_out: int = 0, kernel_seconds: float = 0.0) -> None:
        self.rows_in += rows_in
        self.rows_out += rows_out
        self.kernel_seconds += kernel_seconds

    def totals(self) -> tuple[int, int, float]:
        return self.rows_in, self.rows_out, self.kernel_seconds


# ------------------------------------------------------------------------- partial dates
def _rows_kept_outside_range(store: FeatureStore, name: str, view: FeatureView, plan: Plan) -> pa.Table | None:
    """Rows of the dates the range only partly covers that lie outside the range, from the
    current version: the commit replaces whole dates, and these must survive it.

    Files whose columns no longer fit the view (its definition changed since they were
    written) are not carried over.
    """
    if not plan.partial_dates or not store.datasets.exists(name):
        return None
    import pyarrow.parquet as pq

    current = store.datasets.get(name)
    start, end = pa.scalar(plan.start, UTC_MICROS), pa.scalar(plan.end, UTC_MICROS)
    columns = [c for c in plan.output.names if c != PARTITION]
    tables = []
    for partition in plan.partial_dates:
        for path in store.datasets.file_paths(current, [partition]):
            table = pq.read_table(path, filesystem=store.storage.arrow_fs)
            if not set(columns) <= set(table.column_names):
                continue
            ts = to_utc(table.column(EVENT_TIMESTAMP))
            table = table.filter(pc.or_(pc.less_equal(ts, start), pc.greater(ts, end)))
            if not table.num_rows:
                continue
            table = table.select(columns).append_column(PARTITION, pa.array([partition] * table.num_rows, pa.string()))
            try:
                tables.append(table.cast(plan.output))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    return pa.concat_tables(tables) if tables else None
