"""Feature definitions as code: entities, sources, views, request-time features, services.

    applicant = Entity(name="applicant", join_keys=["applicant_id"])
    events = ParquetSource(name="repayment_events", dataset="raw/underwriting/repayment_events",
                           timestamp_field="event_ts", created_timestamp_field="known_ts")
    history = FeatureView(
        name="applicant_history", entities=[applicant], source=events, ttl="400d",
        aggregations=[Aggregation(column="is_missed", function="sum", window="90d",
                                  reason="Missed installments in the last 90 days")],
    )
    underwriting_v1 = FeatureService(name="underwriting_v1", features=["applicant_history:is_missed_sum_90d"])

Definitions are immutable pydantic models; ``spec()`` gives the JSON the registry stores and
hashes. A feature is referenced as ``"view:feature"`` everywhere.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic import Field as PydanticField

from mlplatform._duration import Duration, format_duration
from mlplatform.errors import DefinitionError

__all__ = [
    "Aggregation",
    "Entity",
    "FeatureService",
    "FeatureView",
    "Field",
    "OnDemandFeatureView",
    "ParquetSource",
    "RequestSource",
    "on_demand_feature_view",
    "parse_ref",
]

Name = Annotated[str, PydanticField(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
DType = Literal["int64", "float64", "string", "bool", "timestamp"]
_REF = re.compile(r"^([a-z][a-z0-9_]*):([a-z][a-z0-9_]*)$")


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``"view:feature"`` into its parts.

    Raises:
        DefinitionError: the reference is not of the form ``view:feature``.
    """
    match = _REF.match(ref) if isinstance(ref, str) else None
    if not match:
        raise DefinitionError(f"bad feature reference {ref!r}: write 'view:feature', e.g. 'applicant_history:loans_90d'")
    return match.group(1), match.group(2)


class _Strict(BaseModel):
    """Raises DefinitionError (a PlatformError) instead of pydantic's ValidationError."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            from mlplatform.config import format_validation_error

            what = f"{type(self).__name__} {data.get('name')!r}" if data.get("name") else type(self).__name__
            raise DefinitionError(format_validation_error(exc, what).replace("invalid config ", "invalid ", 1)) from None


class _Definition(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    kind: ClassVar[str]

    name: Name
    description: str = ""

    def spec(self) -> dict[str, Any]:
        """The JSON the registry stores for this object (hashed into its version)."""
        return self.model_dump(mode="json")

    @property
    def version(self) -> str:
        return content_hash(self.spec())


def content_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


class Entity(_Definition):
    """Who or what features describe, and the columns that identify it."""

    kind: ClassVar[str] = "entity"
    join_keys: tuple[Name, ...] = PydanticField(min_length=1)
    value_type: Literal["int64", "string"] = "int64"

    @model_validator(mode="before")
    @classmethod
    def _default_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "join_keys" not in data and "name" in data:
            data = {**data, "join_keys": (f"{data['name']}_id",)}
        return data


class Field(_Definition):
    """A feature or request field. ``reason`` is the customer-facing adverse-action text used
    when this feature pushes a decision toward decline."""

    kind: ClassVar[str] = "field"
    dtype: DType = "float64"
    reason: str | None = None


class ParquetSource(_Definition):
    """Event data in a dataset under the storage root.

    ``timestamp_field`` is when the fact happened; ``created_timestamp_field`` is when the lender
    knew it (a missed installment is known at due date plus grace). Without one, facts are
    taken as known when they happened.
    """

    kind: ClassVar[str] = "source"
    dataset: str = PydanticField(min_length=1, description="Dataset name under the storage root.")
    timestamp_field: Name
    created_timestamp_field: Name | None = None


class Aggregation(_Strict):
    """A windowed aggregation of a source column per entity.

    At each cadence boundary ``T`` the value covers source events with event time in
    ``(T - window, T]``. ``count`` counts non-null values (rows if ``column`` is None);
    ``sum``/``mean``/``min``/``max`` skip nulls and are null when the window holds no value,
    except ``sum``, which is 0 over an empty window.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: Name | None = None
    function: Literal["count", "sum", "mean", "min", "max"]
    window: Duration
    name: Name | None = None
    description: str = ""
    reason: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Aggregation:
        if self.window <= timedelta(0):
            raise ValueError(f"window must be positive, got {self.window!r}")
        if self.column is None and self.function != "count":
            raise ValueError(f"function {self.function!r} needs a column (only 'count' counts rows)")
        return self

    @property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.column or 'rows'}_{self.function}_{format_duration(self.window)}"

    @property
    def dtype(self) -> str:
        return "int64" if self.function == "count" else "float64"


class FeatureView(_Definition):
    """Features of one or more entities computed from one source.

    Either ``schema`` (columns read as they are, latest value wins) or ``aggregations``
    (windowed values computed by backfills at ``cadence`` boundaries, UTC midnight-aligned).
    ``ttl``: a value older than this is treated as missing, offline and online (None = never
    expires). ``availability_delay``: how long after a boundary its value is known live.
    """

    kind: ClassVar[str] = "feature_view"
    entities: tuple[Entity, ...] = PydanticField(min_length=1)
    source: ParquetSource
    schema_: tuple[Field, ...] = PydanticField(default=(), alias="schema")
    aggregations: tuple[Aggregation, ...] = ()
    ttl: Duration | None = None
    cadence: Duration = timedelta(days=1)
    availability_delay: Duration = timedelta(0)
    owner: str = ""
    tags: dict[str, str] = PydanticField(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> FeatureView:
        if bool(self.schema_) == bool(self.aggregations):
            raise ValueError("give exactly one of 'schema' (plain columns) or 'aggregations' (windowed features)")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names {dupes} in view {self.name!r}")
        keys = self.join_keys
        clash = sorted(set(keys) & set(names))
        if clash:
            raise ValueError(f"features {clash} clash with join keys of view {self.name!r}")
        if self.ttl is not None and self.ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive (or None for no expiry), got {self.ttl!r}")
        if self.cadence <= timedelta(0) or timedelta(days=1) % self.cadence and self.cadence % timedelta(days=1):
            raise ValueError(f"cadence must divide a day or be whole days, got {format_duration(self.cadence)!r}")
        return self

    @property
    def join_keys(self) -> tuple[str, ...]:
        return tuple(k for e in self.entities for k in e.join_keys)

    @property
    def features(self) -> tuple[Field, ...]:
        if self.schema_:
            return self.schema_
        return tuple(
            Field(name=a.feature_name, dtype=a.dtype, description=a.description, reason=a.reason)  # type: ignore[arg-type]
            for a in self.aggregations
        )

    def feature(self, name: str) -> Field:
        for f in self.features:
            if f.name == name:
                return f
        raise DefinitionError(
            f"feature view {self.name!r} has no feature {name!r}; it has {[f.name for f in self.features]}"
        )

    def data_spec(self) -> dict[str, Any]:
        """The part of the spec that determines the stored data; a change here needs a backfill."""
        spec = self.spec()
        return {
            "entities": [{"name": e["name"], "join_keys": e["join_keys"]} for e in spec["entities"]],
            "source": {k: spec["source"][k] for k in ("dataset", "timestamp_field", "created_timestamp_field")},
            "schema": [{"name": f["name"], "dtype": f["dtype"]} for f in spec["schema"]],
            "aggregations": [
                {k: a[k] for k in ("column", "function", "window", "name")} for a in spec["aggregations"]
            ],
            "cadence": spec["cadence"],
            "availability_delay": spec["availability_delay"],
        }

    @property
    def data_version(self) -> str:
        return content_hash(self.data_spec())

    def spec(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class RequestSource(_Definition):
    """Fields that arrive with the request (e.g. the checkout amount), not from a store."""

    kind: ClassVar[str] = "request_source"
    schema_: tuple[Field, ...] = PydanticField(alias="schema", min_length=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def spec(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class OnDemandFeatureView(_Definition):
    """Request-time features: a pure function of request fields and looked-up features.

    The udf's inputs are the request fields and the features of the source views (plain
    feature names); it returns exactly the ``schema`` columns, row for row. The same function
    runs in training-set retrieval and in serving. Two modes, as in Feast:

    - ``mode="pandas"`` (default): ``udf(df: pd.DataFrame) -> pd.DataFrame``; nulls arrive as
      NaN/None the way pandas holds them. Vectorised, so best for large offline batches.
    - ``mode="python"``: ``udf(inputs: dict[str, list]) -> dict[str, list]``, one list per
      column, a null is ``None`` on both paths. No pandas per request: on a checkout (one row)
      it costs microseconds where building DataFrames costs about a millisecond of CPU.
    """

    kind: ClassVar[str] = "on_demand_feature_view"
    sources: tuple[FeatureView | RequestSource, ...] = PydanticField(min_length=1)
    schema_: tuple[Field, ...] = PydanticField(alias="schema", min_length=1)
    udf: Callable[[Any], Any]
    mode: Literal["pandas", "python"] = "pandas"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, arbitrary_types_allowed=True)

    @field_validator("udf")
    @classmethod
    def _udf(cls, value: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if not callable(value):
            raise ValueError(f"udf must be a function, got {value!r}")
        if getattr(value, "__name__", "") == "<lambda>" or "<locals>" in getattr(value, "__qualname__", ""):
            raise ValueError("udf must be a module-level function, so serving can import it by name")
        return value

    @property
    def udf_ref(self) -> str:
        return f"{self.udf.__module__}:{self.udf.__qualname__}"

    @property
    def udf_hash(self) -> str:
        try:
            source = textwrap.dedent(inspect.getsource(self.udf))
        except (OSError, TypeError):
            source = self.udf_ref
        return hashlib.sha256(source.encode()).hexdigest()[:12]

    @property
    def features(self) -> tuple[Field, ...]:
        return self.schema_

    def feature(self, name: str) -> Field:
        for f in self.schema_:
            if f.name == name:
                return f
        raise DefinitionError(
            f"on-demand feature view {self.name!r} has no feature {name!r}; it has {[f.name for f in self.schema_]}"
        )

    @property
    def input_columns(self) -> list[str]:
        cols: list[str] = []
        for src in self.sources:
            cols.extend(f.name for f in src.features if isinstance(src, FeatureView))
            cols.extend(f.name for f in src.schema_ if isinstance(src, RequestSource))
        return cols

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "sources": [{"kind": s.kind, "name": s.name} for s in self.sources],
            "schema": [f.spec() for f in self.schema_],
            "udf": self.udf_ref,
            "udf_hash": self.udf_hash,
            "mode": self.mode,
        }

    def transform(self, frame: Any) -> Any:
        """Run the udf on a pandas DataFrame (either mode) and check its output: a DataFrame
        with exactly the declared columns, row for row."""
        if self.mode == "python":
            import pandas as pd

            columns = {c: _python_values(frame[c]) for c in frame.columns}
            return pd.DataFrame(self.transform_rows(columns, len(frame)), index=frame.index)
        result = self.udf(frame)
        missing = [f.name for f in self.schema_ if f.name not in getattr(result, "columns", [])]
        if missing or len(result) != len(frame):
            raise DefinitionError(
                f"on-demand feature view {self.name!r}: udf {self.udf_ref} must return {len(frame)} rows with "
                f"columns {[f.name for f in self.schema_]}; got {len(result)} rows, missing {missing}"
            )
        return result[[f.name for f in self.schema_]]

    def transform_rows(self, inputs: dict[str, list[Any]], rows: int) -> dict[str, list[Any]]:
        """Run a ``mode="python"`` udf on one list per input column (nulls as ``None``) and
        check it returned a list of ``rows`` values for every declared column."""
        if self.mode != "python":
            raise DefinitionError(f"on-demand feature view {self.name!r} is mode={self.mode!r}; call transform(frame)")
        result = self.udf(inputs)
        names = [f.name for f in self.schema_]
        bad = [n for n in names if not isinstance(result, Mapping) or len(result.get(n, ())) != rows]
        if bad:
            raise DefinitionError(
                f"on-demand feature view {self.name!r}: udf {self.udf_ref} must return a dict with a list of "
                f"{rows} values for each of {names}; wrong or missing: {bad}"
            )
        return {n: list(result[n]) for n in names}


def _python_values(column: Any) -> list[Any]:
    """A pandas column as the python-mode udf sees it online: plain values, nulls as None."""
    mask = column.isna().to_numpy()
    if not mask.any():
        return column.tolist()
    return [None if m else v for v, m in zip(column.astype(object).tolist(), mask, strict=True)]


def on_demand_feature_view(
    *,
    sources: Sequence[FeatureView | RequestSource],
    schema: Sequence[Field],
    name: str | None = None,
    description: str = "",
    mode: Literal["pandas", "python"] = "pandas",
) -> Callable[[Callable[[Any], Any]], OnDemandFeatureView]:
    """Decorator form of ``OnDemandFeatureView``::

        @on_demand_feature_view(sources=[checkout, history], schema=[Field(name="amount_ratio")], mode="python")
        def amount_features(inputs): ...
    """

    def wrap(fn: Callable[[Any], Any]) -> OnDemandFeatureView:
        return OnDemandFeatureView(
            name=name or fn.__name__,
            description=description or (inspect.getdoc(fn) or "").split("\n")[0],
            sources=tuple(sources),
            schema=tuple(schema),
            udf=fn,
            mode=mode,
        )

    return wrap


def load_udf(ref: str) -> Callable[[Any], Any]:
    """Import ``module:qualname``; the function an on-demand view was applied with."""
    module_name, _, qualname = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise DefinitionError(f"cannot import on-demand udf {ref!r}: {exc}; is the workload code on the path?") from None
    # The decorator replaces the function with the view; unwrap it.
    return obj.udf if isinstance(obj, OnDemandFeatureView) else obj


class FeatureService(_Definition):
    """A named set of features a model consumes, e.g. ``underwriting_v1``."""

    kind: ClassVar[str] = "feature_service"
    features: tuple[str, ...] = PydanticField(min_length=1)
    owner: str = ""

    @field_validator("features", mode="before")
    @classmethod
    def _refs(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)):
            raise ValueError("features must be a list of 'view:feature' references")
        out = []
        for item in value:
            if isinstance(item, (FeatureView, OnDemandFeatureView)):
                out.extend(f"{item.name}:{f.name}" for f in item.features)
            else:
                out.append(item)
        return tuple(out)

    @field_validator("features")
    @classmethod
    def _check(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for ref in value:
            if not _REF.match(ref):
                raise ValueError(f"bad feature reference {ref!r}: write 'view:feature'")
        dupes = sorted({r for r in value if value.count(r) > 1})
        if dupes:
            raise ValueError(f"duplicate feature references {dupes}")
        return value


Definition = Entity | ParquetSource | FeatureView | RequestSource | OnDemandFeatureView | FeatureService
KINDS: dict[str, type[_Definition]] = {
    cls.kind: cls for cls in (Entity, ParquetSource, FeatureView, RequestSource, OnDemandFeatureView, FeatureService)
}
