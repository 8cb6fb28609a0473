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

This module holds the definitions built from other definitions, with the checks between
them: ``FeatureView``, ``OnDemandFeatureView`` (and its decorator and udf loading) and
``FeatureService``, plus ``KINDS``, the table the registry rebuilds objects from. The base
model and the leaf definitions (``Entity``, ``Field``, ``ParquetSource``, ``RequestSource``,
``Aggregation``) live in :mod:`mlplatform.features._definition_base`; import them from here.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import textwrap
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, field_validator, model_validator
from pydantic import Field as PydanticField

from mlplatform._duration import Duration, format_duration
from mlplatform.errors import DefinitionError
from mlplatform.features._definition_base import (
    REF_PATTERN,
    Aggregation,
    DefinitionBase,
    Entity,
    Field,
    ParquetSource,
    RequestSource,
    StreamSource,
    content_hash,
    parse_ref,
)
from mlplatform.features.expectations import Quality

__all__ = [
    "Aggregation",
    "Entity",
    "FeatureService",
    "FeatureView",
    "Field",
    "OnDemandFeatureView",
    "ParquetSource",
    "RequestSource",
    "StreamSource",
    "on_demand_feature_view",
    "parse_ref",
]


class FeatureView(DefinitionBase):
    """Features of one or more entities computed from one source.

    Either ``schema`` (columns read as they are, latest value wins) or ``aggregations``
    (windowed values computed by backfills at ``cadence`` boundaries, UTC midnight-aligned).
    ``ttl``: a value older than this is treated as missing, offline and online (None = never
    expires). ``availability_delay``: how long after a boundary its value is known live.

    A view on a ``StreamSource`` is *real-time*: its aggregations are exact at any time ``t``
    (not only at boundaries), online from the stream within a second and offline at each
    training row's own time; see :mod:`mlplatform.features.realtime` for the semantics. It
    takes ``aggregations`` only, and no ``ttl``, ``cadence`` or ``availability_delay`` (the
    window bounds what a value covers, and a value is live as soon as its event is processed).
    """

    kind: ClassVar[str] = "feature_view"
    entities: tuple[Entity, ...] = PydanticField(min_length=1)
    source: ParquetSource | StreamSource
    schema_: tuple[Field, ...] = PydanticField(default=(), alias="schema")
    aggregations: tuple[Aggregation, ...] = ()
    ttl: Duration | None = None
    cadence: Duration = timedelta(days=1)
    availability_delay: Duration = timedelta(0)
    owner: str = ""
    tags: dict[str, str] = PydanticField(default_factory=dict)
    quality: Quality | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("source", mode="before")
    @classmethod
    def _source_kind(cls, value: Any) -> Any:
        # A stored spec is a dict: pick its class by its keys (a union would try both).
        if isinstance(value, Mapping):
            return (StreamSource if "event_id_field" in value or "schema" in value else ParquetSource)(**value)
        return value

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
        if isinstance(self.source, StreamSource):
            self._check_stream(self.source)
        elif any(a.function == "last_k" for a in self.aggregations):
            raise ValueError("function 'last_k' needs a StreamSource (a real-time view)")
        if self.quality is not None:
            self._check_quality(self.quality)
        return self

    def _check_quality(self, quality: Quality) -> None:
        dtypes = {f.name: f.dtype for f in self.features}
        unknown = sorted(set(quality.features) - set(dtypes))
        if unknown:
            raise ValueError(f"quality names features {unknown} that view {self.name!r} does not have; it has {sorted(dtypes)}")
        for name, dtype in dtypes.items():
            expect = quality.for_feature(name)
            if expect is None:
                continue
            ranged = expect.min is not None or expect.max is not None or expect.max_psi is not None
            if ranged and dtype not in ("int64", "float64"):
                raise ValueError(f"quality of feature {name!r}: min, max and max_psi need a numeric feature, it is {dtype}")
            if expect.allowed is not None and dtype not in ("int64", "string", "bool"):
                raise ValueError(f"quality of feature {name!r}: allowed values need a string, int64 or bool feature, it is {dtype}")

    def _check_stream(self, source: StreamSource) -> None:
        if self.schema_:
            raise ValueError(f"a view on stream source {source.name!r} takes 'aggregations', not 'schema'")
        if self.ttl is not None or self.cadence != timedelta(days=1) or self.availability_delay:
            raise ValueError("a real-time view takes no ttl, cadence or availability_delay: its windows bound its values")
        missing = [k for k in self.join_keys if source.field(k) is None]
        if missing:
            raise ValueError(f"join keys {missing} are not fields of stream source {source.name!r}")
        for agg in self.aggregations:
            field = source.field(agg.column) if agg.column else None
            if agg.column and field is None:
                raise ValueError(f"aggregation {agg.feature_name!r}: column {agg.column!r} is not a field of stream source {source.name!r}")
            if field is not None and agg.function in ("sum", "mean", "min", "max") and field.dtype not in ("int64", "float64"):
                raise ValueError(f"aggregation {agg.feature_name!r}: {agg.function} needs a numeric column, {agg.column!r} is {field.dtype}")

    @property
    def is_realtime(self) -> bool:
        """Computed from a stream at any time (see :mod:`mlplatform.features.realtime`)."""
        return isinstance(self.source, StreamSource)
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
        source_keys = ("dataset", "timestamp_field", "event_id_field", "allowed_lateness") if self.is_realtime else (
            "dataset", "timestamp_field", "created_timestamp_field")
        return {
            "entities": [{"name": e["name"], "join_keys": e["join_keys"]} for e in spec["entities"]],
            "source": {k: spec["source"][k] for k in source_keys},
            "schema": [{"name": f["name"], "dtype": f["dtype"]} for f in spec["schema"]],
            "aggregations": [
                {k: a[k] for k in ("column", "function", "window", "name", "k") if k in a} for a in spec["aggregations"]
            ],
            "cadence": spec["cadence"],
            "availability_delay": spec["availability_delay"],
        }

    @property
    def data_version(self) -> str:
        return content_hash(self.data_spec())

    def spec(self) -> dict[str, Any]:
        spec = self.model_dump(mode="json", by_alias=True)
        # ``k`` is only for last_k: left out otherwise, so older views keep their versions
        spec["aggregations"] = [{k: v for k, v in a.items() if k != "k" or v is not None} for a in spec["aggregations"]]
        # left out when not declared, so views without expectations keep their versions
        if spec.get("quality") is None:
            spec.pop("quality", None)
        return spec


class OnDemandFeatureView(DefinitionBase):
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
            if isinstance(src, FeatureView):
                cols.extend(f.name for f in src.features)
            else:
                cols.extend(f.name for f in src.schema_)
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


class FeatureService(DefinitionBase):
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
            if not REF_PATTERN.match(ref):
                raise ValueError(f"bad feature reference {ref!r}: write 'view:feature'")
        dupes = sorted({r for r in value if value.count(r) > 1})
        if dupes:
            raise ValueError(f"duplicate feature references {dupes}")
        return value


Definition = Entity | ParquetSource | StreamSource | FeatureView | RequestSource | OnDemandFeatureView | FeatureService
KINDS: dict[str, type[DefinitionBase]] = {
    cls.kind: cls
    for cls in (Entity, ParquetSource, StreamSource, FeatureView, RequestSource, OnDemandFeatureView, FeatureService)
}
