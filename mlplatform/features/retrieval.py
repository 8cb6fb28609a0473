"""Training sets: point-in-time-correct feature retrieval over the offline store.

    ds = platform.features.get_historical_features(applications, "underwriting_v1",
                                                   entity_timestamp="application_ts")
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, NotFoundError
from mlplatform.features.definitions import FeatureService, FeatureView, OnDemandFeatureView, RequestSource
from mlplatform.features.planner import FeaturePlan, plan_features
from mlplatform.timestamps import CREATED_TIMESTAMP, EVENT_TIMESTAMP

if TYPE_CHECKING:
    import ray.data

    from mlplatform.features.store import FeatureStore



def get_historical_features(
    store: FeatureStore,
    entity_df: Any,
    features: FeatureService | str | Iterable[str],
    *,
    entity_timestamp: str = EVENT_TIMESTAMP,
    full_feature_names: bool = False,
    as_known_at: bool = False,
    include_event_timestamps: bool = False,
) -> ray.data.Dataset:
    """Join features to entity rows exactly as they were knowable at each row's timestamp.

    Args:
        entity_df: the rows to enrich: a pandas DataFrame, a pyarrow Table, a ``ray.data.Dataset``
            or a Parquet path/URI (``s3://`` paths use the platform's S3 settings). It needs the
            join keys of every requested view, ``entity_timestamp``, and the request fields of
            any on-demand view.
        features: a ``FeatureService``, its name, or ``"view:feature"`` references.
        entity_timestamp: the entity column holding each row's point in time.
        full_feature_names: name output columns ``view__feature`` instead of ``feature``.
        as_known_at: also ignore feature rows created after the entity timestamp — what the
            platform actually knew then (replaying past decisions).
        include_event_timestamps: add ``view__event_timestamp`` per view: when the chosen value
            was observed (null when none was usable).

    Returns:
        A lazy ``ray.data.Dataset``; row order is not preserved.

    Semantics:
        - Every entity row appears exactly once with all its own columns unchanged; extra
          columns pass through; duplicate entity rows each appear. No row is dropped: a row
          with no usable feature row gets nulls.
        - For each view the value comes from the feature row with the same join keys and the
          greatest event timestamp ``<=`` the entity timestamp and ``>=`` entity timestamp
          minus the view's ttl (both bounds inclusive; no ttl = unbounded). Ties on event
          timestamp go to the greatest created timestamp, then to a deterministic order of the
          feature values (see ``mlplatform.features._asof``).
        - Timestamps are UTC: naive values are taken as UTC; aware values in any zone are
          converted; one column may mix them.
        - On-demand features are computed from the joined values with the same function that
          serving runs.
        - A real-time view (on a ``StreamSource``) is valued at the row's own timestamp from
          the events real and known then (always as known at), exactly as serving computes
          it: see :mod:`mlplatform.features.realtime`.

    Raises:
        DefinitionError: a reference is malformed or names an unknown view or feature.
        DataError: the entity data lacks a needed column, or a view has no (current) offline data.
    """
    from mlplatform.timestamps import to_utc
    from mlplatform.features.pit_join import ViewJoin, point_in_time_join

    refs = store.resolve_features(features)
    plan = plan_features(store, refs)
    ray = store.ray()
    entities = _entity_dataset(store, entity_df, ray)
    _check_entity_columns(entities, plan, entity_timestamp)

    def normalise(batch: Any) -> Any:
        index = batch.schema.get_field_index(entity_timestamp)
        return batch.set_column(index, entity_timestamp, to_utc(batch.column(entity_timestamp)))

    entities = entities.map_batches(normalise, batch_format="pyarrow", zero_copy_batch=True)

    batch_views = [(v, names) for v, names in plan.views.values() if not v.is_realtime]
    realtime_views = [(v, names) for v, names in plan.views.values() if v.is_realtime]
    joined = entities
    if batch_views:
        joins = [
            ViewJoin(
                name=view.name,
                join_keys=view.join_keys,
                features=_offline(store, view, names),
                event_ts=EVENT_TIMESTAMP,
                created_ts=CREATED_TIMESTAMP,
                feature_columns=tuple(names),
                ttl=view.ttl,
            )
            for view, names in batch_views
        ]
        joined = point_in_time_join(
            entities,
            joins,
            entity_ts=entity_timestamp,
            as_known_at=as_known_at,
            full_feature_names=full_feature_names,
            include_event_timestamps=include_event_timestamps,
        )
    if realtime_views:
        from mlplatform.features.realtime_join import realtime_join

        joined = realtime_join(
            joined,
            realtime_views,
            store.storage,
            entity_ts=entity_timestamp,
            full_feature_names=full_feature_names,
            include_event_timestamps=include_event_timestamps,
        )
    if plan.on_demand:
        joined = joined.map_batches(
            _OnDemand(list(plan.on_demand.values()), full_feature_names), batch_format="pandas", zero_copy_batch=False
        )
    hidden = [
        _out(v.name, f, full_feature_names)
        for v, names in plan.views.values()
        for f in names
        if f"{v.name}:{f}" not in refs
    ]
    if hidden:
        joined = joined.drop_columns(hidden)
    return joined


def _out(view: str, feature: str, full: bool) -> str:
    return f"{view}__{feature}" if full else feature


class _OnDemand:
    """Applies on-demand views to joined batches (the same ``transform`` serving calls)."""

    def __init__(self, odfvs: list[tuple[OnDemandFeatureView, list[str]]], full: bool) -> None:
        self.odfvs = odfvs
        self.full = full

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        for odfv, wanted in self.odfvs:
            inputs = pd.DataFrame(index=batch.index)
            for source in odfv.sources:
                fields = source.schema_ if isinstance(source, RequestSource) else source.features
                for f in fields:
                    column = f.name if isinstance(source, RequestSource) else _out(source.name, f.name, self.full)
                    inputs[f.name] = batch[column]
            result = odfv.transform(inputs)
            for name in wanted:
                batch[_out(odfv.name, name, self.full)] = result[name].to_numpy()
        return batch


def _entity_dataset(store: FeatureStore, entity_df: Any, ray: Any) -> ray.data.Dataset:
    import pandas as pd
    import pyarrow as pa

    if isinstance(entity_df, ray.data.Dataset):
        return entity_df
    if isinstance(entity_df, pd.DataFrame):
        return ray.data.from_arrow(_arrow_from_pandas(entity_df))
    if isinstance(entity_df, pa.Table):
        return ray.data.from_arrow(entity_df)
    if isinstance(entity_df, (str, os.PathLike)):
        path = str(entity_df)
        storage = store.storage
        if path.startswith("s3://"):
            if not storage.is_s3:
                raise DataError(f"entity path {path!r} is on S3 but the storage root is local; configure storage.s3")
            return ray.data.read_parquet(path.removeprefix("s3://"), filesystem=storage.arrow_fs)
        if not os.path.exists(path):
            raise DataError(f"entity Parquet path {path!r} does not exist")
        return ray.data.read_parquet(os.path.abspath(path))
    raise DataError(
        f"entity_df must be a pandas DataFrame, pyarrow Table, ray.data.Dataset or Parquet path, got {type(entity_df).__name__}"
    )


def _arrow_from_pandas(frame: Any) -> Any:
    """pandas → Arrow, normalising object timestamp columns that mix naive and aware values."""
    import pyarrow as pa

    from mlplatform.timestamps import to_utc

    columns = {}
    for name in frame.columns:
        series = frame[name]
        if series.dtype == object and len(series) and all(
            hasattr(v, "tzinfo") or v is None or v != v for v in series.head(100)
        ):
            columns[name] = to_utc(series)
        else:
            columns[name] = pa.array(series, from_pandas=True) if series.dtype != object else pa.array(series.tolist())
    return pa.table(columns)


def _check_entity_columns(entities: ray.data.Dataset, plan: FeaturePlan, entity_timestamp: str) -> None:
    names = set(entities.schema().names)
    required = {entity_timestamp: "the entity timestamp (entity_timestamp=...)"}
    for column, why in plan.entity_columns().items():
        required.setdefault(column, why)
    missing = {col: why for col, why in required.items() if col not in names}
    if missing:
        listed = "; ".join(f"{col!r} ({why})" for col, why in missing.items())
        raise DataError(f"entity data is missing {listed}; it has {sorted(names)}")


def _offline(store: FeatureStore, view: FeatureView, names: list[str]) -> ray.data.Dataset:
    from mlplatform.features.store import offline_dataset

    datasets = store.datasets
    name = offline_dataset(view.name)
    try:
        manifest = datasets.get(name)
    except NotFoundError:
        raise DataError(f"feature view {view.name!r} has no offline data; run backfill for it first") from None
    stored = manifest.metadata.get("data_version")
    if stored is not None and stored != view.data_version:
        raise DataError(
            f"offline data of view {view.name!r} was computed from definition {stored}, but the registered "
            f"definition is {view.data_version}; backfill the view again"
        )
    columns = [*view.join_keys, EVENT_TIMESTAMP, CREATED_TIMESTAMP, *names]
    return datasets.read(name, columns=columns)
