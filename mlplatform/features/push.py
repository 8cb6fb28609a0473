"""Push: fresh feature rows straight into the online store and the offline store.

    platform.features.push("applicant_history", pd.DataFrame({
        "applicant_id": [42], "event_timestamp": [datetime.now(UTC)], "loans_30d": [2.0], ...}))

The rows are checked against the view, stamped ``created_timestamp`` = the time of the push,
appended to the offline dataset (in the ``date`` partition of each row's event) and upserted
online, so training sets built later see exactly the values serving used, known from the
moment serving could have used them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from mlplatform.errors import DataError, NotFoundError
from mlplatform.features.definitions import FeatureView
from mlplatform.features.values import check_values
from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from mlplatform.features.store import FeatureStore

__all__ = ["PushMode", "check_event_times", "push"]

PushMode = Literal["online", "offline", "online_and_offline"]


def push(
    store: FeatureStore,
    view: str | FeatureView,
    rows: pd.DataFrame | pa.Table | Iterable[Mapping[str, Any]],
    *,
    to: PushMode = "online_and_offline",
) -> int:
    """Write ``rows`` of ``view`` to the online store, the offline store, or both (the default).

        platform.features.push("applicant_history", [{"applicant_id": 42, "event_timestamp": now, ...}])

    Rows need exactly the view's join keys, ``event_timestamp`` (naive = UTC) and every
    feature; values must fit the declared types (``mlplatform.features.values``: ints in the
    int64 range for int64 — a float column of whole numbers and NaN, as pandas makes of ints
    with a gap, is accepted —, finite numbers for float64, str, bool, timestamps; features may
    be null, keys and times may not). Event times must lie between ``features.min_event_time``
    and the server clock plus ``features.max_future_skew`` (5 minutes by default): a row from
    the far future would otherwise win every later write of its key. Nothing of a refused
    push is written.
    ``created_timestamp`` is set to the time of the push, for every row.

    Online, each key takes its pushed row only if it is at least as new as the stored one
    (event time, then created time), immediately visible, atomic per key. Offline, the rows
    are appended as a new version of ``offline/<view>`` in their ``date`` partitions. Offline
    goes first: if it fails nothing is online; if the online write fails after it, pushing
    again is safe online but appends the rows offline a second time (identical values; the
    later created time wins ties in training sets).

    Returns:
        The number of rows pushed.

    Raises:
        DataError: a column is missing, unknown or of the wrong type (the message names it).
        NotFoundError: the view is not registered.
        OnlineStoreUnavailable: the online store failed.
    """
    if to not in ("online", "offline", "online_and_offline"):
        raise DataError(f"push: to must be 'online', 'offline' or 'online_and_offline', got {to!r}")
    view = store.get_feature_view(view if isinstance(view, str) else view.name)
    table = _validate(view, rows, _offline_schema(store, view))
    if table.num_rows == 0:
        return 0
    bounds = store.config
    check_event_times(
        view.name, table.column(EVENT_TIMESTAMP), now=datetime.now(UTC), max_future=bounds.max_future_skew, floor=bounds.min_event_time
    )
    if to != "online":
        _append_offline(store, view, table)
    if to != "offline":
        store.online_store.upsert(view, table)
    return table.num_rows


def _offline_schema(store: FeatureStore, view: FeatureView) -> pa.Schema | None:
    """The schema of the view's offline files, so pushed files read together with them."""
    import pyarrow.parquet as pq

    from mlplatform.features.store import offline_dataset

    datasets = store.datasets
    try:
        manifest = datasets.get(offline_dataset(view.name))
    except NotFoundError:
        return None
    paths = datasets.file_paths(manifest)
    if not paths:
        return None
    return pq.read_schema(paths[0], filesystem=store.storage.arrow_fs)


def _append_offline(store: FeatureStore, view: FeatureView, table: pa.Table) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from mlplatform.features._backfill_rows import PARTITION
    from mlplatform.features.store import offline_dataset

    datasets = store.datasets
    name = offline_dataset(view.name)
    try:  # keep what the backfill recorded (data_version guards training sets against stale data)
        metadata = dict(datasets.get(name).metadata)
    except NotFoundError:
        metadata = {"view": view.name, "data_version": view.data_version}
    day = pc.cast(pc.cast(table.column(EVENT_TIMESTAMP), pa.date32()), pa.string())
    datasets.publish(name, table.append_column(PARTITION, day), partition_by=PARTITION, replace="append", metadata=metadata)


def _validate(view: FeatureView, rows: Any, existing: pa.Schema | None) -> pa.Table:
    import pandas as pd
    import pyarrow as pa

    from mlplatform.timestamps import UTC_MICROS

    if isinstance(rows, pa.Table):
        frame = rows.to_pandas()
    elif isinstance(rows, pd.DataFrame):
        frame = rows
    else:
        rows = list(rows)
        if rows and not all(isinstance(r, Mapping) for r in rows):
            raise DataError("push: rows must be a pandas DataFrame, a pyarrow Table or a list of dicts")
        frame = pd.DataFrame(rows)
    key_types = {k: e.value_type for e in view.entities for k in e.join_keys}
    dtypes = {f.name: f.dtype for f in view.features}
    wanted = [*view.join_keys, EVENT_TIMESTAMP, *dtypes]
    if len(frame) == 0 and len(frame.columns) == 0:
        frame = pd.DataFrame({c: [] for c in wanted})
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(f"push to view {view.name!r}: missing column(s) {missing}; the view needs {wanted}")
    unknown = [c for c in frame.columns if c not in wanted]
    if unknown:
        hint = " (created_timestamp is set by push to the time of the push)" if CREATED_TIMESTAMP in unknown else ""
        raise DataError(f"push to view {view.name!r}: unknown column(s) {unknown}{hint}; the view has {wanted}")

    columns: dict[str, pa.Array] = {}
    for key in view.join_keys:
        columns[key] = _typed(view, key, frame[key], key_types[key], nullable=False)
    columns[EVENT_TIMESTAMP] = _typed(view, EVENT_TIMESTAMP, frame[EVENT_TIMESTAMP], "timestamp", nullable=False)
    now = datetime.now(UTC)
    columns[CREATED_TIMESTAMP] = pa.array([now] * len(frame), UTC_MICROS)
    for name, dtype in dtypes.items():
        columns[name] = _typed(view, name, frame[name], dtype, nullable=True)
    table = pa.table(columns)
    if existing is not None:  # match the stored files' types (e.g. an int32 key column)
        fields = [existing.field(c) if c in existing.names else table.schema.field(c) for c in table.column_names]
        try:
            table = table.cast(pa.schema(fields))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"push to view {view.name!r}: rows do not fit the offline data's schema: {exc}") from None
    return table


def _typed(view: FeatureView, column: str, series: Any, dtype: str, *, nullable: bool) -> pa.Array:
    """``series`` as an Arrow array of ``dtype``, or a DataError naming the column and a bad value
    (``mlplatform.features.values.check_values``: int64 range, finite floats, years 1-9999)."""
    import pyarrow as pa

    from mlplatform.timestamps import UTC_MICROS

    values = check_values(column, series.tolist(), dtype, where=f"push to view {view.name!r}: column", nullable=nullable)
    arrow_type = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_(), "timestamp": UTC_MICROS}
    if dtype not in arrow_type:
        raise DataError(f"push to view {view.name!r}: column {column!r}: unsupported dtype {dtype!r}")
    return pa.array(values, arrow_type[dtype])


def check_event_times(view_name: str, times: pa.Array, *, now: datetime, max_future: timedelta, floor: datetime) -> None:
    """Refuse event times after ``now + max_future`` or before ``floor``: a row stamped in the
    far future would win every later write of its key (the newer row wins) and read as
    NOT_FOUND until then; one before the floor is a unit or parsing mistake.

    Raises:
        DataError: naming the view, the first offending time and the bound.
    """
    import pyarrow.compute as pc

    if len(times) == 0:
        return
    latest, earliest = pc.max(times).as_py(), pc.min(times).as_py()
    if latest is not None and latest > now + max_future:
        raise DataError(
            f"push to view {view_name!r}: event_timestamp {latest.isoformat()} is in the future "
            f"(more than {max_future} after the server clock, {now.isoformat()}); send rows as they happen "
            "(features.max_future_skew bounds clock skew)"
        )
    if earliest is not None and earliest < floor:
        raise DataError(
            f"push to view {view_name!r}: event_timestamp {earliest.isoformat()} is before features.min_event_time "
            f"({floor.isoformat()}); check the timestamp's unit and time zone"
        )
