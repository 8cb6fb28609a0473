"""Online feature lookup with Feast's semantics and response shape.

    response = platform.features.get_online_features(
        "underwriting_v1", {"applicant_id": [1, 2], "merchant_id": [7, 7], "amount": [120.0, 80.0], "term": [4, 4]})
    response.to_dict()        # {"applicant_id": [1, 2], "loans_30d": [0.0, 3.0], ...}
    response.to_json_dict()   # {"metadata": {"feature_names": [...]}, "results": [{"values", "statuses", "event_timestamps"}]}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from mlplatform.errors import DataError, PlatformError
from mlplatform.features.definitions import FeatureService, FeatureView, OnDemandFeatureView, RequestSource, parse_ref
from mlplatform.features.planner import ViewResolver, plan_features
from mlplatform.features.realtime import read_online
from mlplatform.features.values import check_values
from mlplatform.online.base import FeatureStatus

if TYPE_CHECKING:
    import pandas as pd

    from mlplatform.online import OnlineStore

__all__ = ["FeatureResult", "OnlineFeatureSource", "OnlineMetadata", "OnlineResponse", "get_online_features"]

_EPOCH_JSON = "1970-01-01T00:00:00Z"


class OnlineFeatureSource(ViewResolver, Protocol):
    """What a lookup reads definitions and values from: the ``FeatureStore``, or serving's
    ``FeatureCatalog`` (the same answers from definitions resolved once)."""

    online_store: OnlineStore

    def resolve_features(self, features: FeatureService | str | Iterable[str]) -> list[str]: ...


@dataclass(frozen=True)
class OnlineMetadata:
    feature_names: list[str]


@dataclass(frozen=True)
class FeatureResult:
    """One output column: a value, status and event time per entity row (``None`` when the
    value is not a stored feature value: join keys, on-demand features, missing values)."""

    values: list[Any]
    statuses: list[FeatureStatus]
    event_timestamps: list[datetime | None]


@dataclass(frozen=True)
class OnlineResponse:
    """Features for a list of entity rows, column-wise: ``results[i]`` belongs to
    ``metadata.feature_names[i]``; join keys come first, then features in request order."""

    metadata: OnlineMetadata
    results: list[FeatureResult]

    def to_dict(self) -> dict[str, list[Any]]:
        """``{name: [value per entity row]}`` (Feast's ``OnlineResponse.to_dict``)."""
        return {name: list(r.values) for name, r in zip(self.metadata.feature_names, self.results)}

    def to_df(self) -> pd.DataFrame:
        """One row per entity row, one column per name."""
        import pandas as pd

        return pd.DataFrame(self.to_dict())

    def to_json_dict(self) -> dict[str, Any]:
        """The document Feast's Python feature server returns (ready for ``json.dumps``):
        statuses as strings, event times as ISO 8601 UTC with ``Z``, ``1970-01-01T00:00:00Z``
        where there is none, NaN as null."""
        return {
            "metadata": {"feature_names": list(self.metadata.feature_names)},
            "results": [
                {
                    "values": [_json_value(v) for v in r.values],
                    "statuses": [str(s) for s in r.statuses],
                    "event_timestamps": [_json_time(t) for t in r.event_timestamps],
                }
                for r in self.results
            ],
        }


def get_online_features(
    store: OnlineFeatureSource,
    features: FeatureService | str | Iterable[str],
    entities: Mapping[str, Sequence[Any]],
    *,
    full_feature_names: bool = False,
    now: datetime | None = None,
) -> OnlineResponse:
    """The current online values of ``features`` for each entity row.

        get_online_features(store, ["applicant_history:loans_30d"], {"applicant_id": [1, 2]})

    Args:
        features: a ``FeatureService``, its name, or ``"view:feature"`` references.
        entities: column-wise entity rows: every join key of the requested views, and the
            request fields of requested on-demand views (e.g. ``amount``), all lists of one length.
        full_feature_names: name outputs ``view__feature`` instead of ``feature``.
        now: the time the values are for (default: now; naive = UTC). A value is usable if
            ``now - ttl <= event_timestamp <= now``; an older one comes back null with status
            ``OUTSIDE_MAX_AGE``, an unknown key or a newer row null with ``NOT_FOUND``.

    Returns:
        An ``OnlineResponse``: the join keys of the requested views (in ``entities`` order,
        status PRESENT), then the features in request order. On-demand features are computed
        by the view's own ``transform`` — the function training sets use — from the request
        fields and the looked-up source features (null where those were not usable); their
        status is PRESENT and they have no event time.

    Raises:
        DefinitionError: a reference is malformed or unknown.
        DataError: a join key or request field is missing, the lists differ in length, or two
            outputs share a name (use ``full_feature_names=True``).
        OnlineStoreUnavailable: the online store did not answer in time.
    """
    refs = store.resolve_features(features)
    now = datetime.now(UTC) if now is None else (now if now.tzinfo else now.replace(tzinfo=UTC))
    rows = _row_count(entities)
    plan = plan_features(store, refs)
    views, odfvs = plan.views, plan.on_demand

    missing = {c: why for c, why in plan.entity_columns().items() if c not in entities}
    if missing:
        listed = "; ".join(f"{c!r} ({why})" for c, why in missing.items())
        raise DataError(f"entities lack {listed}; given {sorted(entities)}")
    entities = _checked_inputs(entities, views, odfvs)

    online = store.online_store
    looked_up: dict[str, list[dict[str, Any]]] = {}
    for view, names in views.values():
        keys = list(zip(*(entities[k] for k in view.join_keys)))
        if view.is_realtime:
            looked_up[view.name] = read_online(online, view, keys, names, now)  # type: ignore[arg-type]
        else:
            looked_up[view.name] = online.read(view, keys, names, now)

    names: list[str] = []
    results: list[FeatureResult] = []
    key_names = [k for k in entities if k in {k for v, _ in views.values() for k in v.join_keys}]
    for key in key_names:
        names.append(key)
        results.append(FeatureResult([_python(v) for v in entities[key]], [FeatureStatus.PRESENT] * rows, [None] * rows))
    computed = {name: _on_demand(odfv, wanted, entities, views, looked_up, rows) for name, (odfv, wanted) in odfvs.items()}
    for ref in refs:
        view_name, feature = parse_ref(ref)
        name = f"{view_name}__{feature}" if full_feature_names else feature
        if name in names:
            raise DataError(f"two outputs would be named {name!r}; use full_feature_names=True")
        names.append(name)
        if view_name in computed:
            values = computed[view_name][feature]
            results.append(FeatureResult(values, [FeatureStatus.PRESENT] * rows, [None] * rows))
        else:
            found = [row[feature] for row in looked_up[view_name]]
            results.append(
                FeatureResult([f.value for f in found], [f.status for f in found], [f.event_timestamp for f in found])
            )
    return OnlineResponse(OnlineMetadata(names), results)


def _row_count(entities: Mapping[str, Sequence[Any]]) -> int:
    if not isinstance(entities, Mapping) or not entities:
        raise DataError("entities must be a non-empty mapping of column name to a list of values, e.g. {'applicant_id': [1, 2]}")
    lengths = {name: len(values) for name, values in entities.items() if not isinstance(values, (str, bytes))}
    if len(lengths) != len(entities):
        raise DataError(f"every entities value must be a list; got {entities!r}")
    if len(set(lengths.values())) != 1:
        raise DataError(f"entities lists must all have one length, got {lengths}")
    return next(iter(lengths.values()))


def _checked_inputs(
    entities: Mapping[str, Sequence[Any]],
    views: dict[str, tuple[FeatureView, list[str]]],
    odfvs: dict[str, tuple[OnDemandFeatureView, list[str]]],
) -> dict[str, Sequence[Any]]:
    """``entities`` with every join key and request field checked against its declared dtype
    (``mlplatform.features.values``) before a store or a feature function sees it; columns
    nothing reads are passed through unchecked."""
    out: dict[str, Sequence[Any]] = dict(entities)
    done: set[str] = set()
    for view, _ in views.values():
        for entity in view.entities:
            for key in entity.join_keys:
                if key not in done:
                    where = f"entity key of view {view.name!r}"
                    out[key] = check_values(key, entities[key], entity.value_type, where=where, nullable=False)
                    done.add(key)
    for odfv, _ in odfvs.values():
        for source in odfv.sources:
            if isinstance(source, RequestSource):
                for f in source.schema_:
                    if f.name not in done:
                        where = f"request field of on-demand view {odfv.name!r}"
                        out[f.name] = check_values(f.name, entities[f.name], f.dtype, where=where)
                        done.add(f.name)
    return out


def _on_demand(
    odfv: OnDemandFeatureView,
    wanted: list[str],
    entities: Mapping[str, Sequence[Any]],
    views: dict[str, tuple[FeatureView, list[str]]],
    looked_up: dict[str, list[dict[str, Any]]],
    rows: int,
) -> dict[str, list[Any]]:
    # Inputs as plain values (nulls as None), with the dtype each is declared with.
    values: dict[str, list[Any]] = {}
    dtypes: dict[str, str] = {}
    for source in odfv.sources:
        if isinstance(source, RequestSource):
            for f in source.schema_:
                values[f.name], dtypes[f.name] = [_python(v) for v in entities[f.name]], f.dtype
        else:
            for f in source.features:
                values[f.name], dtypes[f.name] = [row[f.name].value for row in looked_up[source.name]], f.dtype
    try:
        if odfv.mode == "python":
            out = odfv.transform_rows(values, rows)
        else:
            import pandas as pd

            frame = pd.DataFrame({name: _series(v, dtypes[name]) for name, v in values.items()}, index=range(rows))
            result = odfv.transform(frame)
            out = {name: result[name].tolist() for name in wanted}
    except PlatformError:
        raise
    except Exception as exc:  # the function failed on this request's values: the caller's 4xx, named
        fields = [f.name for s in odfv.sources if isinstance(s, RequestSource) for f in s.schema_]
        raise DataError(
            f"on-demand feature view {odfv.name!r} (features {wanted}) failed on this request's values "
            f"({type(exc).__name__}: {str(exc)[:200]}); check the request fields {fields}"
        ) from exc
    return {name: [_python(v) for v in out[name]] for name in wanted}


def _series(values: list[Any], dtype: str) -> Any:
    """Values typed the way a training set's pandas batch holds them (nulls as NaN/None)."""
    import pandas as pd

    if dtype == "float64" or (dtype == "int64" and any(v is None for v in values)):
        return pd.Series([float("nan") if v is None else v for v in values], dtype="float64")
    if dtype == "int64":
        return pd.Series(values, dtype="int64")
    if dtype == "timestamp":
        return pd.Series(pd.to_datetime(values, utc=True))
    return pd.Series(values, dtype=object)


def _python(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and value != value:
        return None
    return value


def _json_value(value: Any) -> Any:
    value = _python(value)
    if isinstance(value, datetime):
        return _json_time(value)
    return value


def _json_time(value: datetime | None) -> str:
    if value is None:
        return _EPOCH_JSON
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
