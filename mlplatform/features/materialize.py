"""Materialization: load the latest offline row per entity into the online store, with Ray Data.

    platform.features.materialize("2024-01-01", "2024-07-01")          # rebuild, atomically per view
    platform.features.materialize_incremental(datetime.now(UTC))       # continue from the last end

Each view runs as one Ray Data pipeline that reduces its offline rows in the window to the
latest row per key and writes them from the workers (``latest_rows``); this module plans the
runs, owns the generation each full run writes into and records what was materialized.

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
root (start, end, generation, rows, the offline dataset version and the view's data version),
and the same record per generation in ``online/state/<view>/generations/<generation>.json``,
so a rollback (``mlplatform.features.rollback``) can point the state back at the window the
restored generation holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal

from mlplatform.errors import DataError, NotFoundError
from mlplatform.features.definitions import FeatureView
from mlplatform.features.latest_rows import TARGET_BUCKET_ROWS, WRITE_BATCH_ROWS, write_latest_rows
from mlplatform.timestamps import parse_instant

if TYPE_CHECKING:
    from mlplatform.features.store import FeatureStore
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["MaterializeResult", "materialize", "materialize_incremental", "read_state"]

STATE_PREFIX = "online/state"

log = logging.getLogger(__name__)


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
        batch_rows: rows per store write call from a worker.
        bucket_rows: offline rows per hash bucket (see ``TARGET_BUCKET_ROWS``).

    Returns:
        One ``MaterializeResult`` per view, in order.

    Raises:
        DataError: ``start >= end``, or a named view has no (current) offline data.
        NotFoundError: a named view is not registered.
        QualityError: a strict view's rows in the window failed its expectations (checked
            before anything is written: its online state is untouched).
        OnlineStoreUnavailable / StorageError: the online store failed; the view's previous
            state is untouched.

    Each view's summary (``MaterializeResult.summary()``), and each view skipped for lack of
    offline data, is logged at INFO on this module's logger.
    """
    start_at = None if start is None else parse_instant(start, "materialize start")
    end_at = parse_instant(end, "materialize end")
    if start_at is not None and start_at >= end_at:
        raise DataError(f"materialize needs start < end, got start={start_at.isoformat()} end={end_at.isoformat()}")
    results = []
    for view, manifest in _plan(store, views):
        results.append(_run(store, view, manifest, start_at, end_at, "full", batch_rows, bucket_rows))
    return results


def materialize_incremental(
    store: FeatureStore,
    end: Any,
    views: Iterable[str | FeatureView] | None = None,
    *,
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
    end_at = parse_instant(end, "materialize end")
    online = store.online_store
    results = []
    for view, manifest in _plan(store, views):
        state = read_state(store, view.name)
        reason = None
        if state is None:
            reason = "never materialized"
        elif state.get("data_version") != view.data_version:
            reason = "its definition changed"
        elif state.get("generation") != online.current_generation(view):
            reason = "the online store does not hold the recorded generation"
        if reason is not None:
            log.info("%s: %s; materializing from the beginning of its data", view.name, reason)
            results.append(_run(store, view, manifest, None, end_at, "full", batch_rows, bucket_rows))
            continue
        last_end = datetime.fromisoformat(state["end"])
        if end_at <= last_end:
            log.info("%s: already materialized up to %s; nothing to do", view.name, last_end.isoformat())
            continue
        results.append(_run(store, view, manifest, last_end, end_at, "incremental", batch_rows, bucket_rows))
    return results


def read_state(store: FeatureStore, view: str) -> dict[str, Any] | None:
    """The state file of ``view`` (what was last materialized), or None."""
    try:
        return store.storage.read_json(f"{STATE_PREFIX}/{view}.json")
    except NotFoundError:
        return None


# ---------------------------------------------------------------------------- planning


def _plan(store: FeatureStore, views: Iterable[str | FeatureView] | None) -> list[tuple[FeatureView, DatasetVersion]]:
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
        if view.is_realtime:  # its online state comes from the stream (or realtime_load)
            if named:
                raise DataError(f"feature view {view.name!r} is real-time: processors keep it online; load its logged events with load_online_events")
            continue
        try:
            manifest = store.datasets.get(offline_dataset(view.name))
        except NotFoundError:
            if named:
                raise DataError(f"feature view {view.name!r} has no offline data; run backfill for it first") from None
            log.info("%s: no offline data yet (run backfill); skipped", view.name)
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
    batch_rows: int,
    bucket_rows: int,
) -> MaterializeResult:
    from mlplatform.features.store import offline_dataset

    began = time.perf_counter()
    online = store.online_store
    partitions = _partitions(manifest, start, end)
    offline_rows = sum(f.rows for f in manifest.files if f.partition in partitions)
    gate = store.quality_gate()
    gate_plan = gate.plan(view) if gate is not None and offline_rows else None
    if gate_plan is not None:  # before any write: an incremental run's upserts cannot be undone
        gate.check_offline(gate_plan, manifest, start, end, stage="materialize", partitions=partitions)
    generation = online.begin(view) if mode == "full" else None
    try:
        if offline_rows == 0:
            rows = 0
        else:
            rows = write_latest_rows(
                store,
                online,
                view,
                manifest,
                partitions,
                offline_rows,
                start,
                end,
                generation,
                batch_rows=batch_rows,
                bucket_rows=bucket_rows,
            )
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
    state = {
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
    }
    store.storage.write_json(f"{STATE_PREFIX}/{view.name}/generations/{generation}.json", state)
    store.storage.write_json(f"{STATE_PREFIX}/{view.name}.json", state)
    log.info("%s", result.summary())
    return result
